"""A second grader written separately from machinery/mathtext.py, used by runs/audit_grader.py to audit it.

Rules for read_final_answer (first match wins):
1. Explicit markers: \\boxed{..}, '####', 'answer is/was/:/=' ('The final answer is', 'the answer
   to ... is'), and a bold number '**18**' (at most two unit words, e.g. '**$18 apples**').
   The LAST marker followed by a number wins.  The value is the first number after the marker,
   unless that number starts an expression ('3 + 4 = 7'): then the first number after the
   last '=' in the same sentence.  Only here are number words zero..twenty read ('eleven').
2. No marker: the last sentence holding a digit, skipping trailing remarks that start with
   'That is', 'This is', 'Because', 'Since', 'Note', 'Check'... ('So she has 11 shells. That is
   2 more than 9.' -> 11, a judgement call: such a remark restates, it does not answer).
   In that sentence: the first number after the last '=', else the LAST number.
Numbers: '1,000' -> 1000, '$18.00' -> 18, '25%' -> 25, '-3' (a '-' right after a digit is a minus
sign, not a sign).  Output is a plain decimal string with trailing zeros dropped.
same_value compares exactly with fractions.Fraction; None or unparsable -> False.
"""
import re
from fractions import Fraction

# A number: optional sign (not after a digit/letter, so '10-3' is 10 and 3), thousands groups or
# plain digits, optional decimals.  '.' is excluded before it so '3.5' is never read as '5'.
NUM = r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen twenty").split()
WORD_NUM = r"\b(?:" + "|".join(WORDS) + r")\b"
# A sentence ends at '.', '!', '?' or a newline; a '.' followed by a digit is a decimal point.
SENT_END = re.compile(r"\.(?!\d)|[!?\n]")
MARKERS = re.compile(
    r"\\boxed\s*\{(?P<box>(?:[^{}]|\{[^{}]*\})*)\}"                 # \boxed{..}, one nesting level
    r"|####"
    r"|\banswer\b(?:\s+to\s+[^.\n:=]{0,60}?)?\s*(?:is|was|would be|will be|:|=)\s*:?"
    r"|\*\*\s*(?P<bold>\\?\$?\s*" + NUM + r"\s*%?(?:\s*[A-Za-z]+){0,2})\s*\*\*",
    re.IGNORECASE)
OPERATOR = re.compile(r"\s*[-+*/×÷x]\s*\$?\d")  # the number just read starts an expression
# Trailing sentences that comment on the answer instead of giving it.
REMARK = re.compile(r"\s*(?:that is|that's|this is|which is|because|since|note|check|to check|"
                    r"we can check|let's check|indeed)\b", re.IGNORECASE)


def _clean(num: str) -> str:
    num = num.replace(",", "")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return "0" if num in ("-0", "") else num


def _after_last_equals(span: str) -> str | None:
    if "=" in span:
        m = re.search(NUM, span.rsplit("=", 1)[1])
        if m:
            return _clean(m.group())
    return None


def _from_marker_span(span: str) -> str | None:
    """The answer right after a marker: first number, or the result if it starts an expression."""
    span = SENT_END.split(span.lstrip(), 1)[0]
    first = re.search(NUM, span)
    if first:
        if OPERATOR.match(span, first.end()):
            return _after_last_equals(span) or _clean(first.group())
        return _clean(first.group())
    word = re.search(WORD_NUM, span, re.IGNORECASE)
    return str(WORDS.index(word.group().lower())) if word else None


def read_final_answer(text: str) -> str | None:
    text = text.replace("\u2212", "-").replace("\\,", "")  # unicode minus, LaTeX thin space
    found = None
    for m in MARKERS.finditer(text):  # the last marker that yields a number wins
        inner = m.group("box") if m.group("box") is not None else m.group("bold")
        value = _from_marker_span(inner if inner is not None else text[m.end():])
        if value is not None:
            found = value
    if found is not None:
        return found
    sentences = [s for s in SENT_END.split(text) if re.search(NUM, s)]
    if not sentences:
        return None
    while len(sentences) > 1 and REMARK.match(sentences[-1]):
        sentences.pop()  # 'That is 2 more than 9.' restates; the answer came before it
    last = sentences[-1]
    return _after_last_equals(last) or _clean(re.findall(NUM, last)[-1])


def _to_fraction(s: str) -> Fraction | None:
    try:
        return Fraction(re.sub(r"[\s,$%]", "", s))
    except (ValueError, ZeroDivisionError):
        return None


def same_value(pred: str | None, gold: str) -> bool:
    if pred is None:
        return False
    a, b = _to_fraction(pred), _to_fraction(gold)
    return a is not None and b is not None and a == b


def grade(text: str, gold: str) -> tuple[str | None, bool]:
    pred = read_final_answer(text)
    return pred, same_value(pred, gold)


if __name__ == "__main__":
    cases = [
        ("The answer is 18.", "18"),
        ("The answer is 18, because 20 - 2 = 18 and she had 20.", "18"),
        ("She had 20 and gave 2. The final answer is $18.00", "18"),
        ("Step 1: 10 + 8 = 18\n#### 18", "18"),
        ("So the total is $\\boxed{18}$.", "18"),
        ("\\boxed{\\$18.50} is what she pays.", "18.5"),
        ("She pays 3 + 4 = 7 dollars.\n\n**7**", "7"),
        ("Emma had 8 shells and found 3 more. So, Emma has 11 shells now.", "11"),
        ("Therefore, the total is 3 + 4 = 7 apples.", "7"),
        ("Tom has 3 apples and 4 pears.\nAnswer: 7", "7"),
        ("3 apples plus 4 apples\n= 7 apples", "7"),
        ("She starts with 5 and buys 6 more, so she ends with 11", "11"),
        ("So she has 11 shells. That is 2 more than 9.", "11"),
        ("The farm has 1,000 cows and sells 250, leaving 750.", "750"),
        ("The answer is 1,250 dollars.", "1250"),
        ("It costs 2.5 + 2.5 = 5.25 in total.", "5.25"),
        ("The temperature drops 5 degrees from 2, so it is -3 degrees.", "-3"),
        ("The answer is 42. I hope this helps! Let me know if you have questions.", "42"),
        ("The answer is eleven.", "11"),
        ("The answer is 3 + 4 = 7.", "7"),
        ("First the answer is 5. Wait, recount: the answer is 6.", "6"),
        ("\\boxed{12} ... on second thought #### 13", "13"),
        ("The answer to the question is 9 marbles.", "9"),
        ("**Step 1:** 4 x 3 = 12 cookies.\n**Step 2:** 12 - 2 = 10 cookies left.", "10"),
        ("About 25% of 40 is 10.", "10"),
        ("The price went up 10-3 times, finally 7.", "7"),
        ("She gets a 10% raise, so **$55 dollars**.", "55"),
        ("I don't know how to solve this.", None),
        ("", None),
    ]
    for text, want in cases:
        got = read_final_answer(text)
        assert got == want, (text, got, want)
    assert same_value("18.00", "18") and same_value("1,000", "1000") and same_value("18.5", "18.50")
    assert not same_value(None, "18") and not same_value("abc", "18") and not same_value("17", "18")
    assert grade("So, Emma has 11 shells now.", "11") == ("11", True)
    assert grade("Nothing here.", "11") == (None, False)
    print("ok")
