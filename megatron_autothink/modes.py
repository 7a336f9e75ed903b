"""Thinking modes and the chat format: the one definition the whole stack reads.

R-4B (arXiv 2508.21113) trains one model that answers in two formats, with Qwen3's strings:

* thinking:      ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``
* non-thinking:  ``<think>\\n\\n</think>\\n\\n{answer}``  (an empty think block)

and switches between them at inference with a *thinking mode*, which is only a prefill of the
assistant turn (:data:`PREFILLS`): ``auto`` (nothing, the model decides), ``long`` (``<think>\\n``,
forced thinking), ``short`` (the empty think block, forced direct answer). A template cannot
constrain what comes after the prefill; the engine rule that makes forced modes forced lives in
``rollout.think_rule``.

Everything that renders, classifies or counts these formats imports them from here: the
training loader (:func:`render_messages_with_spans` gives the loss spans), the tokenizer builder
and every exported HF directory (:data:`CHAT_TEMPLATE`, the Jinja twin of the Python rendering:
the two agree character for character, ``tests/test_modes.py``), the rollout engine and eval
(:data:`PREFILLS`), the trainer's per-mode loss (:data:`MODE_IDS`) and the rewards
(:func:`think_mode`, :func:`is_thinking`).

Rendering (ChatML, Qwen2.5-VL's turns plus the prefill)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      (unless a system turn is given)
    <|im_start|>user\\n<|vision_start|><|image_pad|>*n<|vision_end|>question<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n…\\n</think>\\n\\nanswer<|im_end|>\\n
    <|im_start|>assistant\\n{prefill}                                  (add_generation_prompt)

An image item renders ``num_image_tokens`` pads (n = t*h*w // merge_size**2 of its grid); without
that key it renders ONE pad, which is what vLLM and HF processors expect (they expand it).
Videos render one ``<|video_pad|>``; ``add_vision_id`` prefixes ``Picture k: `` / ``Video k: ``
as Qwen2-VL's own template does. Deviation from Qwen3: earlier assistant turns keep their
reasoning (Qwen3's template strips it); our data is single-answer, and stripping would make the
training text differ from the data.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

__all__ = [
    "CHAT_TEMPLATE",
    "DEFAULT_SYSTEM",
    "EMPTY_THINK",
    "MODES",
    "MODE_IDS",
    "PREFILLS",
    "SPECIAL_TOKENS",
    "THINK_CLOSE",
    "THINK_OPEN",
    "THINK_TOKENS",
    "VISION_TOKENS",
    "ResponseMode",
    "ThinkingMode",
    "is_thinking",
    "mode_id",
    "render_messages",
    "render_messages_with_spans",
    "think_mode",
]

ThinkingMode = Literal["auto", "long", "short"]
"""How the assistant turn starts at inference (the R-4B switch)."""
MODES: tuple[ThinkingMode, ...] = ("auto", "long", "short")

ResponseMode = Literal["thinking", "non_thinking"]
"""Which of the two formats a response is written in."""

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
EMPTY_THINK = "<think>\n\n</think>\n\n"
"""The empty think block that opens every non-thinking response (and the ``short`` prefill)."""

PREFILLS: dict[ThinkingMode, str] = {"auto": "", "long": "<think>\n", "short": EMPTY_THINK}
"""What follows ``<|im_start|>assistant\\n`` in the generation prompt, per mode."""

MODE_IDS: dict[ResponseMode | None, int] = {"thinking": 1, "non_thinking": 0, None: -1}
"""Per-token mode labels of packed batches (``PackedBatch.mode_ids``): the trainer reports the
loss of thinking and non-thinking tokens apart; -1 marks tokens of neither (prompts, padding)."""


def mode_id(mode: ResponseMode | None) -> int:
    """The packed-batch label of a response mode (``None``: unknown, -1).

    Example:
        >>> mode_id("thinking"), mode_id("non_thinking"), mode_id(None)
        (1, 0, -1)
    """
    return MODE_IDS[mode]


DEFAULT_SYSTEM = "You are a helpful assistant."
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"

SPECIAL_TOKENS = (
    "<|endoftext|>",
    IM_START,
    IM_END,
    VISION_START,
    VISION_END,
    IMAGE_PAD,
    VIDEO_PAD,
)
"""Control tokens (special: stripped by ``skip_special_tokens``). ``<|video_pad|>`` is not used
by our data but HF/vLLM Qwen2.5-VL processors look it up."""
THINK_TOKENS = (THINK_OPEN, THINK_CLOSE)
"""Added but not special: kept when decoding, so the think block survives detokenization."""
VISION_TOKENS = (IMAGE_PAD, VISION_START, VISION_END, VIDEO_PAD)
"""Image placeholder and vision delimiters: input-only, never sampled (``rollout``)."""

# Every piece is an expression with `-` trimming, so the template's own layout adds no
# whitespace; jinja string literals turn '\n' into a newline as Python would. `raise_exception`
# is defined by transformers' and vLLM's template environments.
CHAT_TEMPLATE = (
    "{%- set ds = default_system if default_system is defined else '" + DEFAULT_SYSTEM + "' -%}"
    "{%- set tm = thinking_mode if thinking_mode is defined and thinking_mode else 'auto' -%}"
    "{%- if tm not in ['auto', 'long', 'short'] -%}"
    "{{- raise_exception('thinking_mode must be auto, long or short, got ' ~ tm) -}}"
    "{%- endif -%}"
    "{%- set image_count = namespace(value=0) -%}{%- set video_count = namespace(value=0) -%}"
    "{%- if ds and (messages | length == 0 or messages[0]['role'] != 'system') -%}"
    "{{- '<|im_start|>system\\n' + ds + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] in ['image', 'image_url'] or 'image' in item or 'image_url' in item -%}"
    "{%- set image_count.value = image_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Picture ' ~ image_count.value ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|>' + '<|image_pad|>' * (item['num_image_tokens'] "
    "if item['num_image_tokens'] is defined else 1) + '<|vision_end|>' -}}"
    "{%- elif item['type'] == 'video' or 'video' in item -%}"
    "{%- set video_count.value = video_count.value + 1 -%}"
    "{%- if add_vision_id -%}{{- 'Video ' ~ video_count.value ~ ': ' -}}{%- endif -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' or 'text' in item -%}"
    "{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{%- if tm == 'long' -%}{{- '<think>\\n' -}}"
    "{%- elif tm == 'short' -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)
"""The chat template of every tokenizer we build and every HF directory we export
(``tokenizer.apply_chat_template(..., thinking_mode="long")``; vLLM: ``chat_template_kwargs``)."""

Message = Mapping[str, Any]


def _render_content(
    content: str | Iterable[Mapping[str, Any]], add_vision_id: bool, counts: list[int]
) -> str:
    """``counts`` = [images, videos] so far: Qwen2-VL numbers them across the conversation."""
    if isinstance(content, str):
        return content
    out = []
    for item in content:
        kind = item.get("type")
        if kind in ("image", "image_url") or "image" in item or "image_url" in item:
            counts[0] += 1
            out.append(f"Picture {counts[0]}: " if add_vision_id else "")
            out.append(VISION_START + IMAGE_PAD * int(item.get("num_image_tokens", 1)) + VISION_END)
        elif kind == "video" or "video" in item:
            counts[1] += 1
            out.append(f"Video {counts[1]}: " if add_vision_id else "")
            out.append(VISION_START + VIDEO_PAD + VISION_END)
        elif kind == "text" or "text" in item:
            out.append(item["text"])
    return "".join(out)


def render_messages_with_spans(
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    thinking_mode: ThinkingMode = "auto",
    default_system: str | None = DEFAULT_SYSTEM,
    add_vision_id: bool = False,
) -> tuple[str, list[tuple[int, int]]]:
    """Render messages exactly like :data:`CHAT_TEMPLATE` and locate the trained characters.

    Args:
        messages: HF-style chat messages.
        add_generation_prompt: Append ``<|im_start|>assistant\\n`` and the prefill.
        thinking_mode: ``auto`` | ``long`` | ``short`` (only used with a generation prompt).
        default_system: System prompt used when the first message is not a system message
            (``None`` or "" for none).
        add_vision_id: Number the images and videos (``Picture 1: ``), as Qwen2-VL's template.

    Returns:
        The text and, per assistant message, the ``[start, end)`` character span of its content
        plus the closing ``<|im_end|>`` (the span the loss covers).

    Raises:
        ValueError: For a thinking mode other than auto / long / short.
    """
    if thinking_mode not in PREFILLS:
        raise ValueError(f"thinking_mode must be auto, long or short, got {thinking_mode!r}")
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0
    counts = [0, 0]

    def emit(s: str) -> None:
        nonlocal pos
        parts.append(s)
        pos += len(s)

    if default_system and (not messages or messages[0]["role"] != "system"):
        emit(f"{IM_START}system\n{default_system}{IM_END}\n")
    for message in messages:
        emit(f"{IM_START}{message['role']}\n")
        start = pos
        emit(_render_content(message["content"], add_vision_id, counts) + IM_END)
        if message["role"] == "assistant":
            spans.append((start, pos))
        emit("\n")
    if add_generation_prompt:
        emit(f"{IM_START}assistant\n{PREFILLS[thinking_mode]}")
    return "".join(parts), spans


def render_messages(
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    thinking_mode: ThinkingMode = "auto",
    default_system: str | None = DEFAULT_SYSTEM,
    add_vision_id: bool = False,
) -> str:
    """Render messages exactly like :data:`CHAT_TEMPLATE` (see :func:`render_messages_with_spans`).

    Example:
        >>> render_messages([{"role": "user", "content": "1+1?"}], add_generation_prompt=True,
        ...                 thinking_mode="short", default_system=None)
        '<|im_start|>user\\n1+1?<|im_end|>\\n<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n'
    """
    return render_messages_with_spans(
        messages,
        add_generation_prompt=add_generation_prompt,
        thinking_mode=thinking_mode,
        default_system=default_system,
        add_vision_id=add_vision_id,
    )[0]


# Only matched after checking there is exactly one of each tag, so the lazy group can end at
# one place only: linear.
_FORMAT_RE = re.compile(r"\A<think>\n(.*?)\n</think>\n\n(.*)\Z", re.DOTALL)


def think_mode(response: str) -> ResponseMode | Literal["invalid"]:
    r"""Classify a full assistant turn in R-4B's bi-mode format.

    Thinking is ``<think>\n{reasoning}\n</think>\n\n{answer}`` with non-blank reasoning;
    non-thinking is exactly ``<think>\n\n</think>\n\n{answer}``. Exactly one of each tag and a
    non-blank answer are required; a whitespace-only think block other than the canonical empty
    one is invalid (it is neither mode the template can produce). Pass the text *including*
    any forced prefill (``long``/``short`` modes put ``<think>\n`` in the prompt).

    Args:
        response: Full assistant turn.

    Returns:
        ``"thinking"``, ``"non_thinking"`` or ``"invalid"``.

    Example:
        >>> think_mode("<think>\n2+2=4\n</think>\n\n4")
        'thinking'
        >>> think_mode("<think>\n\n</think>\n\n4")
        'non_thinking'
        >>> think_mode("<think>\n\n</think>\n\n")
        'invalid'
        >>> think_mode("4")
        'invalid'
    """
    if response.count(THINK_OPEN) != 1 or response.count(THINK_CLOSE) != 1:
        return "invalid"
    m = _FORMAT_RE.match(response)
    if m is None:
        return "invalid"
    thought, answer = m.group(1), m.group(2)
    if not answer.strip():
        return "invalid"
    if thought == "":
        return "non_thinking"
    if not thought.strip():
        return "invalid"
    return "thinking"


def is_thinking(response: str) -> bool:
    r"""Whether the response opened a non-empty think block (R-4B "thinking trigger rate").

    Deliberately lenient: a think block cut off by the length limit (no ``</think>``) still
    counts, because the metric asks whether the model *chose* to think, not whether it
    finished.

    Example:
        >>> is_thinking("<think>\nlet me see"), is_thinking("<think>\n\n</think>\n\n4")
        (True, False)
        >>> is_thinking("4")
        False
    """
    start = response.find(THINK_OPEN)
    if start < 0:
        return False
    start += len(THINK_OPEN)
    end = response.find(THINK_CLOSE, start)
    return bool(response[start : end if end >= 0 else len(response)].strip())
