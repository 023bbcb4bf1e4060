"""Answer extraction and equivalence grading for real math benchmarks (``math-verify``, imported lazily).

    final = extract_answer(response)       # "\\frac{1}{2}" from "... so the answer is \\boxed{\\frac{1}{2}}."
    ok = is_equivalent(final, gold)        # math-verify: 0.5 == \\frac{1}{2}, 60 == 60.0, x^2+1 == 1+x^2

Extraction takes the *last* final-answer marker a response wrote, in this order of precedence:

    1. ``\\boxed{...}`` / ``\\fbox{...}`` (braces balanced; the paper's prompt asks for it)
    2. ``#### <answer>``                   (GSM8K style)
    3. ``A:<answer>`` / ``Answer: <answer>`` (the tiny pair's convention; DAPO-Math-17K's instruction)
    4. ``answer is <answer>``              (free text)

A response with none of them has no answer (graded wrong): a truncated chain of thought mentioning the right
number on the way is not an answer. Equivalence goes through math-verify's LaTeX/sympy parser (``parse`` of
both sides, ``verify(gold, pred)``) and falls back to an exact match of the normalised strings when the gold
does not parse (free-text answers such as CHAMP's "C(10, 5), or equivalently 252" parse to their last value).
math-verify bounds each call with ``signal.alarm``, which only the main thread may set: elsewhere the calls
run without a timeout.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache

BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
HASHES_RE = re.compile(r"####\s*([^\n]+)")
PREFIX_RE = re.compile(r"(?:^|(?<=[^A-Za-z]))A(?:nswer)?:\s*([^\n<]+)", re.MULTILINE)
ANSWER_IS_RE = re.compile(r"answer is[:\s]*([^\n]+)", re.IGNORECASE)
TRAILING = " \t.;,$"  # trailing punctuation and stray math delimiters around a plain-text answer
MATH_WORDS = {"floor", "ceil", "sqrt", "log", "sin", "cos", "tan", "exp", "mod", "gcd", "lcm", "max", "min",
              "binom", "frac", "pmod", "cdot", "infty", "circ", "det"}
MAX_ANSWER_CHARS = 200  # longer "answers" are degenerate output: graded wrong without parsing


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) with balanced braces, or None."""
    starts = [m.end() for m in BOXED_RE.finditer(text)]
    for start in reversed(starts):  # the last one that closes
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The final answer a response wrote (see the module docstring for the markers), or None; never raises."""
    if not isinstance(text, str):
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (HASHES_RE, PREFIX_RE, ANSWER_IS_RE):
        found = pattern.findall(text)
        if found:
            answer = found[-1].strip().strip(TRAILING)
            return answer.replace(",", "") if re.fullmatch(r"-?[0-9,]+(\.[0-9]+)?", answer) else answer
    return None


def _timeout() -> int | None:
    return 5 if threading.current_thread() is threading.main_thread() else None


def is_prose(answer: str) -> bool:
    """True when a reference answer has an English word of 3+ letters that is not a math function (CHAMP's
    "The limit exists and is equal to 2/3"): math mode would read the words as products of variables."""
    words = re.findall(r"(?<![\\A-Za-z])[A-Za-z]{3,}", answer)
    return any(w.lower() not in MATH_WORDS for w in words)


@lru_cache(maxsize=4096)
def parse_gold(gold: str) -> tuple:
    """math-verify's parse of a reference answer: in math mode (benchmarks write answers without ``$``), except
    prose, from which math-verify's default extraction takes the last expression."""
    from math_verify import parse

    delimited = "$" in gold or "\\(" in gold or "\\boxed" in gold
    text = gold if delimited or is_prose(gold) else f"${gold}$"
    return tuple(parse(text, parsing_timeout=_timeout()))


def normalise(answer: str) -> str:
    """The exact-match fallback's form: lower case, no spaces or ``$``, no ``\\left``/``\\right``, ``\\frac``."""
    s = answer.replace("\\left", "").replace("\\right", "").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return re.sub(r"[\s$]", "", s).lower()


def is_equivalent(pred: str | None, gold: str) -> bool:
    """True when the extracted answer ``pred`` equals the reference ``gold`` (math-verify, then exact match)."""
    if pred is None or not pred.strip() or len(pred) > MAX_ANSWER_CHARS:
        return False
    if normalise(pred) == normalise(str(gold)):
        return True
    from math_verify import parse, verify

    gold_parsed = list(parse_gold(str(gold)))
    if not gold_parsed:
        return False
    pred_parsed = parse(f"${pred}$", parsing_timeout=_timeout())
    return bool(pred_parsed) and verify(gold_parsed, pred_parsed, timeout_seconds=_timeout())


def grade_response(text: str, gold: str) -> bool:
    """``is_equivalent(extract_answer(text), gold)``: lenient grading of one response."""
    return is_equivalent(extract_answer(text), gold)
