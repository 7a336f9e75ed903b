"""Typed hand-offs between the RL/evaluation code and the rollout engine.

Everything that crosses the rollout boundary is one of these dataclasses, never a dict bag:

* :class:`GenerationRequest` -- one prompt (token ids, optional images, thinking mode, ``n``).
* :class:`SamplingConfig` -- sampling settings shared by one ``generate`` call.
* :class:`Completion` -- one sampled response with the log-probs of its tokens.
* :class:`WeightUpdate` -- what one ``update_weights`` call did (version, size, time).

Thinking modes (:mod:`megatron_autothink.modes`): the assistant turn of the prompt ends with
``"<|im_start|>assistant\\n"`` and the engine appends the mode's *prefill*
(:data:`~megatron_autothink.modes.PREFILLS`) to it.

A prefill alone forces nothing (the model may close the block at once, or open a second one), so
the engine also constrains decoding in the forced modes: :mod:`megatron_autothink.rollout.
think_rule`, switched by :attr:`SamplingConfig.think_rule` (a :class:`ThinkRuleSettings`).

The prefill belongs to the *prompt*: it is reported in :attr:`Completion.prefill_token_ids` so
that the trainer can rebuild ``prompt + prefill + completion`` and put no loss on the prefill.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch

from megatron_autothink.modes import PREFILLS, VISION_TOKENS, ThinkingMode

if TYPE_CHECKING:
    from PIL.Image import Image

    from megatron_autothink.config import RolloutConfig

FinishReason = Literal["stop", "length"]
"""``"stop"``: an EOS/stop token was sampled (it is the last token); ``"length"``: budget hit."""


def vision_token_ids(tokenizer: Any) -> set[int]:
    """Ids of :data:`~megatron_autothink.modes.VISION_TOKENS` the tokenizer has (unknown ones left out)."""
    ids = {tokenizer.convert_tokens_to_ids(n) for n in VISION_TOKENS}
    return {i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id}


DEFAULT_MIN_THINK_TOKENS = 8
"""Content tokens a forced ``long`` completion writes before it may close its think block
(``rollout.think_rule``): enough that the block is visibly non-empty (a few words of
reasoning), few enough that the model still chooses how long it thinks."""


# Keys of vLLM's ``SamplingParams.extra_args`` (flat: the OpenAI server's ``vllm_xargs`` takes
# no nested values, and clients may set them there).
EXTRA_MIN_THINK_TOKENS = "autothink_min_think_tokens"
EXTRA_BAN_THINK_IN_SHORT = "autothink_ban_think_in_short"


@dataclass(frozen=True, slots=True)
class ThinkRuleSettings:
    """Per-request settings of the rule (defaults: the rule on).

    Attributes:
        min_think_tokens: Content tokens a ``long`` completion must write before ``</think>``
            or a stop token may be sampled; 0 switches the long-mode ban off.
        ban_think_in_short: Ban ``<think>`` in ``short`` completions.
    """

    min_think_tokens: int = DEFAULT_MIN_THINK_TOKENS
    ban_think_in_short: bool = True

    def __post_init__(self) -> None:
        if self.min_think_tokens < 0:
            raise ValueError(f"min_think_tokens must be >= 0, got {self.min_think_tokens}")

    @classmethod
    def of(cls, rollout: RolloutConfig) -> ThinkRuleSettings:
        """The settings of a run's ``rollout`` section (``rollout.min_think_tokens``,
        ``rollout.ban_think_in_short``)."""
        return cls(rollout.min_think_tokens, rollout.ban_think_in_short)

    def to_extra_args(self) -> dict[str, int]:
        """The settings as ``SamplingParams.extra_args`` entries.

        >>> ThinkRuleSettings(3, False).to_extra_args()
        {'autothink_min_think_tokens': 3, 'autothink_ban_think_in_short': 0}
        """
        return {
            EXTRA_MIN_THINK_TOKENS: self.min_think_tokens,
            EXTRA_BAN_THINK_IN_SHORT: int(self.ban_think_in_short),
        }

    @classmethod
    def from_extra_args(cls, extra: Mapping[str, Any] | None) -> ThinkRuleSettings:
        """Inverse of :meth:`to_extra_args`; missing keys take the defaults (a server request
        that says nothing gets the rule), wrong types raise ``ValueError``.

        >>> ThinkRuleSettings.from_extra_args({"autothink_min_think_tokens": 2})
        ThinkRuleSettings(min_think_tokens=2, ban_think_in_short=True)
        """
        extra = extra or {}
        n = extra.get(EXTRA_MIN_THINK_TOKENS, DEFAULT_MIN_THINK_TOKENS)
        ban = extra.get(EXTRA_BAN_THINK_IN_SHORT, 1)
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"{EXTRA_MIN_THINK_TOKENS} must be an integer, got {n!r}")
        if ban not in (0, 1, True, False):
            raise ValueError(f"{EXTRA_BAN_THINK_IN_SHORT} must be 0 or 1, got {ban!r}")
        return cls(min_think_tokens=n, ban_think_in_short=bool(ban))


@dataclass(frozen=True, slots=True)
class PreprocessedImages:
    """Images already run through the Qwen2.5-VL image processor (the trainer's input format).

    This is exactly what ``Qwen2VLImageProcessor(images)`` returns, so the rollout engine and the
    trainer can be fed *bit-identical* pixels (re-processing a PIL image on either side with a
    different resize backend is a known source of trainer/rollout log-prob mismatch for VLMs).

    Attributes:
        pixel_values: FloatTensor[N_patches, C * temporal_patch * patch * patch] (1176 for
            Qwen2.5-VL: 3 * 2 * 14 * 14), rescaled and normalised, all images concatenated in
            prompt order.
        image_grid_thw: LongTensor[M, 3], one (t, h, w) patch grid per image;
            ``image_grid_thw.prod(-1).sum() == N_patches``. Image ``i`` occupies
            ``prod(image_grid_thw[i]) // spatial_merge_size**2`` tokens in the LLM sequence.
    """

    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor

    def __post_init__(self) -> None:
        if self.pixel_values.ndim != 2:
            raise ValueError(
                f"pixel_values must be [N_patches, patch_dim], got {tuple(self.pixel_values.shape)}"
            )
        if self.image_grid_thw.ndim != 2 or self.image_grid_thw.shape[-1] != 3:
            raise ValueError(
                f"image_grid_thw must be [M, 3], got {tuple(self.image_grid_thw.shape)}"
            )
        n_patches = int(self.image_grid_thw.prod(-1).sum())
        if n_patches != self.pixel_values.shape[0]:
            raise ValueError(
                f"image_grid_thw describes {n_patches} patches but pixel_values has "
                f"{self.pixel_values.shape[0]} rows"
            )

    @property
    def num_images(self) -> int:
        """Number of images M."""
        return int(self.image_grid_thw.shape[0])

    def num_tokens(self, spatial_merge_size: int = 2) -> list[int]:
        """LLM placeholder tokens per image (``t * h * w // merge**2``)."""
        merge = spatial_merge_size**2
        return [int(n) // merge for n in self.image_grid_thw.prod(-1).tolist()]


@dataclass(slots=True)
class GenerationRequest:
    """One prompt to sample ``n`` completions for.

    Attributes:
        request_id: Caller-chosen unique id; completions come back in request order, the id is
            for logging and for deriving per-request seeds.
        prompt_token_ids: Chat-formatted prompt ending with ``"<|im_start|>assistant\\n"``.
            Each image appears as ``<|vision_start|><|image_pad|><|vision_end|>``; the pad may be
            given once or already expanded to the image's token count (the trainer's format):
            runs of pads are collapsed and re-expanded by the engine.
        images: ``None`` (text only), a :class:`PreprocessedImages` (preferred: the trainer's
            exact pixels) or a sequence of PIL images (preprocessed by the engine with the model
            directory's image processor). Image ``i`` fills the ``i``-th pad run.
        mode: Thinking mode whose prefill is appended to the prompt.
        n: Number of completions to sample for this prompt.
        max_new_tokens: This request's budget of generated tokens; ``None`` takes
            :attr:`SamplingConfig.max_new_tokens`. Forced-rethinking continuations each have
            their own (what is left of the original response's budget).
    """

    request_id: str
    prompt_token_ids: list[int]
    images: PreprocessedImages | Sequence[Image] | None = None
    mode: ThinkingMode = "auto"
    n: int = 1
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in PREFILLS:
            raise ValueError(f"mode must be one of {list(PREFILLS)}, got {self.mode!r}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(
                f"request {self.request_id!r}: max_new_tokens must be >= 1, got "
                f"{self.max_new_tokens}"
            )

    def budget(self, sampling: SamplingConfig) -> int:
        """Generated-token budget of this request under ``sampling``.

        Example:
            >>> r = GenerationRequest("r", [1], max_new_tokens=5)
            >>> r.budget(SamplingConfig(max_new_tokens=64)), GenerationRequest("q", [1]).budget(
            ...     SamplingConfig(max_new_tokens=64))
            (5, 64)
        """
        return sampling.max_new_tokens if self.max_new_tokens is None else self.max_new_tokens


@dataclass(frozen=True, slots=True)
class SamplingConfig:
    """Sampling settings for one ``generate`` call (all requests share them).

    Attributes:
        temperature: Softmax temperature; 0 means greedy.
        top_p: Nucleus sampling mass (1.0 disables it).
        top_k: Keep the k most likely tokens (-1 disables it).
        max_new_tokens: Budget of generated tokens per completion (prefill not counted).
        seed: Base seed. With a seed, request ``r`` samples with a seed derived from
            ``(seed, r.request_id)`` and its ``j``-th sample with that seed ``+ j``: the same
            seed and request ids give the same tokens, whatever else is in the batch, and no two
            requests share a random stream. ``None``: unseeded.
        stop_token_ids: Extra stop tokens besides the model's EOS (``<|im_end|>``). The stop
            token is kept as the last completion token (the policy is trained to emit it).
        logprobs: Return the log-prob of every sampled token. These are the model's *raw*
            log-probs (full softmax at temperature 1, before temperature/top-p/top-k), i.e. what
            the trainer's forward computes; see ``VLLMEngineConfig.logprobs_mode``.
        skip_special_tokens: Drop special tokens (``<|im_end|>``...) from ``Completion.text``;
            the think tags are ordinary added tokens and stay.
        think_rule: The forced-mode rule (``rollout.think_rule``): forced ``long``
            completions may not close the think block or stop before
            ``think_rule.min_think_tokens`` content tokens, because the prefill alone does not
            force thinking; forced ``short`` ones may not sample ``<think>``
            (``think_rule.ban_think_in_short``). ``auto`` completions are never constrained.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 256
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = True
    skip_special_tokens: bool = True
    think_rule: ThinkRuleSettings = ThinkRuleSettings()

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(slots=True)
class Completion:
    """One sampled response.

    The token sequence the policy saw is ``prompt_token_ids + prefill_token_ids + token_ids``.

    Attributes:
        token_ids: Generated tokens [T] (prefill excluded; the stop token included when
            ``finish_reason == "stop"``).
        logprobs: Log-prob of each generated token [T] under the rollout policy; empty when
            ``SamplingConfig.logprobs`` is False.
        text: Detokenised ``token_ids``.
        finish_reason: ``"stop"`` or ``"length"``.
        prefill_token_ids: Tokens the engine appended to the prompt for the thinking mode [P].
        mode: Thinking mode of the request.
        policy_version: Version of the weights that produced this completion.
    """

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: FinishReason
    prefill_token_ids: list[int] = field(default_factory=list)
    mode: ThinkingMode = "auto"
    policy_version: int = 0


@dataclass(frozen=True, slots=True)
class WeightUpdate:
    """Metadata of one ``update_weights`` call.

    Attributes:
        version: Policy version the engine holds after the update.
        num_tensors: Tensors received.
        num_bytes: Bytes received (sum of ``numel * element_size``).
        num_buckets: Buckets the stream was cut into.
        seconds: Wall time of the whole update, cache resets included.
    """

    version: int
    num_tensors: int
    num_bytes: int
    num_buckets: int
    seconds: float

    @property
    def gbytes_per_second(self) -> float:
        """Throughput in GB/s (10^9 bytes)."""
        return self.num_bytes / 1e9 / max(self.seconds, 1e-9)
