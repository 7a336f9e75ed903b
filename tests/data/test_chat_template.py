"""The Jinja template and the Python renderer agree; the loss mask covers assistant tokens only."""

from __future__ import annotations

from typing import Any

import pytest

from megatron_autothink.data.chat_template import (
    CHAT_TEMPLATE,
    PREFILLS,
    render_messages,
    tokenize_messages,
    turns_to_messages,
)
from megatron_autothink.data.schema import Turn

THINK = "<think>\nread 3 and 4\n3+4 = 7.\n</think>\n\nThe answer is \\boxed{7}."
DIRECT = "<think>\n\n</think>\n\nThe answer is \\boxed{7}."

CONVERSATIONS: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "What is 3+4?"}],
    [{"role": "user", "content": "What is 3+4?"}, {"role": "assistant", "content": THINK}],
    [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "image", "num_image_tokens": 5},
                {"type": "text", "text": "Add the digits."},
            ],
        },
        {"role": "assistant", "content": DIRECT},
        {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "image"}]},
        {"role": "assistant", "content": "plain answer\nwith lines\n"},
    ],
    [{"role": "user", "content": " leading space\n\n\nnewlines "}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("mode", ["auto", "long", "short"])
@pytest.mark.parametrize("system", ["You are a helpful assistant.", None])
def test_jinja_equals_python(
    tokenizer: Any, messages: list[dict[str, Any]], gen: bool, mode: str, system: str | None
) -> None:
    kwargs: dict[str, Any] = {"add_generation_prompt": gen, "thinking_mode": mode}
    if system is None:
        kwargs["default_system"] = ""
    jinja = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    python = render_messages(
        messages,
        add_generation_prompt=gen,
        thinking_mode=mode,
        default_system=system,  # type: ignore[arg-type]
    )
    assert jinja == python
    if gen:
        assert python.endswith("<|im_start|>assistant\n" + PREFILLS[mode])


def test_template_is_the_saved_one(tokenizer: Any) -> None:
    assert tokenizer.chat_template == CHAT_TEMPLATE


def test_bad_thinking_mode(tokenizer: Any) -> None:
    with pytest.raises(ValueError):
        render_messages(CONVERSATIONS[0], thinking_mode="medium")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="thinking_mode"):
        tokenizer.apply_chat_template(CONVERSATIONS[0], tokenize=False, thinking_mode="medium")


def test_turns_to_messages_images() -> None:
    turns = [Turn(role="user", content="<image>\nA <image>B"), Turn(role="assistant", content="x")]
    msgs = turns_to_messages(turns, [2, 3])
    assert msgs[0]["content"] == [
        {"type": "image", "num_image_tokens": 2},
        {"type": "text", "text": "A "},
        {"type": "image", "num_image_tokens": 3},
        {"type": "text", "text": "B"},
    ]
    text = render_messages(msgs, default_system=None)
    assert text.startswith(
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 2 + "<|vision_end|>A "
    )
    with pytest.raises(ValueError):
        turns_to_messages(turns, [2])


def test_ids_and_assistant_mask(tokenizer: Any) -> None:
    messages = CONVERSATIONS[2]
    tc = tokenize_messages(tokenizer, messages)
    assert tc.ids == tokenizer(tc.text, add_special_tokens=False)["input_ids"]
    # The masked tokens decode to exactly the assistant contents, each closed by <|im_end|>.
    runs, cur = [], []
    for tok, m in zip(tc.ids, tc.assistant_mask, strict=True):
        if m:
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    decoded = [tokenizer.decode(r) for r in runs]
    assert decoded == [DIRECT + "<|im_end|>", "plain answer\nwith lines\n<|im_end|>"]
    prompt = tokenize_messages(tokenizer, messages[:2], add_generation_prompt=True)
    assert sum(prompt.assistant_mask) == 0
