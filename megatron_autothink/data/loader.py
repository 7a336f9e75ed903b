"""Training loaders on megatron-energon: packed SFT micro-batches and RL prompt batches.

Pipeline (all inside energon, so shuffling, per-rank sharding, worker processes and savable state
come from it)::

    CrudeWebdataset (raw tar members, per-DP-rank shard slices, shuffled by seed)
      -> cook_conversation          JSON + image bytes -> ConversationSample
      -> shuffle buffer
      -> encode_sample              pick the response mode, images -> patches, render the chat,
                                    tokenize, loss mask, mRoPE positions      (EncodedSequence)
      -> packing buffer             first-fit-decreasing groups of <= seq_length tokens
      -> pack_selected_samples      one padded row per group                   (PackedRow)
      -> batch                      micro_batch_size rows                       (PackedBatch)

The data-parallel rank and size are passed in explicitly (never read from torch.distributed);
energon gives each (rank, worker) a disjoint slice of the shards and seeds shuffling with
``seed``, so the order is deterministic for a fixed (seed, rank, world size, workers).

Resume: :meth:`PackedLoader.state_dict` wraps energon's ``save_state_rank`` (plus our counters);
a new loader built with the same arguments and given that state yields exactly the batches the
old one would have yielded next. Restore before iterating.

Bad data: shards that are missing or shorter than their index says are found before training
(``verify_shards``), reported and left out; samples that cannot be read (damaged tar headers)
or decoded are skipped by energon's error handler; all are counted in
:attr:`PackedLoader.stats`.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import struct
import tarfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Generic, Literal, TypeVar

import torch
from megatron.energon import (
    Batch,
    Cooker,
    SavableDataLoader,
    SkipSample,
    TaskEncoder,
    WorkerConfig,
    basic_sample_keys,
    get_savable_loader,
    stateless,
)
from megatron.energon import Sample as EnergonSample
from megatron.energon.edataclass import edataclass
from megatron.energon.epathlib import EPath
from megatron.energon.errors import FatalSampleError
from megatron.energon.flavors.webdataset.config import split_name_re
from megatron.energon.flavors.webdataset.structs import ShardInfo
from megatron.energon.metadataset import load_dataset
from megatron.energon.savable_loader import SavableDataLoaderState
from megatron.energon.source_info import SourceInfo
from PIL import Image
from pydantic import ValidationError

from megatron_autothink.data import loader_state
from megatron_autothink.data.batch import PackedBatch, PromptSample
from megatron_autothink.data.chat_template import tokenize_messages, turns_to_messages
from megatron_autothink.data.image_processing import (
    ImageProcessingConfig,
    decode_image,
    image_config,
    image_patches,
)
from megatron_autothink.data.packing import (
    EncodedSequence,
    PackedRow,
    collate_rows,
    first_fit_decreasing,
    mrope_position_ids,
    pack_row,
)
from megatron_autothink.data.schema import Mode, Sample, Turn, response_mode
from megatron_autothink.data.storage import energon_path
from megatron_autothink.data.tokenizer import load_tokenizer
from megatron_autothink.modes import (
    DEFAULT_SYSTEM,
    EMPTY_THINK,
    IMAGE_PAD,
    mode_id,
    render_messages,
)

if TYPE_CHECKING:
    from megatron_autothink.config import AutothinkConfig

# The loader forks workers after the tokenizer may have used its thread pool; without this the
# Rust tokenizer warns and silently turns parallelism off in every worker anyway.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger(__name__)

VerifyMode = Literal["none", "size", "headers"]
T = TypeVar("T")

# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataSourceConfig:
    """Where and how samples are read (shared by the SFT and the prompt loader)."""

    path: str
    """Dataset folder, ``s3://bucket/prefix`` or ``msc://profile/prefix`` (prepared by prep)."""
    split: str = "train"
    """Split part (``train`` / ``test``; whatever prep wrote)."""
    seed: int = 0
    """Seeds shard order, shuffle buffer and the thinking/non-thinking draw."""
    training: bool = True
    """Shuffle and repeat forever; ``False``: one deterministic pass."""
    num_workers: int = 0
    """Worker processes per rank (0: load in the training process)."""
    shuffle_buffer_size: int = 256
    """Samples in the shuffle buffer (training only)."""
    max_samples_per_sequence: int | None = 64
    """Samples read in a row from one shard slice before energon switches slices."""
    image: ImageProcessingConfig = dataclasses.field(default_factory=ImageProcessingConfig)
    """Image preprocessing (must match the model and the rollout engine)."""
    default_system: str | None = DEFAULT_SYSTEM
    """System prompt for conversations without one (``None``: none)."""
    verify_shards: VerifyMode = "size"
    """Shard check at start: ``size`` (exists, not shorter than indexed), ``headers`` (also
    parse every tar header; reads whole shards), ``none``."""
    s3_endpoint: str | None = None
    """Endpoint for ``s3://`` paths (else ``AWS_ENDPOINT_URL``)."""
    prefetch_factor: int = 2
    """Batches prefetched per worker."""
    gc_every_n_batches: int = 10
    """Energon runs ``gc.collect()`` every n batches in the loading process (and one full
    collection + ``gc.freeze()`` when iteration starts: ~1 s with a large heap); 0 disables."""
    max_error_rate: float | None = None
    """Raise :class:`DataQualityError` once more than this share of the samples one loading
    process has read (counted from its :data:`MIN_SAMPLES_FOR_RATE`-th) could not be read or
    decoded. Skips by rule (too long, no answer) do not count. ``None``: no limit."""
    max_unusable_in_a_row: int = 100
    """Raise :class:`DataQualityError` when this many samples in a row were unusable for any
    reason (bad, too long, no answer): nothing would ever reach the trainer, and energon would
    search forever. 0: no limit."""
    on_shard_change: Literal["refuse", "restart_order"] = "refuse"
    """At :meth:`~_EnergonLoader.load_state_dict`, when a shard that was usable at save time is
    unusable now: ``refuse`` (ValueError), or ``restart_order``: keep the counters but start the
    sample order afresh without the shard (not an exact resume). A shard that was excluded at
    save time and is usable now stays excluded until the loader is rebuilt without a state (the
    next stage or run), which keeps the resume exact."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoaderConfig(DataSourceConfig):
    """Settings of the packed SFT loader."""

    seq_length: int = 512
    """Tokens per packed row (S)."""
    micro_batch_size: int = 1
    """Rows per micro-batch (B)."""
    think_ratio: float = 0.5
    """For samples carrying both responses and no ``mode`` label: P(thinking response)."""
    think_min_difficulty: int | None = None
    """If set, samples carrying both responses take the thinking one when their difficulty is at
    least this and the direct one below it (R-4B's curation by difficulty); else think_ratio."""
    think_ratio_by_difficulty: Mapping[int, float] = dataclasses.field(default_factory=dict)
    """P(thinking response) for samples of the listed difficulties (before the two rules above)."""
    packing_buffer_size: int = 128
    """Samples first-fit packed together (larger: fuller rows)."""
    plain_as_non_thinking: bool = True
    """Give assistant turns without a think block the empty one (so every response the model
    learns starts with ``<think>``); otherwise they keep mode id -1."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptLoaderConfig(DataSourceConfig):
    """Settings of the RL prompt loader."""

    batch_size: int = 8
    """Prompts per batch (per data-parallel rank)."""


def sft_loader_config(
    cfg: AutothinkConfig, path: str, *, training: bool, split: str
) -> LoaderConfig:
    """The packed SFT loader of a recipe (``data.*``, ``train.seed``) reading ``path``."""
    d = cfg.data
    return LoaderConfig(
        path=path,
        split=split,
        seed=cfg.train.seed,
        training=training,
        num_workers=d.num_workers,
        shuffle_buffer_size=d.shuffle_buffer,
        seq_length=d.seq_length,
        micro_batch_size=d.micro_batch_size,
        think_ratio=d.think_ratio,
        think_min_difficulty=d.think_min_difficulty,
        think_ratio_by_difficulty=dict(d.think_ratio_by_difficulty),
        s3_endpoint=d.s3_endpoint or None,
        image=image_config(cfg),
        max_error_rate=d.max_error_rate,
        max_unusable_in_a_row=d.max_unusable_in_a_row,
        on_shard_change=d.on_shard_change,
    )


def prompt_loader_config(cfg: AutothinkConfig, path: str, *, batch_size: int) -> PromptLoaderConfig:
    """The RL prompt loader of a recipe reading ``path``'s train split, ``batch_size`` prompts
    per batch and data-parallel rank; the same data-quality limits as the SFT loader."""
    d = cfg.data
    return PromptLoaderConfig(
        path=path,
        split="train",
        seed=cfg.train.seed,
        batch_size=batch_size,
        image=image_config(cfg),
        s3_endpoint=d.s3_endpoint or None,
        max_error_rate=d.max_error_rate,
        max_unusable_in_a_row=d.max_unusable_in_a_row,
        on_shard_change=d.on_shard_change,
    )


# ----------------------------------------------------------------------------- worker-side stats

# Counters live in the process that encodes (a worker or the main process); each batch carries
# the increments since the previous batch of that process back to the loader.
_WORKER_STATS: collections.Counter[str] = collections.Counter()


def _take_worker_stats(*, samples_used: int) -> dict[str, int]:
    """The counts since the previous batch, for a batch of ``samples_used`` usable samples.

    ``samples_read`` = usable samples delivered in batches + unusable ones dropped. A usable
    sample is counted here, when it leaves the buffers in a batch, not when it is read: after a
    resume energon reads the samples of its shuffle and packing buffers again (and replays from
    its last worker checkpoint, dropping those batches), so counting reads would make the counter
    depend on where the run was interrupted."""
    _WORKER_STATS["samples_read"] += samples_used
    out = dict(_WORKER_STATS)
    _WORKER_STATS.clear()
    return out


MIN_SAMPLES_FOR_RATE = 200
"""Samples a loading process reads before ``max_error_rate`` is checked (a few bad samples at
the very start must not stop a run whose overall share is small)."""


class DataQualityError(FatalSampleError):
    """The data cannot feed training: too many bad samples, or none fits. A FatalSampleError,
    so energon passes it on instead of skipping the sample that raised it."""


R = TypeVar("R")


def fetch_agreed(fetch: Callable[[], R], *, group: Any = None, device: Any = None) -> R:
    """``fetch()`` (a step's batches from this rank's loader) on every rank of ``group``, with
    the data-quality verdict agreed: when :class:`DataQualityError` is raised on any rank, every
    rank raises one with the same message (the lowest failing rank's, naming it), so no rank is
    left waiting in the step's collectives for a rank that has stopped.

    A collective: every rank of ``group`` (``None``: the default group; the caller passes the
    group, this module knows no layout) calls it at the same point of the loop. One int
    all-reduce (on ``device``: the rank's CUDA device with NCCL) when all is well; the
    messages are gathered only when a rank failed. Without a process group it is ``fetch()``.
    Other exceptions pass through unchanged, as before.
    """
    import torch.distributed as dist

    error: DataQualityError | None = None
    out: R | None = None
    try:
        out = fetch()
    except DataQualityError as e:
        error = e
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        if error is not None:
            raise error
        return out  # type: ignore[return-value]
    flag = torch.tensor([0 if error is None else 1], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    if not flag.item():
        return out  # type: ignore[return-value]
    messages: list[Any] = [None] * dist.get_world_size(group)
    mine = None if error is None else (dist.get_rank(), str(error))
    dist.all_gather_object(messages, mine, group=group)
    failed = [m for m in messages if m is not None]
    rank, text = min(failed)
    others = f" (and {len(failed) - 1} other ranks)" if len(failed) > 1 else ""
    raise DataQualityError(f"rank {rank}{others}: {text}") from error


# energon wraps the error (and a worker process re-raises it by message): the loader finds its
# own text between these marks and raises it again, unwrapped.
_DQ_OPEN, _DQ_CLOSE = "<<data-quality>>", "<</data-quality>>"


@dataclasses.dataclass(frozen=True)
class _Limits:
    """What :class:`_Quality` enforces, passed to both the encoder and the error handler."""

    what: str  # "<path> [<split>]" for messages
    max_error_rate: float | None
    max_unusable_in_a_row: int


class _Quality:
    """Per loading process: outcomes of every sample, for the two limits of :class:`_Limits`.

    Unlike ``_WORKER_STATS`` it is never reset, so the share covers everything this process
    has read."""

    def __init__(self) -> None:
        self.read = 0
        self.bad = 0
        self.in_a_row = 0
        self.reasons: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.row_reasons: collections.Counter[str] = collections.Counter()
        self.examples: dict[str, str] = {}

    def ok(self) -> None:
        self.read += 1
        self.in_a_row = 0
        self.row_reasons.clear()
        # ``samples_read`` of a usable sample is counted when its batch is formed (``batch``):
        # energon encodes the samples of its buffers again after a resume, and counting here
        # would count them twice.

    def unusable(self, reason: str, example: str, limits: _Limits, *, error: bool) -> None:
        self.read += 1
        self.in_a_row += 1
        self.bad += error
        self.reasons[reason] += 1
        if error:
            self.errors[reason] += 1
        self.row_reasons[reason] += 1
        self.examples.setdefault(reason, example)
        _WORKER_STATS["samples_read"] += 1
        n = limits.max_unusable_in_a_row
        if n and self.in_a_row >= n:
            raise self._error(
                f"{limits.what}: the last {self.in_a_row} samples read were all unusable "
                f"({self._summary(self.row_reasons)}); no batch can be formed"
            )
        rate = limits.max_error_rate
        if rate is not None and self.read >= MIN_SAMPLES_FOR_RATE and self.bad > rate * self.read:
            raise self._error(
                f"{limits.what}: {self.bad} of {self.read} samples read could not be read or "
                f"decoded ({self.bad / self.read:.1%} > max_error_rate={rate:g}; "
                f"{self._summary(self.errors)})"
            )

    def _summary(self, reasons: collections.Counter[str]) -> str:
        return "; ".join(
            f"{n} {reason}, e.g. {self.examples[reason]}" for reason, n in reasons.most_common(3)
        )

    @staticmethod
    def _error(message: str) -> DataQualityError:
        return DataQualityError(f"{_DQ_OPEN}{message}{_DQ_CLOSE}")

    def should_log(self, reason: str) -> bool:
        """Log the first few skips of each reason; the rest are only counted (``data/*``
        metrics), or a run with many skips writes gigabytes of warnings."""
        return self.reasons[reason] <= _LOGGED_PER_REASON


_LOGGED_PER_REASON = 20
_QUALITY: dict[_Limits, _Quality] = {}


def _quality(limits: _Limits) -> _Quality:
    """This process's tracker for one dataset split (the training and the evaluation loader of
    one process count apart)."""
    return _QUALITY.setdefault(limits, _Quality())


def _unwrap_quality_error(e: BaseException) -> DataQualityError | None:
    text = str(e)
    start, end = text.find(_DQ_OPEN), text.find(_DQ_CLOSE)
    if start < 0 or end < start:
        return None
    return DataQualityError(text[start + len(_DQ_OPEN) : end])


def _where(sources: Any) -> str:
    """``shard[index]`` of a sample, as energon's source info records it."""
    return ", ".join(f"{s.shard_name}[{s.index}]" for s in sources or []) or "?"


def _describe(e: Exception) -> str:
    if isinstance(e, ValidationError):
        # Without the input: pydantic's default text repeats the offending value, which for an
        # image field is kilobytes of raw PNG bytes on the terminal.
        return "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
            for err in e.errors(include_url=False, include_input=False)
        )
    return str(e)


@dataclasses.dataclass(frozen=True)
class _ErrorHandler:
    """Energon's per-sample error hook: count, log (the first few per reason) with the shard +
    index, skip, and raise :class:`DataQualityError` past the limits. A picklable object, so
    worker processes get the limits with it."""

    limits: _Limits

    def __call__(self, e: Exception, sample: Any, sources: list[SourceInfo] | None = None) -> None:
        reason = type(e).__name__
        quality = _quality(self.limits)
        if quality.should_log(reason):
            logger.warning("skipping bad sample %s: %s: %s", _where(sources), reason, _describe(e))
        _WORKER_STATS["bad_sample"] += 1
        quality.unusable(reason, _where(sources), self.limits, error=True)


def _limits(config: DataSourceConfig) -> _Limits:
    return _Limits(
        what=f"{config.path} [{config.split}]",
        max_error_rate=config.max_error_rate,
        max_unusable_in_a_row=config.max_unusable_in_a_row,
    )


# ----------------------------------------------------------------------------- cooked / encoded


@edataclass
class ConversationSample(EnergonSample):
    """A sample as read from a shard: its JSON record and the raw image bytes."""

    record: dict[str, Any]
    image_bytes: list[bytes]


class UnreadableSampleError(OSError):
    """The bytes of a sample could not be read from its shard."""


@stateless
def cook_conversation(raw: dict[str, Any]) -> ConversationSample:
    """Energon cooker: raw tar members (``json``, ``img{i}.*``) -> :class:`ConversationSample`."""
    if READ_ERROR_KEY in raw:  # see _TolerantReader: skipped + counted by the error handler
        raise UnreadableSampleError(raw[READ_ERROR_KEY])
    record = json.loads(raw["json"])
    images = [raw[name] for name in record.get("images", [])]
    return ConversationSample(**basic_sample_keys(raw), record=record, image_bytes=images)


@edataclass
class _Encoded(EnergonSample):
    seq: EncodedSequence


@edataclass
class _Row(EnergonSample):
    row: PackedRow


@edataclass
class _PackedEnergonBatch(Batch):
    packed: PackedBatch
    stats: dict[str, int]


@edataclass
class _Prompt(EnergonSample):
    prompt: PromptSample


@edataclass
class _PromptEnergonBatch(Batch):
    prompts: list[PromptSample]
    stats: dict[str, int]


class _Renderer:
    """Shared by both task encoders: validate, decode images, render and tokenize."""

    def __init__(self, tokenizer: Any, image_config: ImageProcessingConfig) -> None:
        self.tokenizer = tokenizer
        self.image_config = image_config
        self.image_token_id = int(tokenizer.convert_tokens_to_ids(IMAGE_PAD))

    def parse(self, cooked: ConversationSample) -> tuple[Sample, list[Image.Image]]:
        sample = Sample.model_validate({**cooked.record, "images": cooked.image_bytes})
        return sample, [decode_image(b) for b in cooked.image_bytes]

    def images(
        self, images: list[Image.Image]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[int]]:
        return image_patches(images, self.image_config)


# ----------------------------------------------------------------------------- SFT task encoder


class PackingTaskEncoder(TaskEncoder[ConversationSample, _Encoded, _PackedEnergonBatch, Any]):
    """Energon task encoder producing packed micro-batches (see the module docstring)."""

    cookers = (Cooker(cook_conversation),)
    decoder = None  # raw bytes: we decode JSON and images ourselves (PIL, like HF)

    def __init__(self, tokenizer: Any, config: LoaderConfig) -> None:
        self.config = config
        self.limits = _limits(config)
        self.renderer = _Renderer(tokenizer, config.image)
        pad = tokenizer.pad_token_id
        self.pad_id = int(pad if pad is not None else tokenizer.eos_token_id)

    def choose_mode(self, sample: Sample) -> Mode | None:
        """The response used for this sample: its label, its only response, or a seeded draw
        (thinking with probability ``think_ratio``, fixed per (seed, sample id))."""
        if sample.responses is None:
            return None
        if sample.mode is not None:
            return sample.mode
        if len(sample.responses) == 1:
            return next(iter(sample.responses))
        ratio = self.config.think_ratio
        if sample.difficulty is not None:
            by_level = self.config.think_ratio_by_difficulty
            if sample.difficulty in by_level:
                ratio = by_level[sample.difficulty]
            elif self.config.think_min_difficulty is not None:
                return (
                    "thinking"
                    if sample.difficulty >= self.config.think_min_difficulty
                    else "non_thinking"
                )
        # A hash of (seed, sample id) rather than the global `random`: energon reseeds `random`
        # from a sample index that does not advance inside the packing pipeline, which gave
        # every sample the same draw (all thinking). Deterministic and restorable as well.
        digest = hashlib.blake2b(f"{self.config.seed}:{sample.id}".encode(), digest_size=8)
        u = int.from_bytes(digest.digest(), "big") / 2**64
        return "thinking" if u < ratio else "non_thinking"

    def encode(
        self, sample: Sample, images: list[Image.Image], mode: Mode | None
    ) -> EncodedSequence:
        """Render + tokenize one sample with the response of ``mode`` (deterministic)."""
        turns = sample.with_response(mode) if mode else list(sample.conversations)
        if self.config.plain_as_non_thinking:
            turns = [
                Turn(role="assistant", content=EMPTY_THINK + t.content)
                if t.role == "assistant" and response_mode(t.content) is None
                else t
                for t in turns
            ]
        last = turns[-1]
        final = response_mode(last.content) if last.role == "assistant" else None
        pixel_values, grids, counts = self.renderer.images(images)
        tok = tokenize_messages(
            self.renderer.tokenizer,
            turns_to_messages(turns, counts),
            default_system=self.config.default_system,
        )
        tokens = torch.tensor(tok.ids, dtype=torch.long)
        return EncodedSequence(
            sample_id=sample.id,
            tokens=tokens,
            target_mask=torch.tensor(tok.assistant_mask, dtype=torch.bool),
            position_ids=mrope_position_ids(
                tokens, grids, self.renderer.image_token_id, self.config.image.merge_size
            ),
            mode_id=mode_id(final),
            pixel_values=pixel_values,
            image_grid_thw=grids,
        )

    @stateless
    def encode_sample(self, sample: ConversationSample) -> _Encoded:
        parsed, images = self.renderer.parse(sample)
        seq = self.encode(parsed, images, self.choose_mode(parsed))
        if len(seq) > self.config.seq_length:
            _WORKER_STATS["too_long"] += 1
            where = _where(getattr(sample, "__sources__", None))
            reason = f"longer than seq_length={self.config.seq_length}"
            quality = _quality(self.limits)
            if quality.should_log(reason):
                logger.warning(
                    "skipping %s (%s): %d tokens > seq_length %d",
                    parsed.id,
                    where,
                    len(seq),
                    self.config.seq_length,
                )
            example = f"{parsed.id} ({where}) with {len(seq)} tokens"
            quality.unusable(reason, example, self.limits, error=False)
            raise SkipSample()
        _quality(self.limits).ok()
        return _Encoded.derive_from(sample, seq=seq)

    def select_samples_to_pack(self, samples: list[_Encoded]) -> list[list[_Encoded]]:
        groups = first_fit_decreasing([len(s.seq) for s in samples], self.config.seq_length)
        # First-fit-decreasing creates bins longest-first; emitted in that order, the first rows
        # of every buffer would hold only long (thinking) samples and the last ones only short
        # (non-thinking) ones. Emit bins in a deterministic pseudo-random order instead.
        groups.sort(key=lambda g: self._bin_key([samples[i].seq.sample_id for i in g]))
        return [[samples[i] for i in group] for group in groups]

    def _bin_key(self, ids: list[str]) -> bytes:
        return hashlib.blake2b(
            f"{self.config.seed}:{'|'.join(ids)}".encode(), digest_size=8
        ).digest()

    @stateless
    def pack_selected_samples(self, samples: list[_Encoded]) -> _Row:
        row = pack_row([s.seq for s in samples], self.config.seq_length, self.pad_id)
        return _Row.derive_from(samples[0], row=row)

    @stateless
    def batch(self, samples: list[_Row]) -> _PackedEnergonBatch:
        return _PackedEnergonBatch(
            __key__=[s.__key__ for s in samples],
            __restore_key__=(),
            packed=collate_rows([s.row for s in samples]),
            stats=_take_worker_stats(samples_used=sum(len(s.row.sample_ids) for s in samples)),
        )


# ----------------------------------------------------------------------------- prompt encoder


class PromptTaskEncoder(TaskEncoder[ConversationSample, _Prompt, _PromptEnergonBatch, Any]):
    """Energon task encoder producing batches of :class:`PromptSample` (no packing)."""

    cookers = (Cooker(cook_conversation),)
    decoder = None

    def __init__(self, tokenizer: Any, config: PromptLoaderConfig) -> None:
        self.config = config
        self.limits = _limits(config)
        self.renderer = _Renderer(tokenizer, config.image)

    def encode(self, sample: Sample, images: list[Image.Image]) -> PromptSample:
        """Render the prompt turns with the generation prompt (thinking mode ``auto``)."""
        turns = sample.prompt_turns()
        pixel_values, grids, counts = self.renderer.images(images)
        tok = tokenize_messages(
            self.renderer.tokenizer,
            turns_to_messages(turns, counts),
            add_generation_prompt=True,
            default_system=self.config.default_system,
        )
        vllm = render_messages(
            turns_to_messages(turns, None),
            add_generation_prompt=True,
            default_system=self.config.default_system,
        )
        return PromptSample(
            id=sample.id,
            prompt=tok.text,
            prompt_ids=tok.ids,
            vllm_prompt=vllm,
            images=images,
            image_bytes=[b for b in sample.images if isinstance(b, bytes)],
            pixel_values=pixel_values,
            image_grid_thw=grids,
            answer=sample.answer,
            answer_type=sample.answer_type,
            difficulty=sample.difficulty,
            source=sample.source,
        )

    @stateless
    def encode_sample(self, sample: ConversationSample) -> _Prompt:
        parsed, images = self.renderer.parse(sample)
        if parsed.answer is None:
            _WORKER_STATS["no_answer"] += 1
            where = f"{parsed.id} ({_where(getattr(sample, '__sources__', None))})"
            _quality(self.limits).unusable("without an answer", where, self.limits, error=False)
            raise SkipSample()
        prompt = self.encode(parsed, images)
        _quality(self.limits).ok()
        return _Prompt.derive_from(sample, prompt=prompt)

    @stateless
    def batch(self, samples: list[_Prompt]) -> _PromptEnergonBatch:
        return _PromptEnergonBatch(
            __key__=[s.__key__ for s in samples],
            __restore_key__=(),
            prompts=[s.prompt for s in samples],
            stats=_take_worker_stats(samples_used=len(samples)),
        )


# ----------------------------------------------------------------------------- shard checks

READ_ERROR_KEY = "__read_error__"


class _TolerantReader:
    """Wraps energon's tar reader so one unreadable sample does not end the epoch.

    energon reads each sample at its indexed byte offset; a damaged tar header there raises out
    of its iterator (not through its per-sample error handling) and kills the loader. We turn
    the failure into a placeholder record; :func:`cook_conversation` raises on it, so energon's
    error handler logs, counts and skips it like any other bad sample.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __getitem__(self, idx: Any) -> Any:
        try:
            return self.inner[idx]
        except Exception as e:
            shard = "?"
            with contextlib.suppress(Exception):  # private energon API, best effort
                pointer = self.inner._get_itar_sample_pointer(idx)
                shard = self.inner.tar_filenames[pointer.tar_file_id]
            source = SourceInfo(
                dataset_path=self.inner.base_path, index=idx, shard_name=shard, file_names=()
            )
            return {
                "__key__": f"unreadable-{idx}",
                "__shard__": shard,
                "__restore_key__": ("Webdataset", idx),
                "__sources__": (source,),
                READ_ERROR_KEY: f"{shard}[{idx}]: {type(e).__name__}: {e}",
            }

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _make_reads_tolerant(factory: Any) -> None:
    """Make ``factory.build()`` wrap its tar readers in :class:`_TolerantReader`."""
    original = factory.build

    def build(worker_rotation_offset: int = 0) -> Any:
        dataset = original(worker_rotation_offset=worker_rotation_offset)
        # build() returns MapDataset(WebdatasetSampleLoaderDataset(join_readers=[...]), ...)
        loader: Any = getattr(dataset, "dataset", None)
        readers = getattr(loader, "join_readers", None)
        if readers is None:
            logger.warning("energon internals changed: unreadable samples will not be skipped")
            return dataset
        loader.join_readers = [_TolerantReader(r) for r in readers]
        return dataset

    factory.build = build


def _last_indexed_offset(shard: EPath) -> int:
    """End offset of the last sample according to energon's ``.tar.idx`` (8-byte offsets)."""
    idx = EPath(f"{shard}.idx")  # energon writes it next to the shard: x.tar -> x.tar.idx
    size = idx.size()
    with idx.open("rb") as f:
        f.seek(size - 8)
        return int(struct.unpack("Q", f.read(8))[0])


def _count_tar_samples(shard: EPath) -> int:
    keys = set()
    with shard.open("rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        for member in tar:
            m = split_name_re.match(member.name)
            if member.isfile() and m:
                keys.add(m.group(1))
    return len(keys)


def _check_shard(shard: ShardInfo, mode: VerifyMode) -> str | None:
    """Why the shard is unusable, or ``None``. I/O errors are retried (a transient error on one
    rank must not make ranks disagree about which shards exist)."""
    for attempt in range(3):
        try:
            if not shard.path.is_file():
                return "missing"
            size, end = shard.path.size(), _last_indexed_offset(shard.path)
            if size < end:
                return f"truncated ({size} bytes, index expects >= {end})"
            if mode == "headers":
                n = _count_tar_samples(shard.path)
                if n != shard.count:
                    return f"{n} samples readable, {shard.count} indexed"
            return None
        except tarfile.TarError as e:  # deterministic: the bytes are bad
            return f"{type(e).__name__}: {e}"
        except Exception as e:  # I/O: retry, then give up on the shard
            if attempt == 2:
                return f"{type(e).__name__}: {e}"
            time.sleep(0.5 * (attempt + 1))
    return None  # pragma: no cover - the loop always returns


def verify_shards(
    shards: list[ShardInfo], mode: VerifyMode = "size", *, threads: int = 16
) -> dict[str, str]:
    """Find unusable shards before training (energon would crash mid-epoch on them).

    Every rank checks all shards of the split, so all ranks exclude the same ones and energon's
    per-rank slicing stays consistent.

    Args:
        shards: Energon shard infos of a dataset split.
        mode: ``size``: the shard exists and is not shorter than its ``.tar.idx`` says (catches
            truncated uploads and missing files; about four small requests per shard on object
            storage); ``headers``: additionally parse every tar header and count samples
            (catches garbage inside a shard; reads each shard fully); ``none``: skip.
        threads: Shards checked concurrently (the checks wait on I/O).

    Returns:
        ``{shard name: reason}`` of the bad shards.
    """
    if mode == "none" or not shards:
        return {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(threads, len(shards))) as pool:
        reasons = list(pool.map(lambda s: _check_shard(s, mode), shards))
    return {s.name: r for s, r in zip(shards, reasons, strict=True) if r is not None}


# ----------------------------------------------------------------------------- loaders


class _EnergonLoader(Generic[T]):
    """Common part: build the energon pipeline, iterate, count, save/restore state."""

    # 2: energon state as plain containers (loader_state.encode); 1 pickled it, which let a
    # crafted checkpoint run code at resume, so version-1 states are refused, not unpickled.
    _STATE_VERSION = 2

    def __init__(
        self,
        config: DataSourceConfig,
        task_encoder: TaskEncoder[Any, Any, Any, Any],
        *,
        batch_size: int,
        packing_buffer_size: int | None,
        dp_rank: int,
        dp_world_size: int,
    ) -> None:
        if not 0 <= dp_rank < dp_world_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_world_size})")
        self.config = config
        self.dp_rank = dp_rank
        self.dp_world_size = dp_world_size
        self.stats: collections.Counter[str] = collections.Counter()
        self.worker_config = WorkerConfig(
            rank=dp_rank,
            world_size=dp_world_size,
            num_workers=config.num_workers,
            seed_offset=config.seed,
            global_error_handler=_ErrorHandler(_limits(config)),
        )
        path = energon_path(config.path, endpoint=config.s3_endpoint)
        loaded = load_dataset(path).get_datasets(
            training=config.training,
            split_part=config.split,
            worker_config=self.worker_config,
            max_samples_per_sequence=config.max_samples_per_sequence,
            shuffle_over_epochs_multiplier=1,
            decoder=None,
        )
        self.excluded_shards: dict[str, str] = {}
        self._all_shards: list[tuple[Any, list[ShardInfo]]] = []
        for ds in loaded.datasets:
            factory: Any = ds.dataset
            bad = verify_shards(factory.shards, config.verify_shards)
            for name, reason in bad.items():
                count = next(s.count for s in factory.shards if s.name == name)
                logger.error(
                    "corrupted shard %s (%s): skipped, %d samples lost", name, reason, count
                )
                self.stats["corrupt_shards"] += 1
                self.stats["corrupt_shard_samples"] += count
            self.excluded_shards.update(bad)
            self._all_shards.append((factory, list(factory.shards)))
            _make_reads_tolerant(factory)
        self._loaded = loaded
        self._task_encoder = task_encoder
        self._batch_size = batch_size
        self._packing_buffer_size = packing_buffer_size
        self._build()
        self._it: Iterator[Any] | None = None
        self._closed = False

    def _build(self) -> None:
        """(Re)build energon's pipeline over the shards not in :attr:`excluded_shards`."""
        for factory, shards in self._all_shards:
            # `shards` is what the factory's build() slices across ranks and workers.
            factory.shards = [s for s in shards if s.name not in self.excluded_shards]
            if not factory.shards:
                raise RuntimeError(
                    f"{self.config.path} [{self.config.split}]: every shard is corrupted"
                )
        if self.config.training:
            dataset = self._task_encoder.build_train_datasets(
                datasets=self._loaded.datasets,
                worker_config=self.worker_config,
                batch_size=self._batch_size,
                batch_drop_last=True,
                packing_buffer_size=self._packing_buffer_size,
                shuffle_buffer_size=self.config.shuffle_buffer_size,
                blend_mode=self._loaded.blend_mode,
                repeat=True,
            )
        else:
            dataset = self._task_encoder.build_val_datasets(
                datasets=self._loaded.datasets,
                worker_config=self.worker_config,
                batch_size=self._batch_size,
                batch_drop_last=False,
                packing_buffer_size=self._packing_buffer_size,
            )
        self._loader: SavableDataLoader[Any] = get_savable_loader(
            dataset,
            prefetch_factor=self.config.prefetch_factor,
            gc_collect_every_n_steps=self.config.gc_every_n_batches,
        )

    def _next_raw(self) -> Any:
        if self._closed:
            raise RuntimeError("the loader was closed")
        with warnings.catch_warnings():  # energon pins memory; without an accelerator: harmless
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            if self._it is None:
                self._it = iter(self._loader)
            try:
                # torch's DataLoader draws its base seed from the global torch RNG whenever an
                # iterator starts (every start of a stage, resumes included, and each epoch):
                # kept off the trainer's stream, or a resumed run's torch RNG drifts from the
                # uninterrupted run's (found by benchmarks/soak.py). Energon seeds itself.
                with torch.random.fork_rng(devices=[]):
                    batch = next(self._it)
            except Exception as e:
                quality = _unwrap_quality_error(e)
                if quality is None:
                    raise
                raise quality from None
        self.stats.update(batch.stats)
        return batch

    def close(self) -> None:
        """Stop worker processes now (also done on garbage collection, but then torch may wait
        its 5 s join timeout per worker). The loader cannot be iterated afterwards."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()  # GeneratorExit in energon's epoch iterator shuts the workers down
        self._closed = True

    def __enter__(self) -> _EnergonLoader[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        # Not contextlib.suppress: at interpreter shutdown the module may already be None.
        try:  # noqa: SIM105
            self.close()
        except Exception:
            pass

    def state_dict(self) -> dict[str, Any]:
        """This rank's loader state: plain containers and tensors, for ``torch.save`` with the
        checkpoint and ``torch.load(weights_only=True)`` at resume (no pickled objects)."""
        return {
            "version": self._STATE_VERSION,
            "energon": loader_state.encode(self._loader.save_state_rank(), "energon"),
            "stats": dict(self.stats),
            "dp_rank": self.dp_rank,
            "dp_world_size": self.dp_world_size,
            "excluded_shards": sorted(self.excluded_shards),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (same config, rank and world size; before iterating)."""
        if self._it is not None:
            raise RuntimeError("load_state_dict must be called before iterating")
        if state.get("version") == 1:
            raise ValueError(
                "loader state version 1 (pickled energon state) is not loaded: unpickling a "
                "checkpoint can run arbitrary code. Resume it with the release that wrote it, "
                "or start a new run from its weights (train.init_from=<iter dir>/dist, fresh data order)"
            )
        if state.get("version") != self._STATE_VERSION:
            raise ValueError(f"unknown loader state version {state.get('version')}")
        if (state["dp_rank"], state["dp_world_size"]) != (self.dp_rank, self.dp_world_size):
            raise ValueError(
                f"state is for rank {state['dp_rank']}/{state['dp_world_size']}, "
                f"this loader is {self.dp_rank}/{self.dp_world_size}"
            )
        saved = set(state["excluded_shards"])
        newly_bad = sorted(set(self.excluded_shards) - saved)
        repaired = sorted(saved - set(self.excluded_shards))
        if newly_bad and self.config.on_shard_change == "refuse":
            raise ValueError(
                f"{self.config.path} [{self.config.split}]: shards usable when the state was "
                f"saved are unusable now ({', '.join(newly_bad)}); the sample order cannot be "
                "resumed exactly. Repair them, or resume with a fresh sample order "
                "(data.on_shard_change=restart_order)"
            )
        if newly_bad:
            # restart_order: energon's saved positions index the old shard list, so they
            # cannot be applied to the new one; the stage's sample order starts afresh (with a
            # repaired shard back in) and samples read before the resume may come again.
            logger.warning(
                "%s [%s]: shards %s became unusable since the checkpoint "
                "(data.on_shard_change=restart_order): the sample order starts afresh, "
                "not an exact resume",
                self.config.path,
                self.config.split,
                ", ".join(newly_bad),
            )
            now = {k: self.stats[k] for k in ("corrupt_shards", "corrupt_shard_samples")}
            self.stats = collections.Counter(state["stats"])
            self.stats.update({k: v - self.stats[k] for k, v in now.items()})  # today's check
            return
        if repaired:
            # Usable again: left out for the rest of this loader's life, so energon sees the
            # shard list its positions refer to and the resume stays exact. The next stage or
            # run (built without a state) reads the shard again.
            logger.warning(
                "%s [%s]: shards %s were unusable at the checkpoint and are readable now; they "
                "stay left out until the next stage or run (so the resume stays exact)",
                self.config.path,
                self.config.split,
                ", ".join(repaired),
            )
            self.excluded_shards.update(dict.fromkeys(repaired, "unusable at the checkpoint"))
            self._build()
        energon_state = loader_state.decode(state["energon"], "energon")
        if not isinstance(energon_state, SavableDataLoaderState):
            raise ValueError(
                f"energon: a {type(energon_state).__qualname__}, not a SavableDataLoaderState"
            )
        self._loader.restore_state_rank(energon_state)
        self.stats = collections.Counter(state["stats"])


class PackedLoader(_EnergonLoader[PackedBatch]):
    """Iterator of :class:`PackedBatch` for one data-parallel rank.

    Example:
        >>> loader = build_packed_loader(  # doctest: +SKIP
        ...     LoaderConfig(path="/data/digits", seq_length=512, micro_batch_size=4),
        ...     "/data/tok", dp_rank=0, dp_world_size=1)
        >>> batch = next(loader)  # doctest: +SKIP
    """

    def __iter__(self) -> Iterator[PackedBatch]:
        return self

    def __next__(self) -> PackedBatch:
        return self._next_raw().packed  # type: ignore[no-any-return]


class PromptLoader(_EnergonLoader[list[PromptSample]]):
    """Iterator of ``list[PromptSample]`` (one RL step's prompts on this rank)."""

    def __iter__(self) -> Iterator[list[PromptSample]]:
        return self

    def __next__(self) -> list[PromptSample]:
        return self._next_raw().prompts  # type: ignore[no-any-return]


def build_packed_loader(
    config: LoaderConfig, tokenizer: Any, *, dp_rank: int, dp_world_size: int
) -> PackedLoader:
    """The packed SFT loader for one data-parallel rank.

    Args:
        config: Loader settings.
        tokenizer: HF fast tokenizer or the path of a local HF tokenizer dir.
        dp_rank: Rank in the data-parallel group (not the global rank).
        dp_world_size: Size of the data-parallel group.

    Returns:
        An iterator of :class:`PackedBatch` with ``state_dict`` / ``load_state_dict``.
    """
    encoder = PackingTaskEncoder(load_tokenizer(tokenizer), config)
    return PackedLoader(
        config,
        encoder,
        batch_size=config.micro_batch_size,
        packing_buffer_size=config.packing_buffer_size,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
    )


def build_prompt_loader(
    config: PromptLoaderConfig, tokenizer: Any, *, dp_rank: int, dp_world_size: int
) -> PromptLoader:
    """The RL prompt loader for one data-parallel rank (same state handling as SFT).

    Samples without a ground-truth ``answer`` are skipped (counted as ``no_answer``).
    """
    encoder = PromptTaskEncoder(load_tokenizer(tokenizer), config)
    return PromptLoader(
        config,
        encoder,
        batch_size=config.batch_size,
        packing_buffer_size=None,
        dp_rank=dp_rank,
        dp_world_size=dp_world_size,
    )
