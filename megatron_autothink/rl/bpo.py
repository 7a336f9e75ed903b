r"""Bi-mode Policy Optimization (BPO) helpers, R-4B (arXiv 2508.21113).

BPO is GRPO with a forced mixture in every rollout group: for each prompt, ``g_think`` responses
start from the thinking prefill (``<think>\n``) and ``g_nothink`` from the non-thinking prefill
(``<think>\n\n</think>\n\n``). Advantages use one baseline over the *whole mixed group*, so a
mode that earns more reward on a prompt gets positive advantage relative to the other; a
per-mode baseline would cancel exactly that signal and teach nothing about when to think.

The paper does not publish the per-mode group size; ``g_think == g_nothink`` is the natural
default, and ``g_nothink = 0`` reduces to plain GRPO on thinking rollouts.

Layout convention (used by rollouts, rewards and advantages alike): rollouts are prompt-major,
and within a prompt the thinking rollouts come first. Rollout ``k`` belongs to prompt
``k // (g_think + g_nothink)``, so a flat [R] tensor reshapes to [P, g_think + g_nothink].
"""

from __future__ import annotations

import math

import torch

from megatron_autothink.rl.advantages import group_advantages


def bpo_advantages(
    rewards: torch.Tensor,
    modes: torch.Tensor,
    *,
    std_normalize: bool,
    eps: float = 1e-6,
) -> torch.Tensor:
    """BPO advantages: one group baseline over both modes (R-4B, arXiv 2508.21113).

    ``modes`` does not change the arithmetic, by design (see the module docstring); it is
    taken so callers cannot pass rewards without their mode layout, and its shape is checked.

    Args:
        rewards: [G, g_think + g_nothink] rewards, laid out as in the module docstring.
        modes: [G, g_think + g_nothink] bool, True where the rollout was forced to think.
        std_normalize: GRPO std normalisation (the paper calls BPO an improved GRPO; whether it
            keeps the std is not published).
        eps: See :func:`group_advantages`.

    Returns:
        [G, g_think + g_nothink] advantages.

    Example:
        Thinking solves the prompt twice, non-thinking never: the thinking rollouts are pushed up.

        >>> r = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
        >>> m = torch.tensor([[True, True, False, False]])
        >>> bpo_advantages(r, m, std_normalize=False).tolist()
        [[0.5, 0.5, -0.5, -0.5]]
    """
    if modes.shape != rewards.shape:
        raise ValueError(f"modes {tuple(modes.shape)} must match rewards {tuple(rewards.shape)}")
    return group_advantages(rewards, std_normalize=std_normalize, eps=eps)


def per_mode_metrics(
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    modes: torch.Tensor,
    lengths: torch.Tensor,
) -> dict[str, float]:
    """Mean reward, advantage and response length per mode, for logging (R-4B Fig. 7 style).

    Also reports, over groups holding both modes, how often each mode's mean reward is strictly
    higher (``groups/thinking_better``, ``groups/non_thinking_better``): the signal BPO learns
    the mode choice from. Means over an empty mode are NaN (count 0), so dashboards show a gap
    rather than a misleading zero.

    Args:
        rewards: [G, N] rewards.
        advantages: [G, N] advantages.
        modes: [G, N] bool, True for thinking rollouts.
        lengths: [G, N] response lengths in tokens.

    Returns:
        Flat ``{name: value}`` dict.

    Example:
        >>> r = torch.tensor([[1.0, 1.0, 0.0, 1.0]])
        >>> a = torch.tensor([[0.25, 0.25, -0.75, 0.25]])
        >>> m = torch.tensor([[True, True, False, False]])
        >>> n = torch.tensor([[300, 500, 20, 40]])
        >>> out = per_mode_metrics(r, a, m, n)
        >>> out["thinking/reward_mean"], out["non_thinking/reward_mean"]
        (1.0, 0.5)
        >>> out["thinking/length_mean"], out["non_thinking/advantage_mean"]
        (400.0, -0.25)
        >>> out["groups/thinking_better"]
        1.0
    """
    shapes = {tuple(t.shape) for t in (rewards, advantages, modes, lengths)}
    if len(shapes) != 1 or rewards.dim() != 2:
        raise ValueError(f"all inputs must share one [G, N] shape, got {shapes}")
    think = modes.bool()
    out: dict[str, float] = {}
    for name, sel in (("thinking", think), ("non_thinking", ~think)):
        count = int(sel.sum().item())
        out[f"{name}/count"] = float(count)
        for key, values in (("reward", rewards), ("advantage", advantages), ("length", lengths)):
            out[f"{name}/{key}_mean"] = (
                float(values[sel].double().mean().item()) if count else math.nan
            )
    out["thinking_share"] = float(think.double().mean().item()) if think.numel() else math.nan

    # Per-group mode comparison, only where both modes were sampled.
    n_think = think.sum(dim=1)
    n_short = (~think).sum(dim=1)
    both = (n_think > 0) & (n_short > 0)
    if bool(both.any()):
        r = rewards.double()
        mean_think = (r * think).sum(dim=1) / n_think.clamp(min=1)
        mean_short = (r * ~think).sum(dim=1) / n_short.clamp(min=1)
        num_both = both.sum().double()
        out["groups/thinking_better"] = float(((mean_think > mean_short) & both).sum() / num_both)
        out["groups/non_thinking_better"] = float(
            ((mean_short > mean_think) & both).sum() / num_both
        )
    else:
        out["groups/thinking_better"] = math.nan
        out["groups/non_thinking_better"] = math.nan
    return out


def decision_position(think_prefill: list[int], nothink_prefill: list[int]) -> int:
    """Index of the mode decision in a BPO sample's targets (prefill first): the first token
    where the two forced prefills part.

    With a tokenizer that splits ``\\n\\n`` (the demo's) the thinking prefill is a prefix of the
    other, so the decision is the thinking sample's first response token; with Qwen3's
    (``\\n\\n`` one token) both prefills carry it at index 1.

    Example:
        >>> decision_position([775, 198], [775, 198, 198, 776, 198, 198])
        2
        >>> decision_position([151667, 198], [151667, 271, 151668, 271])
        1
    """
    n = 0
    for a, b in zip(think_prefill, nothink_prefill, strict=False):
        if a != b:
            break
        n += 1
    if n == len(nothink_prefill):
        raise ValueError("the non-thinking prefill must not be a prefix of the thinking one")
    return n


def decision_weights(p_nothink: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
    r"""Importance weights of the mode decision in BPO's forced groups.

    A forced group picks each rollout's mode from ``q`` (the forced share, ``g_think / G``),
    not from the policy, so training the decision token with the group advantage alone
    follows ``sum_m q(m) A(m) grad log pi(m)``: with the mean baseline that is ``q (1 - q) dA``
    per rollout on the decision logit (``dA`` the thinking minus non-thinking mean reward; 0.25
    dA for a 2 + 2 group) whatever ``pi`` already prefers, a push that never settles. A strong signal on hard
    prompts then drags the shared weights until easy prompts think too (docs/rl.md, "Decision
    weighting"). Weighting each decision term by ``pi(m) / q(m)`` gives the gradient auto mode
    would get, ``p (1 - p) dA`` for ``p = pi(think)``, which fades where the choice is settled
    and leaves the prompts still undecided to move. R-4B (arXiv 2508.21113) does not say how its
    decision is trained; this is our choice, off by default (``rl.bpo.decision_weighting``).

    ``pi(think) = 1 - pi(non-thinking decision token)``: any decision but the empty block
    thinks, and the non-thinking prefill's decision token is a trained target whose log-prob
    the trainer has (the thinking sample's may be a sampled content token, one of many).

    Args:
        p_nothink: [G] policy probability of the non-thinking decision per prompt.
        modes: [G, N] bool, True where the rollout was forced to think; each row must hold both.

    Returns:
        [G, N] weights, ``pi(m) / q(m)`` per rollout (mean 1 over a group when ``q = pi``).

    Example:
        The policy answers directly 80 % of the time; a 2 + 2 group samples each mode half the
        time, so thinking rollouts count 0.4x and direct ones 1.6x:

        >>> m = torch.tensor([[True, True, False, False]])
        >>> [round(w, 3) for w in decision_weights(torch.tensor([0.8]), m)[0].tolist()]
        [0.4, 0.4, 1.6, 1.6]
    """
    if p_nothink.dim() != 1 or modes.dim() != 2 or p_nothink.shape[0] != modes.shape[0]:
        raise ValueError(f"p_nothink [G] and modes [G, N], got {p_nothink.shape}, {modes.shape}")
    think = modes.bool()
    q_think = think.float().mean(dim=1, keepdim=True)
    if bool(((q_think == 0) | (q_think == 1)).any()):
        raise ValueError("every group needs both modes to weight its decision")
    p = p_nothink.float().clamp(0.0, 1.0).unsqueeze(1)
    return torch.where(think, (1 - p) / q_think, p / (1 - q_think))
