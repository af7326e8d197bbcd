"""Batch layouts of the training stages: padded rows, and packed rows with their exact mask.

  padded   one right-padded row per sequence: a preference pair is two rows, prompt + chosen and
           prompt + rejected (collate_pairs; --layout padded). The loss always reads this layout:
           rows 0..B-1 chosen, B..2B-1 rejected, column P+j-1 scoring response token j.
  packed   each pair one sequence, its context once, then both responses (each masked from the
           other, position ids restarting both where the context ends); pairs packed into rows
           with padding only at the rows' starts; logits only where a response token is scored
           (pack_rows, packed_attention_mask; --layout packed, the default). common.token_logps
           runs them through packed_forward and unpack_logps here, and hands the log-probs back
           in the padded layout's rows and columns, so the losses never see the difference. SFT
           examples pack the same way (a prompt with one response: collate_sft).

A packed row needs an attention that takes an arbitrary mask; packing_unsupported says when a
model's does not (machinery.optimization.batch_layout then falls back to padded, in one line).
"""
import inspect
import math

import torch


# The padded layout
def pad_right(seqs: list[list], value) -> torch.Tensor:
    """(B, T) tensor of the sequences right-padded with `value`."""
    T = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (T - len(s)) for s in seqs])


def collate_pairs(pairs: list[dict], pad_id: int, packed: bool = False,
                  row_tokens: int = 0) -> dict:
    """Preference pairs -> one batch for token_logps and the loss.

    Each pair holds token ids `prompt_ids`, `chosen_ids`, `rejected_ids` and optionally per-token
    `chosen_weights` / `rejected_weights` and reference log-probs `ref_chosen_logps` /
    `ref_rejected_logps` (see machinery.pairs.reference_logps), each aligned one to one with the
    response ids.
    The loss sees the padded layout: rows 0..B-1 chosen, rows B..2B-1 rejected, each prompt +
    response right-padded to T tokens. Response token j sits at position P+j (P =
    len(prompt_ids)); its log-prob is column P+j-1 of token_logps, so its weight and reference
    log-prob go to that column: loss_mask, weights (and ref_logps when every pair has them)
    (2B, T-1), float32, zero outside the responses.
    The model sees that layout too (input_ids, attention_mask (2B, T)), or with packed=True
    pack_rows' rows: the prompt once per pair, the two responses after it, pairs packed into
    rows of up to max(row_tokens, the longest pair) tokens (token_logps unpacks their log-probs
    into the columns above).
    """
    rows, loss_masks, weights, refs = [], [], [], []
    for side in ("chosen", "rejected"):
        for p in pairs:
            prompt, resp = p["prompt_ids"], p[f"{side}_ids"]
            w = p.get(f"{side}_weights") or [1.0] * len(resp)
            assert len(w) == len(resp), f"{p.get('id')}: {side}_weights not aligned with ids"
            rows.append(prompt + resp)
            P = len(prompt)
            loss_masks.append([0.0] * (P - 1) + [1.0] * len(resp))
            weights.append([0.0] * (P - 1) + [float(x) for x in w])
            if p.get(f"ref_{side}_logps") is not None:
                ref = p[f"ref_{side}_logps"]
                assert len(ref) == len(resp), f"{p.get('id')}: ref_{side}_logps not aligned"
                refs.append([0.0] * (P - 1) + list(ref))
    T = max(len(r) for r in rows)
    if packed:
        out = pack_rows([(p["prompt_ids"], [p["chosen_ids"], p["rejected_ids"]]) for p in pairs],
                        pad_id, row_tokens, T)
    else:
        out = {"input_ids": pad_right(rows, pad_id),
               "attention_mask": pad_right([[1] * len(r) for r in rows], 0)}
    pad_t = lambda xs: torch.tensor([x + [0.0] * (T - 1 - len(x)) for x in xs])  # noqa: E731
    out.update(loss_mask=pad_t(loss_masks), weights=pad_t(weights))
    if len(refs) == len(rows):
        out["ref_logps"] = pad_t(refs)
    return out


def collate_sft(examples: list[dict], pad_id: int, packed: bool = False,
                row_tokens: int = 0) -> dict:
    """SFT examples {prompt_ids, response_ids} -> one batch: loss_mask (B, T-1), 1 on the columns
    of token_logps that score a response token (response token j of prompt length P: column
    P+j-1) in the right-padded layout, and the model's input: that layout, input_ids and
    attention_mask (B, T), or with packed=True the examples packed into rows of up to
    row_tokens tokens (pack_rows; token_logps unpacks the log-probs)."""
    rows = [e["prompt_ids"] + e["response_ids"] for e in examples]
    masks = [[0.0] * (len(e["prompt_ids"]) - 1) + [1.0] * len(e["response_ids"]) for e in examples]
    if packed:
        b = pack_rows([(e["prompt_ids"], [e["response_ids"]]) for e in examples], pad_id,
                      row_tokens, max(map(len, rows)))
    else:
        b = {"input_ids": pad_right(rows, pad_id),
             "attention_mask": pad_right([[1] * len(r) for r in rows], 0)}
    return {**b, "loss_mask": pad_right(masks, 0.0)}


# The packed layout
def pack_rows(items: list[tuple[list, list[list]]], pad_id: int, row_tokens: int, T: int) -> dict:
    """Pack items that share a context into rows: each context once, only the rows' starts padded.

    items: (context ids, [response ids, ...]): a preference pair is (prompt, [chosen, rejected]),
    an SFT example (prompt, [response]). Items go into rows of at most max(row_tokens, longest
    item) tokens, longest first, each into the first row with room. A row is

        [padding] [context of item 1 but its last token] [... of item 2] ...
                  [last context token of item 1, its responses] [... of item 2] ...

    with position ids restarting each response where its context ends, so that with
    packed_attention_mask a response token sees exactly what it sees in context + response
    alone. The rows are left-padded to one length L and end with every scored position: the
    logits of the last K positions are all token_logps computes (K = the longest such tail).

    The padded layout it replaces has one row per (response, item), response-major (rows 0..n-1
    the first response of every item, then the second), of T tokens. `unpack` (rows, T-1) maps
    each of its response columns to the column of the packed (R, K-1) log-probs that scores the
    same token from the same context (-1 elsewhere). `source` (R, K-1): the tail position whose
    logits score tail token c+1, c except for a second response's first token, scored from the
    last context token. Returns input_ids, attention_mask (1 real, 0 padding), position_ids,
    seq_doc, seq_branch (R, L), source, unpack.
    """
    length = lambda k: len(items[k][0]) + sum(map(len, items[k][1]))  # noqa: E731
    cap = max(row_tokens, max(map(length, range(len(items)))))
    rows, used = [], []  # the items of each row, its tokens
    for k in sorted(range(len(items)), key=length, reverse=True):  # stable: ties keep order
        r = next((r for r, u in enumerate(used) if u + length(k) <= cap), len(rows))
        if r == len(rows):
            rows.append([])
            used.append(0)
        rows[r].append(k)
        used[r] += length(k)
    # each row as (token, position, item, branch) tuples: context bodies, then the tails
    bodies, tails, scored = [], [], []  # scored: (row, tail index, item, response, j)
    for r, members in enumerate(rows):
        body, tail = [], []
        for d, k in enumerate(members):
            context, responses = items[k]
            P = len(context)
            body += [(t, p, d, 0) for p, t in enumerate(context[:-1])]
            tail.append((context[-1], P - 1, d, 0))  # scores each response's first token
            last = len(tail) - 1
            for b, resp in enumerate(responses):
                for j, t in enumerate(resp):
                    scored.append((r, len(tail), last, k, b, j))
                    tail.append((t, P + j, d, b + 1))
        bodies.append(body)
        tails.append(tail)
    L = max(len(b) + len(t) for b, t in zip(bodies, tails))
    K = max(map(len, tails))
    rows_t = [[(pad_id, 0, -1, 0)] * (L - len(b) - len(t)) + b + t for b, t in zip(bodies, tails)]
    source = [list(range(K - 1)) for _ in rows]
    unpack = [[-1] * (T - 1) for _ in range(max(len(it[1]) for it in items) * len(items))]
    for r, at, last, k, b, j in scored:
        col = at + K - len(tails[r]) - 1  # tail index -> column of the (R, K-1) log-probs
        unpack[b * len(items) + k][len(items[k][0]) - 1 + j] = r * (K - 1) + col
        if j == 0 and b > 0:  # after the first response in the row, not in its sequence
            source[r][col] = last + K - len(tails[r])
    field = lambda i: torch.tensor([[tok[i] for tok in row] for row in rows_t])  # noqa: E731
    doc = field(2)
    return {"input_ids": field(0), "attention_mask": (doc >= 0).long(),
            "position_ids": field(1), "seq_doc": doc, "seq_branch": field(3),
            "source": torch.tensor(source), "unpack": torch.tensor(unpack)}


def packed_attention_mask(model, doc: torch.Tensor, branch: torch.Tensor, pos: torch.Tensor):
    """The attention mask of pack_rows' rows, in the form the model's attention takes.

    doc (R, L): which item of the row a token belongs to (-1: padding); branch (R, L): 0 its
    context, 1 the first response (chosen), 2 the second (rejected); pos (R, L): the token's
    position in its own sequence. Query i sees key j iff
        doc_j == doc_i  and  pos_j <= pos_i  and  (branch_j == 0  or  branch_j == branch_i):
    each response sees its context and itself, never the other response or another item, in the
    order of its own sequence (the row order is not: pack_rows moves responses to the row's end);
    padding sees padding. sdpa takes the (R, 1, L, L) bool mask, eager an additive float one.
    """
    same = doc[:, :, None] == doc[:, None, :]  # (R, L, L): [r, i, j]
    before = pos[:, None, :] <= pos[:, :, None]
    branch_ok = (branch[:, None, :] == 0) | (branch[:, :, None] == branch[:, None, :])
    allowed = (same & before & branch_ok)[:, None]  # (R, 1, L, L); the diagonal is always in
    if model.config._attn_implementation == "eager":
        return torch.zeros(allowed.shape, device=doc.device).masked_fill_(~allowed, -math.inf)
    return allowed


def packed_forward(model, batch: dict):
    """The forward of a packed batch for common.token_logps: logits only for the last K positions
    of each row (every scored position is there), under packed_attention_mask. Returns logits
    (R, K, V), the targets (R, K-1) (tail token c+1 for column c) and the `rescored` slots
    (rows, cols, sources): a second response's first token, scored from its context's last
    token rather than from the token before it in the row."""
    ids = batch["input_ids"]  # (R, L)
    K = batch["source"].shape[1] + 1
    attention = packed_attention_mask(model, batch["seq_doc"], batch["seq_branch"],
                                      batch["position_ids"])
    logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=K,
                   position_ids=batch["position_ids"], use_cache=False).logits  # (R, K, V)
    rescored = (batch["source"] != torch.arange(K - 1, device=ids.device)).nonzero(as_tuple=True)
    return logits, ids[:, ids.shape[1] - K + 1:], (*rescored, batch["source"][rescored])


def unpack_logps(logps: torch.Tensor, batch: dict) -> torch.Tensor:
    """(R, K-1) packed log-probs -> the padded layout's (rows, T-1), 0 outside the responses."""
    idx = batch["unpack"]
    return torch.where(idx >= 0, logps.flatten()[idx.clamp(min=0)], 0.0)


def packing_unsupported(model, longest: int) -> str | None:
    """Why the model cannot take packed rows, or None. They need an attention that takes an
    arbitrary 4D mask (sdpa, eager; flash-attention kernels take only padding or packing), every
    layer attending to the whole sequence (a sliding window shorter than the longest sequence
    would need its own mask; linear-attention or recurrent layers carry state across the items
    of a row), and a forward that takes logits_to_keep."""
    config = model.config
    impl = config._attn_implementation
    if impl not in ("sdpa", "eager"):
        return f"attention implementation '{impl}' takes no custom mask"
    window = getattr(config, "sliding_window", None)  # Mistral: every layer; Gemma2: some
    kinds = set(getattr(config, "layer_types", None)
                or ["sliding_attention" if window else "full_attention"])
    if kinds - {"full_attention", "sliding_attention"}:
        return f"layer types {sorted(kinds)} are not all attention"
    if "sliding_attention" in kinds and window and window < longest:
        return f"sliding window {window} is shorter than the longest sequence ({longest} tokens)"
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward takes no logits_to_keep"
    return None
