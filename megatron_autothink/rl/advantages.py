"""Group-relative advantages (GRPO) and zero-advantage group filtering (DAPO).

* GRPO (DeepSeekMath, arXiv 2402.03300): ``A_i = (r_i - mean(r)) / std(r)`` within the group of
  responses to one prompt; the outcome advantage is broadcast to every token of the response.
* VL-Rethinker (arXiv 2504.08837) and LMM-R1's REINFORCE-with-baseline (arXiv 2503.07536) drop
  the division by std: ``A_i = r_i - mean(r)`` (``std_normalize=False``). Without the std,
  groups that are nearly solved do not get their tiny reward differences blown up.
* DAPO (arXiv 2503.14476) "dynamic sampling": a group whose rewards are all equal has zero
  advantage everywhere and contributes no policy gradient (:func:`zero_advantage_group_mask`);
  ``rl.dynamic_filter`` drops such groups from the training set
  (:func:`megatron_autothink.rl.trainer.select_training_set`; the batch is not refilled).

Deviation/choice: the std is the *unbiased* sample std (``correction=1``), as in TRL and verl;
GRPO's paper does not specify. A group of one response gets advantage 0.
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, *, std_normalize: bool, eps: float = 1e-6
) -> torch.Tensor:
    """Group-relative advantages, one row per prompt.

    Args:
        rewards: [G, N] rewards of N responses for each of G prompts.
        std_normalize: Divide by the group std (GRPO, arXiv 2402.03300); False gives
            VL-Rethinker's mean-only baseline (arXiv 2504.08837).
        eps: Added to the std (numerical floor for nearly-equal rewards); groups whose rewards
            are all equal get exactly 0 regardless.

    Returns:
        [G, N] advantages (float32 unless ``rewards`` is float64).

    Example:
        Two prompts, four responses each; the second group is all correct.

        >>> r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
        >>> group_advantages(r, std_normalize=False).tolist()
        [[0.5, -0.5, -0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]
        >>> # std of [1, 0, 0, 1] (unbiased) = sqrt(1/3) = 0.5774; 0.5 / 0.5774 = 0.8660
        >>> [round(x, 4) for x in group_advantages(r, std_normalize=True)[0].tolist()]
        [0.866, -0.866, -0.866, 0.866]
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G, N], got shape {tuple(rewards.shape)}")
    r = rewards if rewards.dtype == torch.float64 else rewards.to(torch.float32)
    if r.shape[1] < 2:
        # A single response has no group to compare against; the sample std is undefined.
        return torch.zeros_like(r)
    centered = r - r.mean(dim=1, keepdim=True)
    # All-equal groups get exactly 0: the float mean of equal values can be off by one ulp, and
    # with eps = 0 the std division would be 0/0.
    flat = zero_advantage_group_mask(r).unsqueeze(1)
    centered = torch.where(flat, torch.zeros_like(centered), centered)
    if not std_normalize:
        return centered
    std = r.std(dim=1, keepdim=True, correction=1)
    return torch.where(flat, centered, centered / (std + eps))


def zero_advantage_group_mask(rewards: torch.Tensor) -> torch.Tensor:
    """Groups whose rewards are all equal (hence zero advantage under any baseline).

    Exact equality is intended: rule-based rewards take a few discrete values.

    Args:
        rewards: [G, N] rewards.

    Returns:
        [G] bool, True where the group carries no learning signal.

    Example:
        >>> zero_advantage_group_mask(torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0]])).tolist()
        [True, False, True]
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [G, N], got shape {tuple(rewards.shape)}")
    return rewards.amax(dim=1) == rewards.amin(dim=1)
