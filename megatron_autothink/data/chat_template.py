"""Samples to chat messages to token ids with the loss mask: the training side of the chat format.

The format itself (thinking modes, prefills, the Jinja template and its Python twin) is defined
once in :mod:`megatron_autothink.modes`; this module adds what needs the data schema and a
tokenizer: :func:`turns_to_messages` (``<image>`` placeholders to image items) and
:func:`tokenize_messages` (ids whose assistant tokens are marked for the loss).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from megatron_autothink.data.schema import IMAGE_PLACEHOLDER, Turn
from megatron_autothink.modes import (
    DEFAULT_SYSTEM,
    Message,
    ThinkingMode,
    render_messages_with_spans,
)


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
    """Render (:func:`~megatron_autothink.modes.render_messages_with_spans`) and tokenize a
    conversation; mark the assistant tokens for the loss.

    The whole text is tokenized at once (so the ids equal ``tokenizer(jinja_text)``) and a token
    counts as assistant when its first character lies inside an assistant span.

    Args:
        tokenizer: HF fast tokenizer or ``tokenizers.Tokenizer``.
        messages: HF-style chat messages (see :func:`turns_to_messages`).
        add_generation_prompt: Append the generation prompt and prefill (prompts for RL).
        thinking_mode: Prefill selector, see :data:`~megatron_autothink.modes.PREFILLS`.
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
