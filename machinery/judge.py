"""
The optional step judge of 02_localize.py (PAPERS.md B2: the Step-DPO authors asked GPT-4o which
step is the first wrong one). Any OpenAI-compatible chat endpoint works (`--judge-url .../v1`);
the prompt is a file (prompts/judge_steps.txt) and the verdict is parsed strictly: a reply that
does not follow the format is counted and skipped, never guessed at.
"""
import json
import re
import time
import urllib.error
import urllib.request


def judge_message(template: str, problem: str, reference: str, steps: list[str]) -> str:
    """Fill the template in one pass (so braces inside the texts are never read as fields).
    Steps are numbered as split_steps numbers them, so the verdict's k is our k."""
    numbered = "\n".join(s.strip() if re.match(r"\s*step\s*\d+\s*:", s, re.I)
                         else f"Step {i}: {s.strip()}" for i, s in enumerate(steps, 1))
    fields = {"problem": problem.strip(), "reference_solution": reference.strip(),
              "wrong_answer": numbered}
    return re.sub(r"\{(problem|reference_solution|wrong_answer)\}", lambda m: fields[m[1]],
                  template)


def parse_verdict(reply: str, n: int) -> int | None:
    """Strict: the text after the last "final decision" must be `label; label; ...` (each item may
    name its step, which must then be its position). Returns the first step graded neutral or
    incorrect (neutral counts as an error, as in the released code), 0 when every step is correct,
    None when unparsable or pointing past the n steps."""
    text = reply.lower()
    at = text.rfind("final decision")
    if at < 0:
        return None
    items = [x.strip(" \n\t.*") for x in text[at + len("final decision"):].lstrip(" :*").split(";")]
    items = [x for x in items if x]
    if not items:
        return None
    for pos, item in enumerate(items, 1):
        labels = re.findall(r"\b(incorrect|neutral|correct)\b", item)
        named = re.match(r"step\s*(\d+)", item)
        if len(labels) != 1 or (named and int(named[1]) != pos):
            return None
        if labels[0] != "correct":
            return pos if pos <= n else None
    return 0


def ask_judge(url: str, model: str, message: str, key: str | None, timeout: float) -> str:
    """POST {url}/chat/completions; three tries on network errors and 5xx, none on 4xx."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": message}]})
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body.encode(),
                                 headers=headers, method="POST")
    for attempt in range(3):
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.load(r)["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as e:
            if e.code < 500 or attempt == 2:
                raise RuntimeError(f"judge {url}: HTTP {e.code} {e.reason}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
            if attempt == 2:
                raise RuntimeError(f"judge {url}: {e}") from e
        time.sleep(2 ** attempt)
