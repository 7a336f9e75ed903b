"""Typed hand-offs between the RL roles (rollout -> reward -> advantage -> trainer).

These are plain dataclasses with shape comments, not a dict bag: every field a stage reads is
named here, so a missing field fails at construction time instead of deep inside the loss.
Nothing in this module touches process groups or devices.

Shape legend: ``B`` rollouts in the batch, ``T`` padded sequence length (prompt + response).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

ThinkMode = Literal["thinking", "non_thinking"]
"""The two R-4B answer modes (arXiv 2508.21113): a non-empty or an empty ``<think>`` block."""

THINK_MODES: tuple[ThinkMode, ThinkMode] = ("thinking", "non_thinking")


@dataclass(slots=True)
class RolloutSample:
    """One sampled response, as produced by the rollout engine and annotated by later stages.

    Example:
        >>> s = RolloutSample(prompt_id=3, mode="thinking", response_ids=[11, 12, 2],
        ...                   response_logprobs=[-0.1, -0.5, -0.01], text="<think>\\nhi\\n</think>\\n\\n4",
        ...                   finished=True)
        >>> s.num_tokens, s.reward, s.advantage
        (3, 0.0, 0.0)
    """

    prompt_id: int
    """Index of the prompt (group) this response belongs to."""
    mode: ThinkMode
    """Forced (BPO) or observed mode of the response."""
    response_ids: list[int]
    """Generated token ids, EOS included when ``finished``."""
    response_logprobs: list[float]
    """Sampler log-probabilities of ``response_ids`` (same length), for mismatch diagnostics."""
    text: str
    """Decoded response text (special tokens skipped), including any forced prefill."""
    finished: bool
    """True when generation stopped on EOS, False when it hit the length limit."""
    reward: float = 0.0
    """Scalar reward, filled in by the reward stage."""
    correct: bool = False
    """Whether the final answer was judged correct (accuracy, independent of format terms)."""
    advantage: float = 0.0
    """Group-relative advantage, filled in by the advantage stage."""

    def __post_init__(self) -> None:
        if len(self.response_ids) != len(self.response_logprobs):
            raise ValueError(
                f"response_ids ({len(self.response_ids)}) and response_logprobs "
                f"({len(self.response_logprobs)}) differ in length"
            )

    @property
    def num_tokens(self) -> int:
        """Number of generated tokens."""
        return len(self.response_ids)


@dataclass(slots=True)
class RolloutBatch:
    """Padded tensors for one training micro-batch, ready for ``policy_loss``.

    Example:
        >>> b = RolloutBatch(tokens=torch.zeros(2, 5, dtype=torch.long),
        ...                  response_mask=torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]]).bool(),
        ...                  old_logp=torch.zeros(2, 5), advantages=torch.tensor([0.5, -0.5]),
        ...                  modes=["thinking", "non_thinking"], prompt_ids=[0, 0])
        >>> b.batch_size, b.num_response_tokens
        (2, 6)
    """

    tokens: torch.Tensor
    """[B, T] long: prompt + response token ids, right padded."""
    response_mask: torch.Tensor
    """[B, T] bool: True on response tokens that enter the loss (prompt and padding are False)."""
    old_logp: torch.Tensor
    """[B, T] float: log-probs of ``tokens`` under the policy that generated them (no grad)."""
    advantages: torch.Tensor
    """[B] float: one advantage per sequence (outcome reward, broadcast over its tokens)."""
    modes: list[ThinkMode]
    """[B] mode of each rollout (for per-mode metrics)."""
    prompt_ids: list[int]
    """[B] group index of each rollout."""
    ref_logp: torch.Tensor | None = None
    """[B, T] float or None: reference-policy log-probs, only when a KL term is used."""
    nll_mask: torch.Tensor | None = None
    """[B] bool or None: sequences that also get the auxiliary NLL term (VL-Rethinker)."""
    is_replay: torch.Tensor | None = None
    """[B] bool or None: True for samples drawn from the SSR replay buffer."""
    extras: dict[str, torch.Tensor] = field(default_factory=dict)
    """Named per-sequence [B] or per-token [B, T] tensors for model inputs (e.g. image grids)."""

    def __post_init__(self) -> None:
        if self.tokens.dim() != 2:
            raise ValueError(f"tokens must be [B, T], got {tuple(self.tokens.shape)}")
        bsz, seq = self.tokens.shape
        for name in ("response_mask", "old_logp", "ref_logp"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (bsz, seq):
                raise ValueError(f"{name} must be [{bsz}, {seq}], got {tuple(value.shape)}")
        for name in ("advantages", "nll_mask", "is_replay"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != (bsz,):
                raise ValueError(f"{name} must be [{bsz}], got {tuple(value.shape)}")
        if len(self.modes) != bsz or len(self.prompt_ids) != bsz:
            raise ValueError("modes and prompt_ids must have one entry per row")

    @property
    def batch_size(self) -> int:
        """Number of rollouts B."""
        return int(self.tokens.shape[0])

    @property
    def num_response_tokens(self) -> int:
        """Local loss-token count; all-reduce it across ranks to get ``num_tokens_global``."""
        return int(self.response_mask.sum().item())
