"""The one chat format (megatron_autothink.modes): the Jinja template every tokenizer and export
carries renders exactly what the training loader's Python renderer does, per thinking mode; the
format classifiers read the two R-4B formats and nothing else, in linear time."""

from __future__ import annotations

from typing import Any

import pytest

from megatron_autothink.modes import (
    CHAT_TEMPLATE,
    EMPTY_THINK,
    MODE_IDS,
    MODES,
    PREFILLS,
    is_thinking,
    render_messages,
    think_mode,
)
from tests.convert.hf_utils import tiny_tokenizer

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
    # What HF / vLLM clients send: image URLs, items keyed without "type", videos.
    [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "file:///a.png"}},
                {"image": "b.png"},
                {"type": "video", "video": "c.mp4"},
                {"text": "Compare them."},
            ],
        }
    ],
]


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return tiny_tokenizer(CHAT_TEMPLATE)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("system", ["You are a helpful assistant.", None])
@pytest.mark.parametrize("vision_id", [False, True])
def test_jinja_equals_python(
    tokenizer: Any,
    messages: list[dict[str, Any]],
    gen: bool,
    mode: str,
    system: str | None,
    vision_id: bool,
) -> None:
    kwargs: dict[str, Any] = {"add_generation_prompt": gen, "thinking_mode": mode}
    if system is None:
        kwargs["default_system"] = ""
    if vision_id:
        kwargs["add_vision_id"] = True
    jinja = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    python = render_messages(
        messages,
        add_generation_prompt=gen,
        thinking_mode=mode,  # type: ignore[arg-type]
        default_system=system,
        add_vision_id=vision_id,
    )
    assert jinja == python
    if gen:
        assert python.endswith("<|im_start|>assistant\n" + PREFILLS[mode])  # type: ignore[index]


def test_rendering_of_a_multimodal_history(tokenizer: Any) -> None:
    text = tokenizer.apply_chat_template(
        CONVERSATIONS[2] + CONVERSATIONS[4], tokenize=False, add_vision_id=True
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nPicture 1: <|vision_start|>" + "<|image_pad|>" * 5 + "<|vision_end|>"
        "Add the digits.<|im_end|>\n"
        f"<|im_start|>assistant\n{DIRECT}<|im_end|>\n"
        "<|im_start|>user\nAnd Picture 2: <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
        "<|im_start|>assistant\nplain answer\nwith lines\n<|im_end|>\n"
        "<|im_start|>user\nPicture 3: <|vision_start|><|image_pad|><|vision_end|>"
        "Picture 4: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>Compare them.<|im_end|>\n"
    )


@pytest.mark.parametrize("mode", [*MODES, None])
def test_generation_prompt_per_mode(tokenizer: Any, mode: str | None) -> None:
    kwargs = {} if mode is None else {"thinking_mode": mode}
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False, **kwargs
    )
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" + PREFILLS[mode or "auto"]  # type: ignore[index]
    )


def test_prefills_are_r4b_strings_and_produce_their_format() -> None:
    assert PREFILLS == {"auto": "", "long": "<think>\n", "short": "<think>\n\n</think>\n\n"}
    assert think_mode(PREFILLS["short"] + "4") == "non_thinking"
    assert think_mode(PREFILLS["long"] + "2+2=4\n</think>\n\n4") == "thinking"
    assert PREFILLS["short"] == EMPTY_THINK and MODE_IDS["thinking"] != MODE_IDS["non_thinking"]


def test_unknown_mode_is_an_error(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="thinking_mode"):
        render_messages(CONVERSATIONS[1], thinking_mode="medium")  # type: ignore[arg-type]
    with pytest.raises(Exception, match="thinking_mode must be auto, long or short, got medium"):
        tokenizer.apply_chat_template(
            CONVERSATIONS[1], add_generation_prompt=True, tokenize=False, thinking_mode="medium"
        )


@pytest.mark.parametrize(
    ("response", "mode"),
    [
        ("<think>\nreason\n</think>\n\nB", "thinking"),
        ("<think>\nline1\n\nline2\n</think>\n\nthe answer is 4\n", "thinking"),
        ("<think>\n\n</think>\n\nB", "non_thinking"),
        ("<think>\n \n</think>\n\nB", "invalid"),  # blank but not the canonical empty block
        ("<think>\nreason\n</think>\n\n", "invalid"),  # missing answer
        ("<think>\n\n</think>\n\n  \n", "invalid"),  # blank answer
        ("<think>reason</think>B", "invalid"),  # wrong newlines
        ("<think>\nreason\n</think>\nB", "invalid"),  # single newline before answer
        ("x<think>\nreason\n</think>\n\nB", "invalid"),  # text before the block
        ("<think>\na\n</think>\n\n<think>\nb\n</think>\n\nB", "invalid"),  # two blocks
        ("<think>\nno end", "invalid"),
        ("B", "invalid"),
    ],
)
def test_think_mode(response: str, mode: str) -> None:
    assert think_mode(response) == mode


@pytest.mark.parametrize(
    ("response", "thinking"),
    [
        ("<think>\nreason\n</think>\n\nB", True),
        ("<think>\n\n</think>\n\nB", False),
        ("<think>\nstill thinking when the limit hit", True),
        ("<think>\n   ", False),
        ("plain answer", False),
    ],
)
def test_is_thinking(response: str, thinking: bool) -> None:
    assert is_thinking(response) is thinking


# A degenerate policy's text must not stall the trainer (issue #21 item 7); far above the
# expected milliseconds so a loaded CI box does not flake.
@pytest.mark.timeout(5)
def test_degenerate_text_is_classified_in_linear_time() -> None:
    text = "<think>\n" + "<think>" * 8000
    assert think_mode(text) == "invalid" and is_thinking(text)
