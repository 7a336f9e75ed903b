"""Depth family of the digits generator: always four digits, the level sets the expression."""

from __future__ import annotations

import dataclasses
import io
import re
from collections import Counter

import pytest
from PIL import Image

from megatron_autothink.data.digits import (
    DEPTH_DIGITS,
    DigitsConfig,
    depth_steps,
    generate_digits,
    make_problem,
    problem_texts,
    split_indices,
)
from megatron_autothink.data.image_processing import smart_resize
from megatron_autothink.data.schema import response_mode

DEPTH = DigitsConfig(family="depth")
_EXPR = re.compile(r"Compute ([a-d*+]+)\.")


def _value(expr: str, d: tuple[int, ...]) -> int:
    env = dict(zip("abcd", d, strict=True))
    total = 0
    for term in expr.split("+"):
        prod = 1
        for name in term.split("*"):
            prod *= env[name]
        total += prod
    return total


def test_answers_match_the_expression() -> None:
    for split in ("train", "test"):
        for i in range(500):
            p = make_problem(3, split, i, config=DEPTH)  # type: ignore[arg-type]
            assert p.kind == "depth" and len(p.digits) == DEPTH_DIGITS
            assert all(2 <= x <= 9 for x in p.digits)  # default depth_low_digit=2
            m = _EXPR.search(p.question)
            assert m is not None, p.question
            assert p.answer == _value(m.group(1), p.digits)
            n_ops = m.group(1).count("+") + m.group(1).count("*")
            # one trace line per operation (level 1: the one named digit)
            assert len(p.steps) == 1 + max(n_ops, 1)


@pytest.mark.parametrize("split_sum", [False, True])
def test_trace_is_consistent(split_sum: bool) -> None:
    """Every line ``lhs=x op y(=x' op y')=z`` has the digits / earlier results as operands, each
    intermediate equals the sum before it, and z is right."""
    cfg = dataclasses.replace(DEPTH, depth_split_sum=split_sum)
    split_lines = 0
    for i in range(500):
        p = make_problem(0, "train", i, config=cfg)
        assert p.steps[0] == "The digits are " + ", ".join(map(str, p.digits)) + "."
        env = dict(zip("abcd", p.digits, strict=True))
        for line in p.steps[1:]:
            parts = line.split("=")
            if len(parts) == 2:  # level 1: "c=3"
                assert env[parts[0]] == int(parts[1])
                continue
            lhs, *chain, result = parts
            assert int(result) == _value(lhs, p.digits)
            for ops in chain:  # every form of the expression has the same value
                operands = [int(x) for x in re.split(r"[*+]", ops)]
                op = "*" if "*" in ops else "+"
                assert int(result) == (operands[0] * operands[1] if op == "*" else sum(operands))
            if len(chain) == 2:  # 56+15=66+5: the tens of the second operand added first
                x, y = (int(v) for v in chain[0].split("+"))
                assert chain[1] == f"{x + y - y % 10}+{y % 10}" and y >= 10 and y % 10
                split_lines += 1
        # the last line's result is the answer
        assert p.steps[-1].endswith(f"={p.answer}")
        _, thinking, direct = problem_texts(p)
        assert thinking.endswith(f"\\boxed{{{p.answer}}}.") and direct.endswith(
            f"\\boxed{{{p.answer}}}."
        )
    assert (split_lines > 50) == split_sum


def test_levels_balanced_and_deterministic() -> None:
    n = 5000
    levels = Counter(make_problem(0, "train", i, config=DEPTH).difficulty for i in range(n))
    assert set(levels) == {1, 2, 3, 4, 5}
    for count in levels.values():  # uniform: 1000 each, binomial sd ~28
        assert abs(count - n / 5) < 150
    a = [s.model_dump() for s in generate_digits(20, seed=5, config=DEPTH)]
    assert a == [s.model_dump() for s in generate_digits(20, seed=5, config=DEPTH)]
    assert [s.model_dump() for s in generate_digits(20, seed=5, start=7, config=DEPTH)] == a[7:]
    assert a != [s.model_dump() for s in generate_digits(20, seed=6, config=DEPTH)]
    # the default family is untouched by the new option
    assert make_problem(0, "train", 3) == make_problem(0, "train", 3, config=DigitsConfig())


def test_low_digit_option() -> None:
    cfg = DigitsConfig(family="depth", depth_low_digit=0)
    seen = {x for i in range(300) for x in make_problem(0, "train", i, config=cfg).digits}
    assert seen == set(range(10))


def test_level1_letter() -> None:
    """Level 1 asks for ``a`` unless ``depth_any_letter``; the digits drawn are the same."""
    anyl = DigitsConfig(family="depth", depth_any_letter=True)
    letters, any_letters = set(), set()
    for i in range(200):
        p, q = make_problem(0, "train", i, config=DEPTH), make_problem(0, "train", i, config=anyl)
        assert p.digits == q.digits and p.image_indices == q.image_indices
        if p.difficulty == 1:
            letters.add(p.question.split("Compute ")[1][0])
            any_letters.add(q.question.split("Compute ")[1][0])
        else:
            assert p == q
    assert letters == {"a"} and any_letters == set("abcd")


def test_depth_steps_table() -> None:
    d = (7, 8, 3, 5)
    assert depth_steps(1, d, 2) == ("c", 3, ["c=3"])
    assert depth_steps(2, d) == ("a+b", 15, ["a+b=7+8=15"])
    assert depth_steps(3, d) == ("a*b", 56, ["a*b=7*8=56"])
    assert depth_steps(4, d) == ("a*b+c", 59, ["a*b=7*8=56", "a*b+c=56+3=59"])
    assert depth_steps(5, d) == (
        "a*b+c*d",
        71,
        ["a*b=7*8=56", "c*d=3*5=15", "a*b+c*d=56+15=71"],
    )
    assert depth_steps(5, d, split_sum=True)[2][-1] == "a*b+c*d=56+15=66+5=71"
    assert depth_steps(5, (7, 8, 2, 5), split_sum=True)[2][-1] == "a*b+c*d=56+10=66"
    assert depth_steps(5, (7, 8, 2, 3), split_sum=True)[2][-1] == "a*b+c*d=56+6=62"


def test_samples_images_and_text_variant() -> None:
    pools = split_indices(0)
    test_scans = {int(x) for idx in pools["test"] for x in idx}
    for s, t in zip(
        generate_digits(30, seed=0, split="test", config=DEPTH),
        generate_digits(30, seed=0, split="test", text_only=True, config=DEPTH),
        strict=True,
    ):
        assert s.id.startswith("digits-depth-test-") and t.id.startswith("digits-depth-text-")
        assert response_mode(s.responses["thinking"]) == "thinking"  # type: ignore[index]
        assert response_mode(s.responses["non_thinking"]) == "non_thinking"  # type: ignore[index]
        img = Image.open(io.BytesIO(s.images[0]))  # type: ignore[arg-type]
        # four 28-px digits: 28 x 112 is already a multiple of 28 and >= min_pixels, so the
        # processor keeps it and each digit is exactly one merged vision token.
        assert img.size == (112, 28)
        assert smart_resize(28, 112, min_pixels=4 * 28 * 28) == (28, 112)
        assert t.images == [] and t.answer == s.answer and t.difficulty == s.difficulty
        assert t.conversations[0].content.startswith("Digits: ")
    for i in range(50):
        p = make_problem(0, "test", i, config=DEPTH)
        assert set(p.image_indices) <= test_scans
