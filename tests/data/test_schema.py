"""Schema validation: what is accepted and the errors for what is not."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from megatron_autothink.data.schema import Sample, Turn, response_mode, strip_think

THINK = "<think>\nreason\n</think>\n\n\\boxed{3}"
DIRECT = "<think>\n\n</think>\n\n\\boxed{3}"


def make(**kw: object) -> Sample:
    data: dict[str, object] = {
        "id": "s",
        "conversations": [
            {"role": "user", "content": "q"},
            {"role": "assistant", "content": THINK},
        ],
    }
    data.update(kw)
    return Sample.model_validate(data)


def test_valid_samples() -> None:
    s = make(mode="thinking", answer="3", answer_type="number", difficulty=2, source="x")
    assert s.final_mode() == "thinking"
    assert s.prompt_turns() == [Turn(role="user", content="q")]
    both = make(
        conversations=[{"role": "system", "content": "sys"}, {"role": "user", "content": "q"}],
        responses={"thinking": THINK, "non_thinking": DIRECT},
    )
    assert both.with_response("non_thinking")[-1].content == DIRECT
    assert (
        make(
            images=["a.png"],
            conversations=[
                {"role": "user", "content": "<image>\nq"},
                {"role": "assistant", "content": "plain"},
            ],
        ).final_mode()
        is None
    )


def test_response_mode() -> None:
    assert response_mode(THINK) == "thinking"
    assert response_mode(DIRECT) == "non_thinking"
    assert response_mode("42") is None
    assert strip_think(THINK) == "\\boxed{3}"
    for bad in (
        "<think>\nx</think>\n\n3",  # no newline before </think>
        "<think>\nx\n</think>\n3",  # one newline after
        "<think>\n\n</think>\n\n",  # empty answer
        "<think>\n \n</think>\n\n3",  # whitespace-only reasoning
        "answer <think>",  # stray tag
        "<think>\na\n</think>\n\nb\n</think>\n\nc",  # two closing tags
    ):
        with pytest.raises(ValueError):
            response_mode(bad)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"extra_field": 1}, "Extra inputs are not permitted"),
        ({"id": ""}, "at least 1 character"),
        ({"conversations": []}, "at least 1 item"),
        ({"conversations": [{"role": "bot", "content": "x"}]}, "Input should be"),
        ({"conversations": [{"role": "assistant", "content": DIRECT}]}, "first non-system"),
        (
            {"conversations": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
            "alternate",
        ),
        (
            {
                "conversations": [
                    {"role": "user", "content": "a"},
                    {"role": "system", "content": "s"},
                ]
            },
            "only allowed as the first",
        ),
        ({"images": ["a.png"]}, "1 image(s) but 0"),
        ({"images": [b""]}, "images[0] is empty"),
        (
            {
                "conversations": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "<think>x"},
                ]
            },
            "malformed think block",
        ),
        ({"mode": "non_thinking"}, "not in non_thinking format"),
        ({"answer": "3"}, "answer and answer_type"),
        ({"answer_type": "float", "answer": "3"}, "Input should be"),
        ({"difficulty": -1}, "greater than or equal"),
        ({"responses": {"thinking": THINK}}, "must end with a user turn"),
        (
            {
                "conversations": [{"role": "user", "content": "q"}],
                "responses": {"thinking": DIRECT},
            },
            "not in thinking format",
        ),
        (
            {
                "conversations": [{"role": "user", "content": "q"}],
                "responses": {"thinking": THINK},
                "mode": "non_thinking",
            },
            "no such entry",
        ),
        ({"conversations": [{"role": "user", "content": "q"}], "mode": "thinking"}, "no final"),
    ],
)
def test_invalid_samples(kw: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        make(**kw)
