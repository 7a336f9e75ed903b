"""Typed hand-offs between the RL roles: the sample the trainer trains and SSR replays.

:class:`TrainSample` is what :func:`~megatron_autothink.rl.trainer.select_training_set` hands
to the update, and what the SSR buffer keeps (and checkpoints) for later replays: token ids,
log-probs, advantage and the images *as encoded in the shard*, never decoded pixel tensors, so
host RAM and checkpoint size are bounded by the buffer's capacity times the size of a sample's
tokens and compressed images (:meth:`TrainSample.nbytes`). Nothing in this module touches
process groups or devices.

Shape legend: ``P`` prompt tokens (images expanded to their pad tokens), ``F`` forced prefill
tokens, ``R`` response tokens, ``K`` target tokens (``R``, or ``F + R`` when the prefill is
trained, BPO's ``train_decision``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(slots=True)
class TrainSample:
    """One rollout as the trainer trains it and SSR's buffer stores it.

    ``behaviour_logprobs`` are the trainer's log-probs of the target tokens under the policy
    that generated the sample, computed once in the step that generated it (the engine's
    log-probs are checked against them there, ``mismatch/*``). A replay in a later step uses
    them as ``old_logp``, so its importance ratio is ``pi_now / pi_behaviour`` and the clip
    acts on it (see :mod:`megatron_autothink.rl.trainer`).

    Example:
        >>> s = TrainSample(sample_id=7, version=3, prompt_ids=torch.tensor([1, 2], dtype=torch.int32),
        ...                 prefill_ids=torch.tensor([], dtype=torch.int32),
        ...                 response_ids=torch.tensor([5, 6, 2], dtype=torch.int32),
        ...                 engine_logprobs=torch.tensor([-0.5, -1.0, -0.1]), advantage=0.5,
        ...                 mode_id=1, correct=True, image_bytes=[b"\\x89PNG..."])
        >>> s.nbytes()  # 8 + 0 + 12 + 12 bytes of tensors + 7 image bytes
        39
        >>> TrainSample.from_state_dict(s.state_dict()) == s
        True
    """

    sample_id: int
    """Unique within the stage (the SSR record id)."""
    version: int
    """RL step (policy version) that generated it."""
    prompt_ids: torch.Tensor
    """[P] int32 chat prompt."""
    prefill_ids: torch.Tensor
    """[F] int32 forced mode prefill (BPO), empty in ``auto`` mode."""
    response_ids: torch.Tensor
    """[R] int32 response (EOS included when finished; a rethink prefix included)."""
    engine_logprobs: torch.Tensor
    """[R] float32 rollout engine log-probs; NaN where the engine did not sample."""
    advantage: float
    mode_id: int
    """1 thinking, 0 non-thinking."""
    correct: bool
    image_bytes: list[bytes]
    """The prompt's images as stored in the shard (PNG/JPEG), re-decoded for training."""
    behaviour_logprobs: torch.Tensor | None = None
    """[K] float32 trainer log-probs of the targets under the generating policy; None until the
    generating step computed them."""
    decision_index: int = -1
    """BPO: target index of the mode decision (:func:`~megatron_autothink.rl.bpo.decision_position`),
    -1 when it has none (auto mode, the prefill not trained, or no response tokens)."""
    decision_weight: float = 1.0
    """BPO ``decision_weighting=importance``: ``pi(mode) / q(mode)`` under the generating policy,
    multiplied into the advantage of the decision target only."""

    def nbytes(self) -> int:
        """Host bytes of the tensors and image bytes (what a buffered sample costs)."""
        tensors = (self.prompt_ids, self.prefill_ids, self.response_ids, self.engine_logprobs)
        n = sum(t.numel() * t.element_size() for t in tensors)
        if self.behaviour_logprobs is not None:
            n += self.behaviour_logprobs.numel() * self.behaviour_logprobs.element_size()
        return n + sum(len(b) for b in self.image_bytes)

    def state_dict(self) -> dict[str, Any]:
        """Tensors, bytes and plain scalars only: loads with ``torch.load(weights_only=True)``."""
        return {
            "sample_id": self.sample_id,
            "version": self.version,
            "prompt_ids": self.prompt_ids,
            "prefill_ids": self.prefill_ids,
            "response_ids": self.response_ids,
            "engine_logprobs": self.engine_logprobs,
            "advantage": self.advantage,
            "mode_id": self.mode_id,
            "correct": self.correct,
            "image_bytes": list(self.image_bytes),
            "behaviour_logprobs": self.behaviour_logprobs,
            "decision_index": self.decision_index,
            "decision_weight": self.decision_weight,
        }

    @classmethod
    def from_state_dict(cls, s: dict[str, Any]) -> TrainSample:
        return cls(
            sample_id=int(s["sample_id"]),
            version=int(s["version"]),
            prompt_ids=s["prompt_ids"],
            prefill_ids=s["prefill_ids"],
            response_ids=s["response_ids"],
            engine_logprobs=s["engine_logprobs"],
            advantage=float(s["advantage"]),
            mode_id=int(s["mode_id"]),
            correct=bool(s["correct"]),
            image_bytes=[bytes(b) for b in s["image_bytes"]],
            behaviour_logprobs=s["behaviour_logprobs"],
            # buffers checkpointed before decision weighting existed load unweighted
            decision_index=int(s.get("decision_index", -1)),
            decision_weight=float(s.get("decision_weight", 1.0)),
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TrainSample):
            return NotImplemented
        a, b = self.state_dict(), other.state_dict()
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)


def _same(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return (
            isinstance(x, torch.Tensor)
            and isinstance(y, torch.Tensor)
            and x.dtype == y.dtype
            and torch.equal(x.nan_to_num(0.0), y.nan_to_num(0.0))
            and torch.equal(x.isnan(), y.isnan())
        )
    return bool(x == y)


@dataclass(frozen=True, slots=True)
class RolloutRecord:
    """One line of ``<run>/rollouts/<stage>.jsonl``: what was asked, in which mode, what came
    back. Gathered from every data-parallel rank to the first, which appends them."""

    step: int
    prompt_id: str
    difficulty: int | None
    mode: str  # the forced mode: "auto" | "long" | "short"
    thinking: bool  # the response has a non-empty think block
    reward: float
    correct: bool
    finished: bool  # ended with EOS, not at the token limit
    tokens: int  # response tokens
    rethink: str  # "" | "accepted" | "rejected:<reason>"
    text: str
