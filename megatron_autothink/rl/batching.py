"""Rollouts -> packed megatron micro-batches with per-token RL tensors.

A rollout's training sequence is ``prompt + prefill + response``; only the response tokens are
targets (the prefill was forced, not sampled). Sequences are packed first-fit into rows of
``seq_length`` exactly like SFT data (same :mod:`megatron_autothink.data.packing` code, so
attention stays inside each sequence and mRoPE positions restart per sequence). Per-token
tensors sit at *label* positions: position ``t`` carries values for the token at ``t + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from megatron_autothink.data.batch import PackedBatch
from megatron_autothink.data.packing import (
    EncodedSequence,
    collate_rows,
    first_fit_decreasing,
    mrope_position_ids,
    pack_row,
)


@dataclass
class TrainSequence:
    """One rollout ready for packing: a :class:`~megatron_autothink.rl.types.TrainSample` with
    its images decoded (transient: built per step, never stored)."""

    sample_index: int  # position in the step's sample list
    prompt_ids: list[int]  # [P] chat prompt (images expanded to their pad tokens)
    prefill_ids: list[int]  # [F] forced mode prefill
    response_ids: list[int]  # [R] sampled tokens (EOS included when finished)
    engine_logprobs: list[float]  # [R] rollout engine log-probs of response_ids
    advantage: float
    mode_id: int  # 1 thinking, 0 non-thinking, -1 unknown
    nll: bool = False  # receives VL-Rethinker's auxiliary NLL
    train_prefill: bool = False  # BPO: the forced mode prefill is a target too (the decision)
    pixel_values: Tensor | None = None  # [N, 1176]
    image_grid_thw: Tensor | None = None  # [M, 3]
    # [K] behaviour-policy log-probs of the targets (prefill first when train_prefill), packed
    # as old_logp; None when the trainer is about to compute them (the generating step)
    old_logprobs: list[float] | None = None
    replay: bool = False  # an SSR replay from an earlier step (off-policy)
    # BPO decision weighting: the advantage of target decision_target (-1: none) is scaled by
    # decision_weight (rl.bpo.decision_weights)
    decision_target: int = -1
    decision_weight: float = 1.0
    # BPO rl.bpo.prefill_anchor: the advantage of the targets before decision_target (the
    # opening both forced prefills share), None: the sample's own
    prefix_advantage: float | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.prefill_ids) + len(self.response_ids)


@dataclass
class RLMicroBatch:
    packed: PackedBatch  # loss_mask = 1 at label positions of response tokens
    advantages: Tensor  # [B, S] float
    engine_logp: Tensor  # [B, S] float, 0 off-target
    nll_mask: Tensor  # [B, S] bool
    sample_index: Tensor  # [B, S] long, -1 off-target
    replay_mask: Tensor  # [B, S] bool, targets of SSR replays
    old_logp: Tensor | None = None  # [B, S], behaviour policy (packed from old_logprobs)
    ref_logp: Tensor | None = None  # [B, S], frozen reference policy

    def to(self, device: torch.device) -> RLMicroBatch:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            packed=self.packed.to(device),
            advantages=self.advantages.to(device),
            engine_logp=self.engine_logp.to(device),
            nll_mask=self.nll_mask.to(device),
            sample_index=self.sample_index.to(device),
            replay_mask=self.replay_mask.to(device),
            old_logp=mv(self.old_logp),
            ref_logp=mv(self.ref_logp),
        )

    @property
    def num_target_tokens(self) -> int:
        return int(self.packed.loss_mask.sum())


def encode(seq: TrainSequence, image_token_id: int, merge: int = 2) -> EncodedSequence:
    ids = torch.tensor(seq.prompt_ids + seq.prefill_ids + seq.response_ids, dtype=torch.long)
    target = torch.zeros(len(ids), dtype=torch.bool)
    first = len(seq.prompt_ids) + (0 if seq.train_prefill else len(seq.prefill_ids))
    target[first:] = True
    grid = seq.image_grid_thw
    pos = mrope_position_ids(ids, grid, image_token_id, merge)
    return EncodedSequence(
        sample_id=str(seq.sample_index),
        tokens=ids,
        target_mask=target,
        position_ids=pos,
        mode_id=seq.mode_id,
        pixel_values=seq.pixel_values,
        image_grid_thw=grid,
    )


def pack_sequences(
    seqs: Sequence[TrainSequence],
    *,
    seq_length: int,
    micro_batch_size: int,
    pad_id: int,
    image_token_id: int,
) -> list[RLMicroBatch]:
    """First-fit pack into rows, then group rows into micro-batches of ``micro_batch_size``
    (the last one padded with empty rows so every micro-batch has the same shape, which
    megatron's pipeline schedules require). No sequences give one all-padding micro-batch: a
    data-parallel rank without samples still takes part in the optimizer step.

    ``old_logp`` is packed from the sequences' ``old_logprobs`` when all of them carry some,
    and left None when none does (the step that computes them); a mix is an error."""
    too_long = [s.sample_index for s in seqs if len(s) > seq_length]
    if too_long:
        raise ValueError(
            f"{len(too_long)} rollout sequences exceed data.seq_length={seq_length} "
            f"(samples {too_long[:5]}...): raise data.seq_length or lower rollout.max_new_tokens"
        )
    with_old = [s.old_logprobs is not None for s in seqs]
    if any(with_old) and not all(with_old):
        raise ValueError("either every sequence carries old_logprobs or none does")
    has_old = bool(seqs) and all(with_old)
    bins = first_fit_decreasing([len(s) for s in seqs], seq_length)
    rows = []
    extras = []
    for b in bins:
        members = [seqs[i] for i in b]
        rows.append(pack_row([encode(s, image_token_id) for s in members], seq_length, pad_id))
        adv = torch.zeros(seq_length)
        elp = torch.zeros(seq_length)
        nll = torch.zeros(seq_length, dtype=torch.bool)
        idx = torch.full((seq_length,), -1, dtype=torch.long)
        old = torch.zeros(seq_length)
        rep = torch.zeros(seq_length, dtype=torch.bool)
        start = 0
        for s in members:
            response_start = start + len(s.prompt_ids) + len(s.prefill_ids)
            first_target = response_start - (len(s.prefill_ids) if s.train_prefill else 0)
            # label position t predicts token t+1: target token at index i sits at label i-1
            a, e = first_target - 1, response_start - 1 + len(s.response_ids)
            adv[a:e] = s.advantage
            if s.decision_target >= 0:
                if s.decision_target >= e - a:
                    raise ValueError(
                        f"sample {s.sample_index}: decision target {s.decision_target} beyond "
                        f"its {e - a} target tokens"
                    )
                adv[a + s.decision_target] *= s.decision_weight
                if s.prefix_advantage is not None:
                    adv[a : a + s.decision_target] = s.prefix_advantage
            # the prefill was forced, not sampled: no engine log-prob there (left at 0)
            r0 = response_start - 1
            elp[r0:e] = torch.tensor(s.engine_logprobs[: e - r0], dtype=torch.float32)
            nll[a:e] = s.nll
            idx[a:e] = s.sample_index
            rep[a:e] = s.replay
            if s.old_logprobs is not None:
                if len(s.old_logprobs) != e - a:
                    raise ValueError(
                        f"sample {s.sample_index}: {len(s.old_logprobs)} old_logprobs for "
                        f"{e - a} target tokens"
                    )
                old[a:e] = torch.tensor(s.old_logprobs, dtype=torch.float32)
            start += len(s)
        extras.append((adv, elp, nll, idx, rep, old))
    while not rows or len(rows) % micro_batch_size:
        rows.append(pack_row([], seq_length, pad_id))
        extras.append(
            (
                torch.zeros(seq_length),
                torch.zeros(seq_length),
                torch.zeros(seq_length, dtype=torch.bool),
                torch.full((seq_length,), -1, dtype=torch.long),
                torch.zeros(seq_length, dtype=torch.bool),
                torch.zeros(seq_length),
            )
        )
    out = []
    for i in range(0, len(rows), micro_batch_size):
        chunk = slice(i, i + micro_batch_size)
        ex = extras[chunk]
        out.append(
            RLMicroBatch(
                packed=collate_rows(rows[chunk]),
                advantages=torch.stack([e[0] for e in ex]),
                engine_logp=torch.stack([e[1] for e in ex]),
                nll_mask=torch.stack([e[2] for e in ex]),
                sample_index=torch.stack([e[3] for e in ex]),
                replay_mask=torch.stack([e[4] for e in ex]),
                old_logp=torch.stack([e[5] for e in ex]) if has_old else None,
            )
        )
    return out


def per_sample_values(
    batches: Sequence[RLMicroBatch], values: Sequence[Tensor], num_samples: int
) -> list[list[float]]:
    """Undo the packing for a per-token result: for each ``sample_index`` in ``0..num_samples-1``,
    the values of ``values[i]`` (``[B, S]``, one per micro-batch, label positions as in
    ``batches``) at that sample's target positions, in sequence order.

    With ``compute_logprobs`` output this gives each response's log-probs token by token, the
    same layout as :attr:`TrainSequence.engine_logprobs` (plus the prefill first when
    ``train_prefill``).
    """
    out: list[list[float]] = [[] for _ in range(num_samples)]
    for mb, v in zip(batches, values, strict=True):
        for idx_row, v_row in zip(mb.sample_index, v, strict=True):
            at = idx_row >= 0
            for i, x in zip(idx_row[at].tolist(), v_row[at].tolist(), strict=True):
                out[i].append(x)
    return out
