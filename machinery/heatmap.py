"""The critical-token heatmap (04's critical_tokens.html): rejected answers shaded by weight.

render_html(records, tok, subtitle) -> one self-contained page: per pair the question, the rejected
answer with every token on a red background as strong as its weight 1 - p_CE, the chosen answer
beside it and the three heaviest tokens. token_pieces gives each id its own text (leading spaces
kept), so the shading sits on the tokens that were scored.
"""
import html


def token_pieces(tok, ids: list[int], before: int | None) -> list[str]:
    """The text of each id on its own. Decoding with the previous id as context keeps leading
    spaces that SentencePiece drops at the start of a decode; falls back to the id alone."""
    pieces = []
    for i, t in enumerate(ids):
        prev = ids[i - 1] if i else before
        if prev is None:
            pieces.append(tok.decode([t], clean_up_tokenization_spaces=False))
            continue
        head = tok.decode([prev], clean_up_tokenization_spaces=False)
        both = tok.decode([prev, t], clean_up_tokenization_spaces=False)
        pieces.append(both[len(head):] if both.startswith(head) else
                      tok.decode([t], clean_up_tokenization_spaces=False))
    return pieces


def shade(piece: str, w: float) -> str:
    text = html.escape(piece).replace("\n", "↵\n")  # keep newline tokens visible
    color = "#fff" if w > 0.55 else "inherit"
    return (f'<span class="t" style="background:rgba(220,38,38,{w:.3f});color:{color}" '
            f'title="weight {w:.3f}">{text}</span>')


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Critical tokens</title><style>
body{{font-family:"DejaVu Sans",system-ui,sans-serif;margin:0;padding:20px 28px;
background:#f4f5f7;color:#1f2328;font-size:14px}}
h1{{font-size:20px;margin:0 0 4px}} .sub{{color:#57606a;margin-bottom:12px}}
.legend{{display:flex;align-items:center;gap:10px;margin:8px 0 16px;font-size:13px}}
.bar{{width:220px;height:14px;border:1px solid #c8ccd1;border-radius:3px;
background:linear-gradient(to right,rgba(220,38,38,0),rgba(220,38,38,1))}}
.card{{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 16px;
margin:0 0 14px;box-shadow:0 1px 2px rgba(0,0,0,.04)}}
.head{{display:flex;gap:14px;align-items:baseline;flex-wrap:wrap}}
.id{{font-weight:bold}} .gold{{background:#dafbe1;color:#116329;border-radius:10px;padding:1px 9px}}
.q{{color:#3d444d;margin:6px 0 10px}}
.cols{{display:grid;grid-template-columns:3fr 2fr;gap:14px}}
.lab{{font-size:12px;color:#57606a;margin-bottom:3px;text-transform:uppercase;letter-spacing:.04em}}
.resp{{font-family:"DejaVu Sans Mono",ui-monospace,monospace;font-size:13px;white-space:pre-wrap;
line-height:1.75;border:1px solid #eaeef2;border-radius:6px;padding:8px 10px;background:#fcfcfd}}
.chosen{{background:#f6fef8;border-color:#cfe9d6}}
.t{{border-radius:2px}} .top{{font-size:12.5px;color:#3d444d;margin-top:8px}}
.top code{{background:#fde8e8;border-radius:3px;padding:0 4px}}
</style></head><body>
<h1>Critical tokens</h1>
<div class="sub">{subtitle}</div>
<div class="legend"><span>weight 1 − p<sub>CE</sub> on each rejected token:</span>
<span>0</span><span class="bar"></span><span>1</span>
<span style="color:#57606a">(dark = the positive model disowns the token; hover for the value)
</span></div>
{cards}
</body></html>
"""


def render_html(records: list[dict], tok, subtitle: str) -> str:
    cards = []
    for r in records:
        pieces = token_pieces(tok, r["rejected_ids"], r["prompt_ids"][-1])
        w = r["rejected_weights"]
        tokens = "".join(shade(p, x) for p, x in zip(pieces, w))
        top = sorted(range(len(w)), key=lambda i: -w[i])[:3]
        top = "; ".join(f"<code>{html.escape(repr(pieces[i])[1:-1])}</code> {w[i]:.2f} "
                        f"(token {i + 1})" for i in top)
        question = r.get("question") or r["prompt"][-600:]
        cards.append(
            f'<div class="card"><div class="head"><span class="id">{html.escape(r["id"])}</span>'
            f'<span class="gold">gold answer: {html.escape(str(r.get("answer", "?")))}</span>'
            f'<span class="sub">{len(w)} tokens, mean weight {sum(w) / len(w):.2f}</span></div>'
            f'<div class="q">{html.escape(question)}</div><div class="cols">'
            f'<div><div class="lab">rejected (wrong)</div><div class="resp">{tokens}</div></div>'
            f'<div><div class="lab">chosen (correct)</div><div class="resp chosen">'
            f'{html.escape(r["chosen"])}</div></div></div>'
            f'<div class="top">highest weights: {top}</div></div>')
    return PAGE.format(subtitle=html.escape(subtitle), cards="\n".join(cards))
