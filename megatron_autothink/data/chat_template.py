"""Qwen2.5-VL chat rendering with an R-4B style ``thinking_mode`` switch.

One format, two implementations that must agree character for character:

* :data:`CHAT_TEMPLATE`, a Jinja template for HF tokenizer dirs (``apply_chat_template``) and
  vLLM (``chat_template=``), and
* :func:`render_messages` / :func:`tokenize_messages`, the Python rendering the training loader
  uses, which also knows which characters belong to assistant turns (for the loss mask).

Rendering (Qwen2.5-VL's template plus the prefill)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n      (unless a system turn is given)
    <|im_start|>user\\n<|vision_start|><|image_pad|>*n<|vision_end|>question<|im_end|>\\n
    <|im_start|>assistant\\n<think>\\n…\\n</think>\\n\\nanswer<|im_end|>\\n
    <|im_start|>assistant\\n{prefill}                                  (add_generation_prompt)

``thinking_mode`` picks the prefill after the generation prompt: ``auto`` = "" (the model
decides), ``long`` = ``<think>\\n`` (forced thinking), ``short`` = the empty think block
(forced non-thinking). R-4B did not publish its template; the strings follow Qwen3.

An image item renders ``num_image_tokens`` pads (n = t*h*w // merge_size**2 of its grid). Without
that key it renders ONE pad, which is what vLLM and HF processors expect (they expand it).

Deviation from Qwen3: earlier assistant turns keep their reasoning (Qwen3's template strips it);
our data is single-answer, and stripping would make the training text differ from the data.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from megatron_autothink.data.schema import EMPTY_THINK, IMAGE_PLACEHOLDER, Turn

ThinkingMode = Literal["auto", "long", "short"]

#: The assistant prefill per thinking mode (appended after ``<|im_start|>assistant\n``).
PREFILLS: dict[str, str] = {"auto": "", "long": "<think>\n", "short": EMPTY_THINK}
DEFAULT_SYSTEM = "You are a helpful assistant."

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"

# Every piece is an expression with `-` trimming, so the template's own layout adds no
# whitespace; jinja string literals turn '\n' into a newline as Python would.
CHAT_TEMPLATE = (
    "{%- set ds = default_system if default_system is defined else '" + DEFAULT_SYSTEM + "' -%}"
    "{%- set tm = thinking_mode if thinking_mode is defined and thinking_mode else 'auto' -%}"
    "{%- if tm not in ['auto', 'long', 'short'] -%}"
    "{{- raise_exception('thinking_mode must be auto, long or short') -}}"
    "{%- endif -%}"
    "{%- if ds and (messages | length == 0 or messages[0]['role'] != 'system') -%}"
    "{{- '<|im_start|>system\\n' + ds + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] in ['image', 'image_url'] -%}"
    "{{- '<|vision_start|>' + '<|image_pad|>' * (item['num_image_tokens'] "
    "if item['num_image_tokens'] is defined else 1) + '<|vision_end|>' -}}"
    "{%- elif item['type'] == 'text' -%}"
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

Message = Mapping[str, Any]


def turns_to_messages(
    turns: Sequence[Turn], image_token_counts: Sequence[int] | None = None
) -> list[dict[str, Any]]:
    """Convert schema turns to HF chat messages (content lists with image items).

    Each ``<image>`` placeholder becomes an image item; one newline right after a placeholder is
    dropped (LLaVA writes ``<image>\\nquestion``, Qwen renders the image directly before the text).

    Args:
        turns: The conversation.
        image_token_counts: Pads per image in order of appearance (``None``: one pad each).

    Returns:
        Messages as ``[{"role": ..., "content": str | list[item]}]``.

    Example:
        >>> turns_to_messages([Turn(role="user", content="<image>\\nHi")], [4])
        [{'role': 'user', 'content': [{'type': 'image', 'num_image_tokens': 4}, {'type': 'text', 'text': 'Hi'}]}]
    """
    messages: list[dict[str, Any]] = []
    image_idx = 0
    for turn in turns:
        if IMAGE_PLACEHOLDER not in turn.content:
            messages.append({"role": turn.role, "content": turn.content})
            continue
        items: list[dict[str, Any]] = []
        pieces = turn.content.split(IMAGE_PLACEHOLDER)
        for i, piece in enumerate(pieces):
            if i > 0:
                item: dict[str, Any] = {"type": "image"}
                if image_token_counts is not None:
                    if image_idx >= len(image_token_counts):
                        raise ValueError("more <image> placeholders than image_token_counts")
                    item["num_image_tokens"] = int(image_token_counts[image_idx])
                image_idx += 1
                items.append(item)
                piece = piece.removeprefix("\n")
            if piece:
                items.append({"type": "text", "text": piece})
        messages.append({"role": turn.role, "content": items})
    if image_token_counts is not None and image_idx != len(image_token_counts):
        raise ValueError(f"{len(image_token_counts)} image token counts for {image_idx} images")
    return messages


def _render_content(content: str | Iterable[Mapping[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    out = []
    for item in content:
        if item["type"] in ("image", "image_url"):
            out.append(VISION_START + IMAGE_PAD * int(item.get("num_image_tokens", 1)) + VISION_END)
        elif item["type"] == "text":
            out.append(item["text"])
    return "".join(out)


def render_messages_with_spans(
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    thinking_mode: ThinkingMode = "auto",
    default_system: str | None = DEFAULT_SYSTEM,
) -> tuple[str, list[tuple[int, int]]]:
    """Render messages exactly like :data:`CHAT_TEMPLATE` and locate the trained characters.

    Args:
        messages: HF-style chat messages.
        add_generation_prompt: Append ``<|im_start|>assistant\\n`` and the prefill.
        thinking_mode: ``auto`` | ``long`` | ``short`` (only used with a generation prompt).
        default_system: System prompt used when the first message is not a system message
            (``None`` or "" for none).

    Returns:
        The text and, per assistant message, the ``[start, end)`` character span of its content
        plus the closing ``<|im_end|>`` (the span the loss covers).
    """
    if thinking_mode not in PREFILLS:
        raise ValueError(f"thinking_mode must be auto, long or short, got {thinking_mode!r}")
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    pos = 0

    def emit(s: str) -> None:
        nonlocal pos
        parts.append(s)
        pos += len(s)

    if default_system and (not messages or messages[0]["role"] != "system"):
        emit(f"{IM_START}system\n{default_system}{IM_END}\n")
    for message in messages:
        emit(f"{IM_START}{message['role']}\n")
        start = pos
        emit(_render_content(message["content"]) + IM_END)
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
    )[0]


class _Encoding(Protocol):
    ids: list[int]
    offsets: list[tuple[int, int]]


class _RustTokenizer(Protocol):
    def encode(self, sequence: str, add_special_tokens: bool = ...) -> _Encoding: ...


def backend_tokenizer(tokenizer: Any) -> _RustTokenizer:
    """The Rust ``tokenizers.Tokenizer`` behind an HF fast tokenizer (or the object itself).

    We tokenize through it directly: it gives character offsets cheaply and skips the Python
    wrapper's per-call overhead, which dominates for short samples.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend  # type: ignore[no-any-return]
    if hasattr(tokenizer, "encode") and hasattr(tokenizer, "token_to_id"):
        return tokenizer  # type: ignore[no-any-return]
    raise TypeError(f"need an HF fast tokenizer or tokenizers.Tokenizer, got {type(tokenizer)}")


@dataclass(frozen=True)
class TokenizedConversation:
    """Token ids of a rendered conversation and its per-token assistant mask."""

    text: str
    """The rendered text (identical to the Jinja rendering)."""
    ids: list[int]
    """Token ids of ``text`` (no special tokens added by the tokenizer)."""
    assistant_mask: list[int]
    """1 for tokens of assistant content and its closing ``<|im_end|>``, else 0."""


def tokenize_messages(
    tokenizer: Any,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    thinking_mode: ThinkingMode = "auto",
    default_system: str | None = DEFAULT_SYSTEM,
) -> TokenizedConversation:
    """Render and tokenize a conversation; mark the assistant tokens for the loss.

    The whole text is tokenized at once (so the ids equal ``tokenizer(jinja_text)``) and a token
    counts as assistant when its first character lies inside an assistant span.

    Args:
        tokenizer: HF fast tokenizer or ``tokenizers.Tokenizer``.
        messages: HF-style chat messages (see :func:`turns_to_messages`).
        add_generation_prompt: Append the generation prompt and prefill (prompts for RL).
        thinking_mode: Prefill selector, see :data:`PREFILLS`.
        default_system: System prompt used when none is given.

    Returns:
        A :class:`TokenizedConversation`.
    """
    text, spans = render_messages_with_spans(
        messages,
        add_generation_prompt=add_generation_prompt,
        thinking_mode=thinking_mode,
        default_system=default_system,
    )
    enc = backend_tokenizer(tokenizer).encode(text, add_special_tokens=False)
    mask = [0] * len(enc.ids)
    if spans:
        span_idx = 0
        for i, (start, _end) in enumerate(enc.offsets):
            while span_idx < len(spans) and start >= spans[span_idx][1]:
                span_idx += 1
            if span_idx == len(spans):
                break
            if start >= spans[span_idx][0]:
                mask[i] = 1
    return TokenizedConversation(text=text, ids=list(enc.ids), assistant_mask=mask)
