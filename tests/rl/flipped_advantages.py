"""``autothink`` with every RL advantage negated: the control run of tests/rl/test_learning.py.

Usage (same arguments as the CLI)::

    python -m tests.rl.flipped_advantages train --config r4b_bpo_tiny ...

A policy-gradient step with the sign flipped pushes the policy *away* from the responses that
scored above their group's mean, so a correct trainer must lower the reward; a run that still
raises it would mean the reward rises for a reason other than the update (or the sign is lost
somewhere). Test-only, so it wraps the trainer's function instead of adding a config key.
"""

from __future__ import annotations

import sys
from typing import Any

from megatron_autothink import cli
from megatron_autothink.rl import trainer


def install() -> None:
    """Replace the advantage function the RL step looks up at call time by its negation."""
    original = trainer.compute_advantages

    def flipped(*args: Any, **kwargs: Any) -> list[list[float]]:
        return [[-a for a in group] for group in original(*args, **kwargs)]

    trainer.compute_advantages = flipped  # type: ignore[assignment]


if __name__ == "__main__":
    install()
    sys.exit(cli.main())
