"""Samples to messages to ids: the loss mask covers assistant tokens only (the template itself:
tests/test_modes.py)."""

from __future__ import annotations

from typing import Any

import pytest

from megatron_autothink.data.chat_template import tokenize_messages, turns_to_messages
from megatron_autothink.data.schema import Turn
from megatron_autothink.modes import CHAT_TEMPLATE, render_messages

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


def test_template_is_the_saved_one(tokenizer: Any) -> None:
    assert tokenizer.chat_template == CHAT_TEMPLATE


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
