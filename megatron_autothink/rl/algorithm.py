"""The RL algorithm of a stage, chosen once from ``rl.algorithm``.

Every place where the algorithms differ asks the :class:`Algorithm` built where the stage is
built (``rl.stage.run_stage``), instead of testing ``rl.algorithm`` itself:

============  ===============================  ==================  =========================
algorithm     rollouts per prompt              advantage baseline  std normalisation
============  ===============================  ==================  =========================
grpo          ``group_size`` in auto mode      group mean          ``rl.std_normalize``
reinforce     ``group_size`` in auto mode      group mean          never (LMM-R1's
                                                                   REINFORCE, group baseline)
bpo           ``bpo.g_think`` forced long +    group mean over     ``rl.std_normalize``
              ``bpo.g_nothink`` forced short   both modes
============  ===============================  ==================  =========================

BPO (R-4B, arXiv 2508.21113) also trains the forced mode's prefill when
``rl.bpo.train_decision`` is set, since only then do its advantages reach the token where the
policy decides whether to think.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_autothink.config import RLConfig
from megatron_autothink.modes import ThinkingMode
from megatron_autothink.rl.advantages import group_advantages
from megatron_autothink.rl.bpo import bpo_advantages

__all__ = ["Algorithm"]


@dataclass(frozen=True)
class Algorithm:
    """What the algorithm decides: the rollout groups, the advantages, the trained prefill.

    Example:
        >>> bpo = Algorithm.of(RLConfig(algorithm="bpo", bpo={"g_think": 2, "g_nothink": 1}))
        >>> bpo.groups, bpo.group_size, bpo.trains_decision
        ((('long', 2), ('short', 1)), 3, True)

        Thinking solved the prompt twice, not thinking failed: GRPO-style normalised advantages
        over the mixed group. REINFORCE (LMM-R1) keeps the raw centred rewards.

        >>> rewards = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
        >>> bpo.advantages(rewards, torch.tensor([[True, True, False]])).round(decimals=3).tolist()
        [[0.577, 0.577, -1.155]]
        >>> reinforce = Algorithm.of(RLConfig(algorithm="reinforce", group_size=3))
        >>> reinforce.groups, reinforce.trains_decision
        ((('auto', 3),), False)
        >>> no_mode = torch.zeros(1, 3, dtype=torch.bool)
        >>> reinforce.advantages(rewards, no_mode).round(decimals=3).tolist()
        [[0.333, 0.333, -0.667]]
    """

    name: str
    groups: tuple[tuple[ThinkingMode, int], ...]
    """Per prompt: (thinking mode the rollouts are forced into, how many of them)."""
    std_normalize: bool
    bi_mode: bool
    """Advantages over one group of forced thinking and non-thinking rollouts (BPO)."""
    trains_decision: bool
    """The forced prefill, up to the decision token, is trained with the sample's advantage."""

    @classmethod
    def of(cls, rl: RLConfig) -> Algorithm:
        if rl.algorithm == "bpo":
            return cls(
                name="bpo",
                groups=(("long", rl.bpo.g_think), ("short", rl.bpo.g_nothink)),
                std_normalize=rl.std_normalize,
                bi_mode=True,
                trains_decision=rl.bpo.train_decision,
            )
        return cls(
            name=rl.algorithm,
            groups=(("auto", rl.group_size),),
            std_normalize=rl.std_normalize and rl.algorithm == "grpo",
            bi_mode=False,
            trains_decision=False,
        )

    @property
    def group_size(self) -> int:
        """Rollouts per prompt."""
        return sum(n for _, n in self.groups)

    def advantages(self, rewards: torch.Tensor, forced_long: torch.Tensor) -> torch.Tensor:
        """[P, G] advantages from [P, G] rewards; ``forced_long`` [P, G] bool marks the
        rollouts forced to think (all False outside BPO)."""
        if self.bi_mode:
            return bpo_advantages(rewards, forced_long, std_normalize=self.std_normalize)
        return group_advantages(rewards, std_normalize=self.std_normalize)
