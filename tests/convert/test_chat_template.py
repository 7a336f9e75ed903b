"""The exported chat template: Qwen2.5-VL's turns plus ``thinking_mode`` auto / long / short."""

from __future__ import annotations

import pytest

from megatron_autothink.convert.chat_template import THINKING_CHAT_TEMPLATE, THINKING_PREFILLS
from tests.convert.hf_utils import tiny_tokenizer

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit?"}]},
    {"role": "assistant", "content": "<think>\nround\n</think>\n\n0"},
    {"role": "user", "content": [{"type": "text", "text": "And this?"}, {"type": "image"}]},
]
HISTORY = (
    "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Which digit?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\nround\n</think>\n\n0<|im_end|>\n"
    "<|im_start|>user\nAnd this?<|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
)


@pytest.mark.parametrize("mode", ["auto", "long", "short", None])
def test_generation_prompt_per_mode(mode: str | None) -> None:
    tok = tiny_tokenizer(THINKING_CHAT_TEMPLATE)
    kwargs = {} if mode is None else {"thinking_mode": mode}
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False, **kwargs)
    assert text == HISTORY + "<|im_start|>assistant\n" + THINKING_PREFILLS[mode or "auto"]


def test_prefills_are_r4b_strings() -> None:
    assert THINKING_PREFILLS == {
        "auto": "",
        "long": "<think>\n",
        "short": "<think>\n\n</think>\n\n",
    }


def test_default_system_prompt_and_no_generation_prompt() -> None:
    tok = tiny_tokenizer(THINKING_CHAT_TEMPLATE)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, thinking_mode="long"
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
    )


def test_vision_ids() -> None:
    tok = tiny_tokenizer(THINKING_CHAT_TEMPLATE)
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_vision_id=True)
    assert "Picture 1: <|vision_start|>" in text and "Picture 2: <|vision_start|>" in text


def test_unknown_mode_is_an_error() -> None:
    tok = tiny_tokenizer(THINKING_CHAT_TEMPLATE)
    with pytest.raises(Exception, match="thinking_mode must be auto, long or short"):
        tok.apply_chat_template(
            MESSAGES, add_generation_prompt=True, tokenize=False, thinking_mode="x"
        )
