"""Which settings may change when a stage resumes from its own checkpoint (docs/training.md,
"Changing settings on resume").

A resume continues the checkpoint's model, optimizer, LR schedule, data position and random
streams. A setting changed since the checkpoint was saved is one of:

- *free*: it does not change what is trained (logging, checkpoint cadence, evaluation, the
  parallel layout, which the checkpoint loader reshards and reports, rollout engine memory
  knobs). Resumed, listed in ``resumes.jsonl``.
- *steps*: the stage's length (``train.steps`` or the stage's ``steps``). Resumed; the LR
  schedule is re-derived for the new length from the resumed step on, with a warning giving the
  LR before and after.
- *fixed*: the checkpoint's value would win or the resume cannot work (``train.seed``: the
  random streams are restored; ``model.*``; ``data.tokenizer_path``; ``data.num_workers``: the
  data position is saved per worker; ``optim.adam_*``, restored with the optimizer). Refused;
  change them by starting a new run from the checkpoint's weights (``train.init_from``).
- anything else (``optim.lr``, ``data.seq_length``, ``rl.*``, ...): refused unless listed in
  ``checkpoint.allow_changes``; then resumed with the new value in effect (schedule settings
  are re-applied to the LR schedule) and a warning that the run is no longer an exact
  continuation.

Starting a stage from the previous stage's weights, or a run from ``train.init_from``, is not a
resume: nothing is compared.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from megatron_autothink.checkpoint_io import CheckpointError
from megatron_autothink.config import AutothinkConfig

log = logging.getLogger(__name__)

FREE = (
    "recipe",
    "logging.",
    "checkpoint.",
    "parallel.",
    "train.log_every",
    "train.eval_every",
    "train.eval_steps",
    "train.init_from",  # only read when there is nothing to resume
    "data.eval_path",
    "data.s3_endpoint",
    "data.max_error_rate",
    "data.max_unusable_in_a_row",
    "data.on_shard_change",
    "model.recompute",
    "rollout.gpu_memory_utilization",
    "rollout.enforce_eager",
    "rollout.engine_process",
    "rollout.sleep_level",
    "rollout.weight_bucket_mb",
)
STEPS = ("train.steps",)
FIXED = (
    "train.seed",
    "train.precision",
    "model.",
    "data.tokenizer_path",
    "data.num_workers",
    "optim.adam_",
)
SCHEDULE = (
    "optim.lr",
    "optim.min_lr",
    "optim.warmup_fraction",
    "optim.decay_style",
    "optim.weight_decay",  # the schedule sets it on every step
)
"""Settings the LR schedule is built from (re-applied when they or the stage length change)."""
_SCHEDULER_FIELDS = (
    "max_lr",
    "min_lr",
    "init_lr",
    "lr_warmup_steps",
    "lr_decay_steps",
    "lr_decay_style",
    "start_wd",
    "end_wd",
    "wd_incr_steps",
    "wd_incr_style",
)


def _matches(key: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """``key`` is a pattern, or lies under one (``optim`` or ``optim.`` covers ``optim.lr``)."""
    return any(key == p.rstrip(".") or key.startswith(p.rstrip(".") + ".") for p in patterns)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (checkpoint value, value now)}`` for every leaf that differs. ``stages``
    is left out: the resumed stage's own settings are already applied in both configs, and the
    other stages' do not concern it. A key the checkpoint's config lacks (a setting added by a
    later release) is not a change: the run before had no such choice."""
    a = _flatten({k: v for k, v in saved.items() if k != "stages"})
    b = _flatten({k: v for k, v in now.items() if k != "stages"})
    return {k: (a[k], b.get(k)) for k in sorted(a) if a[k] != b.get(k)}


class ResumeRefused(CheckpointError):
    """A resume refused before any step: changed settings, or a data-loader state that does not
    fit the loader (nothing was trained with the new config)."""


@dataclass
class Decision:
    changes: dict[str, tuple[Any, Any]]
    free: list[str]
    accepted: list[str]
    reapply_schedule: bool


def decide(
    saved_config: str | None,
    cfg: AutothinkConfig,
    *,
    total_steps: int,
    saved_total_steps: int | None,
    where: Path,
) -> Decision:
    """Classify the changes between a checkpoint's config and ``cfg`` (see the module
    docstring); raise :class:`CheckpointError` naming every refused key."""
    saved = yaml.safe_load(saved_config) if saved_config else None
    if not isinstance(saved, dict):  # a checkpoint without its config: nothing to compare
        return Decision({}, [], [], False)
    changes = config_changes(saved, cfg.model_dump(mode="json"))
    if saved_total_steps is not None and saved_total_steps != total_steps:
        changes["steps of this stage"] = (saved_total_steps, total_steps)
    allowed = list(cfg.checkpoint.allow_changes)
    free, accepted, fixed, refused = [], [], [], []
    for key in changes:
        if _matches(key, FREE):
            free.append(key)
        elif key == "steps of this stage" or _matches(key, STEPS):
            accepted.append(key)
        elif _matches(key, FIXED):
            fixed.append(key)
        elif _matches(key, allowed):
            accepted.append(key)
        else:
            refused.append(key)

    def show(keys: list[str]) -> str:
        return "; ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in keys)

    problems = []
    if fixed:
        problems.append(
            f"{show(fixed)} cannot change on resume (the checkpoint's would be used); set "
            "them back, or start a new run from its weights with train.init_from=<iter dir>"
        )
    if refused:
        problems.append(
            f"{show(refused)} changed since the checkpoint; set them back, or accept the change "
            f"with checkpoint.allow_changes=[{','.join(refused)}] (not an exact continuation)"
        )
    if problems:
        raise ResumeRefused(f"{where}: resume refused: " + " | ".join(problems))
    for key in accepted:
        log.warning("%s: resuming with changed %s", where, show([key]))
    reapply = any(
        k == "steps of this stage" or _matches(k, STEPS) or _matches(k, SCHEDULE) for k in accepted
    )
    return Decision(changes, free, accepted, reapply)


def fresh_schedule(scheduler: Any) -> dict[str, Any]:
    """The schedule as built from the current config (before a checkpoint overwrites it)."""
    return {f: getattr(scheduler, f) for f in _SCHEDULER_FIELDS if hasattr(scheduler, f)}


def reapply_schedule(scheduler: Any, fresh: dict[str, Any], where: Path) -> None:
    """Put the current config's schedule back after the checkpoint's was loaded, keeping the
    resumed step count, and set the LR of this step from it."""
    before = scheduler.get_lr(scheduler.optimizer.param_groups[0])
    for f, v in fresh.items():
        setattr(scheduler, f, v)
    scheduler.step(0)
    after = scheduler.get_lr(scheduler.optimizer.param_groups[0])
    log.warning(
        "%s: LR schedule re-derived from the current config at step %d: lr %.3g -> %.3g",
        where,
        scheduler.num_steps,
        before,
        after,
    )


def record_resume(run_dir: Path, stage: str, step: int, where: Path, decision: Decision) -> None:
    """Append what this resume changed to ``<run_dir>/resumes.jsonl`` (config.yaml holds the
    config in effect now; this file says which of its values differ from the checkpoint's)."""
    row = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "stage": stage,
        "step": step,
        "checkpoint": str(where),
        "changed": {k: list(v) for k, v in decision.changes.items()},
        "accepted": decision.accepted,
    }
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "resumes.jsonl").open("a") as f:
        f.write(json.dumps(row, default=str) + "\n")
