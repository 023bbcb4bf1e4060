"""Answer extraction and math-verify equivalence (opd_exp/tasks/grading.py)."""

from __future__ import annotations

import threading

import pytest

from opd_exp.tasks.grading import extract_answer, grade_response, is_equivalent, last_boxed

pytest.importorskip("math_verify")


@pytest.mark.parametrize("text, answer", [
    ("so the total is \\boxed{60}.", "60"),
    ("first \\boxed{1}, then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),  # the last box counts
    ("\\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),  # nested braces
    ("\\fbox{7}", "7"),
    ("she has 3 + 4 = 7 apples\n#### 7", "7"),
    ("#### 1,234", "1234"),
    ("<think>5+9=14</think>A:14<|im_end|>", "14"),
    ("so it is 34.\nAnswer: 34", "34"),  # DAPO-Math-17K's instruction
    ("QA: not an answer prefix", None),
    ("Therefore, the answer is $42$.", "42"),
    ("no marker at all, 60 is mentioned", None),
    ("\\boxed{unclosed", None),
])
def test_extract_answer(text, answer):
    assert extract_answer(text) == answer


def test_extract_prefers_boxed_over_other_markers():
    assert extract_answer("#### 5 but finally \\boxed{6}") == "6"
    assert last_boxed("\\boxed{a} \\boxed{b") == "a"  # an unclosed last box falls back to the one before


@pytest.mark.parametrize("pred, gold", [
    ("60", "60"), ("60.0", "60"), ("0.5", "\\frac{1}{2}"), ("\\dfrac{1}{2}", "\\frac12"), ("1/2", "\\frac{1}{2}"),
    ("x^2+1", "1+x^2"), ("2\\sqrt{3}", "\\sqrt{12}"), ("\\pi/2", "\\frac{\\pi}{2}"), ("No", "No"),
    ("252", "C(10, 5), or equivalently 252"),  # CHAMP's prose answers: the last value
    ("\\frac{2}{3}", "The limit exists and is equal to 2/3"),
])
def test_equivalent(pred, gold):
    assert is_equivalent(pred, gold)


@pytest.mark.parametrize("pred, gold", [
    ("61", "60"), ("\\frac{1}{3}", "\\frac{1}{2}"), ("x^2-1", "x^2+1"), (None, "60"), ("", "60"),
    ("1" * 300, "1"),  # degenerate output is wrong without parsing
])
def test_not_equivalent(pred, gold):
    assert not is_equivalent(pred, gold)


def test_grade_response_end_to_end():
    assert grade_response("<think>half</think> The answer is \\boxed{\\frac{1}{2}}<|im_end|>", "0.5")
    assert not grade_response("The answer might be 0.5 but I stopped", "0.5")  # no final-answer marker


def test_grading_works_off_the_main_thread():
    """math-verify's timeout uses signal.alarm (main thread only): a worker thread grades without it."""
    out = []
    worker = threading.Thread(target=lambda: out.append(grade_response("\\boxed{\\frac{1}{2}}", "0.5")))
    worker.start()
    worker.join()
    assert out == [True]
