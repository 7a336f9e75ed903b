"""The one sample schema every data source is converted into before sharding.

A :class:`Sample` is a multi-turn conversation plus optional ground truth and labels. Images are
referenced from user turns with ``<image>`` placeholders (LLaVA convention), one placeholder per
entry of ``images``, in order of appearance.

Assistant responses follow the bi-mode format of R-4B (arXiv 2508.21113), with Qwen3's strings:

* thinking:      ``<think>\\n{reasoning}\\n</think>\\n\\n{answer}``
* non-thinking:  ``<think>\\n\\n</think>\\n\\n{answer}``  (an empty think block)

A sample may carry both final answers in ``responses`` (the synthetic digits set does); the
conversation then ends with a user turn and the loader appends one of the two responses.

Example:
    >>> s = Sample(
    ...     id="x1",
    ...     images=["a.png"],
    ...     conversations=[
    ...         Turn(role="user", content="<image>\\nWhat is 2+2?"),
    ...         Turn(role="assistant", content="<think>\\n\\n</think>\\n\\n\\\\boxed{4}"),
    ...     ],
    ...     answer="4",
    ...     answer_type="number",
    ...     mode="non_thinking",
    ... )
    >>> s.final_mode()
    'non_thinking'
"""

from __future__ import annotations

import itertools
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from megatron_autothink.modes import THINK_CLOSE, THINK_OPEN, ResponseMode, think_mode

IMAGE_PLACEHOLDER = "<image>"

Role = Literal["system", "user", "assistant"]
Mode = ResponseMode
AnswerType = Literal["number", "expression", "choice", "text"]


def response_mode(text: str) -> Mode | None:
    """Classify an assistant response by its think block.

    Args:
        text: The assistant text.

    Returns:
        ``"thinking"`` or ``"non_thinking"`` for a well-formed response, ``None`` for text that
        does not start with ``<think>`` (a plain answer).

    Raises:
        ValueError: If the text starts with ``<think>`` but is not one of the two formats.

    Example:
        >>> response_mode("<think>\\n2+2=4\\n</think>\\n\\n4")
        'thinking'
        >>> response_mode("<think>\\n\\n</think>\\n\\n4")
        'non_thinking'
        >>> response_mode("4") is None
        True
    """
    if not text.startswith(THINK_OPEN):
        if THINK_OPEN in text or THINK_CLOSE in text:
            raise ValueError("a think block must open the response")
        return None
    mode = think_mode(text)
    if mode != "invalid":
        return mode
    raise ValueError(
        "malformed think block: expected '<think>\\n…\\n</think>\\n\\nanswer' (thinking) or "
        "'<think>\\n\\n</think>\\n\\nanswer' (non-thinking)"
    )


def strip_think(text: str) -> str:
    """Return the answer part of a response (everything after the think block).

    Example:
        >>> strip_think("<think>\\nsteps\\n</think>\\n\\n\\\\boxed{3}")
        '\\\\boxed{3}'
    """
    if text.startswith(THINK_OPEN) and THINK_CLOSE in text:
        return text.split(THINK_CLOSE, 1)[1].lstrip("\n")
    return text


class Turn(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    role: Role
    """Who speaks: ``system`` (only as the first turn), ``user`` or ``assistant``."""
    content: str
    """The text. User turns reference images with ``<image>`` placeholders."""


class Sample(BaseModel):
    """A training / evaluation sample (see the module docstring for the conventions)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    """Unique id within a dataset (kept through sharding; shard keys are positional)."""
    images: list[str | bytes] = Field(default_factory=list)
    """Image paths (prep input) or encoded bytes (after prep); empty for text-only samples."""
    conversations: list[Turn] = Field(min_length=1)
    """Optional system turn, then alternating user/assistant turns starting with a user turn."""
    responses: dict[Mode, str] | None = None
    """Alternative final assistant responses by mode; the conversation then ends with a user turn
    and the loader appends the response it picks (by ``mode`` or by a seeded draw)."""
    answer: str | None = None
    """Ground truth of the final question, e.g. ``"23"`` (used by rule-based rewards)."""
    answer_type: AnswerType | None = None
    """How ``answer`` is compared: ``number`` | ``expression`` | ``choice`` | ``text``."""
    mode: Mode | None = None
    """The mode label of the final response (``None``: unlabelled)."""
    difficulty: int | None = Field(default=None, ge=0)
    """Difficulty level (digits: 1..5); free scale for other sources."""
    source: str | None = None
    """Source tag, e.g. ``digits`` or the input file stem."""

    @field_validator("images")
    @classmethod
    def _images_not_empty(cls, images: list[str | bytes]) -> list[str | bytes]:
        for i, img in enumerate(images):
            if len(img) == 0:
                raise ValueError(f"images[{i}] is empty")
        return images

    @model_validator(mode="after")
    def _check(self) -> Sample:
        turns = self.conversations
        body = turns[1:] if turns[0].role == "system" else turns
        if any(t.role == "system" for t in body):
            raise ValueError("a system turn is only allowed as the first turn")
        if not body or body[0].role != "user":
            raise ValueError("the first non-system turn must be a user turn")
        for prev, cur in itertools.pairwise(body):
            if prev.role == cur.role:
                raise ValueError(f"turns must alternate user/assistant, got two {cur.role} turns")
        n_placeholders = sum(t.content.count(IMAGE_PLACEHOLDER) for t in turns)
        if any(IMAGE_PLACEHOLDER in t.content for t in turns if t.role != "user"):
            raise ValueError(f"{IMAGE_PLACEHOLDER} placeholders are only allowed in user turns")
        if n_placeholders != len(self.images):
            raise ValueError(
                f"{len(self.images)} image(s) but {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s)"
            )
        if (self.answer is None) != (self.answer_type is None):
            raise ValueError("answer and answer_type must be given together")

        assistant = [t.content for t in body if t.role == "assistant"]
        for text in assistant:
            response_mode(text)  # raises on a malformed think block
        if self.responses is not None:
            if not self.responses:
                raise ValueError("responses must not be empty when given")
            if body[-1].role != "user":
                raise ValueError("with responses, the conversation must end with a user turn")
            for mode, text in self.responses.items():
                if response_mode(text) != mode:
                    raise ValueError(f"responses[{mode!r}] is not in {mode} format")
            if self.mode is not None and self.mode not in self.responses:
                raise ValueError(f"mode={self.mode!r} but no such entry in responses")
        elif self.mode is not None:
            if body[-1].role != "assistant":
                raise ValueError("mode is set but the conversation has no final assistant turn")
            if response_mode(body[-1].content) != self.mode:
                raise ValueError(f"the final assistant turn is not in {self.mode} format")
        return self

    def has_assistant(self) -> bool:
        """Whether the sample carries something to train on (an assistant turn or responses)."""
        return self.responses is not None or any(t.role == "assistant" for t in self.conversations)

    def final_mode(self) -> Mode | None:
        """The mode of the final response: the label, else what its think block says."""
        if self.mode is not None:
            return self.mode
        if self.responses is not None and len(self.responses) == 1:
            return next(iter(self.responses))
        last = self.conversations[-1]
        return response_mode(last.content) if last.role == "assistant" else None

    def prompt_turns(self) -> list[Turn]:
        """The turns before the final assistant response (what an RL rollout is prompted with)."""
        turns = list(self.conversations)
        if self.responses is None and turns[-1].role == "assistant":
            turns.pop()
        return turns

    def with_response(self, mode: Mode) -> list[Turn]:
        """The conversation completed with ``responses[mode]`` (or as is without responses)."""
        if self.responses is None:
            return list(self.conversations)
        return [*self.conversations, Turn(role="assistant", content=self.responses[mode])]
