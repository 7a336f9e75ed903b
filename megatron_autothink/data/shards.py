"""Prepare WebDataset shards (plus megatron-energon metadata) from conversation data.

Input: JSONL / JSON in the LLaVA / ShareGPT layout (image paths relative to the file) or Parquet
with embedded image bytes; or :class:`~megatron_autothink.data.schema.Sample` objects from a
generator (the digits set). Output, in a local folder or ``s3://bucket/prefix``::

    {split}-000000.tar            WebDataset shards, each <= max_shard_size (one sample may exceed
    {split}-000000.tar.idx        it alone); members {key}.json + {key}.img{i}.{png|jpg}
    .nv-meta/                     energon metadata (index, split.yaml, dataset.yaml: CrudeWebdataset)
    .autothink/manifest.json      our progress + summary: committed shards, input cursor, counters

Every record is validated into the schema, its images decoded, capped to ``max_pixels`` and
re-encoded when needed, and (with a tokenizer) its rendered length checked. Bad records are
skipped, counted by reason and reported with file + line/row; the run fails only when the share
of bad records exceeds ``max_error_rate``.

Resume: the manifest is rewritten after each committed shard with the input position after that
shard's last record. A re-run with the same inputs and options deletes uncommitted leftovers and
continues there, so no sample is written twice; a complete split is refused unless ``overwrite``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

from PIL import Image
from tqdm import tqdm

from megatron_autothink.data.chat_template import tokenize_messages, turns_to_messages
from megatron_autothink.data.image_processing import (
    ImageProcessingConfig,
    cap_image,
    encode_image,
    num_image_tokens,
    smart_resize,
)
from megatron_autothink.data.schema import Sample
from megatron_autothink.data.sources import (
    BadRecord,
    SourceFn,
    SourceItem,
    file_source,
    input_fingerprint,
    record_to_sample,
)
from megatron_autothink.data.storage import energon_path, filesystem
from megatron_autothink.fileio import current_umask

logger = logging.getLogger(__name__)

MANIFEST_PATH = ".autothink/manifest.json"
MANIFEST_FORMAT = "autothink-shards/1"
#: At most this many bad records are kept (with location) in the manifest; all are counted.
MAX_REPORTED_ERRORS = 1000
#: Fail fast when, after this many records, more than half are bad: the input is likely broken.
EARLY_ABORT_MIN_RECORDS = 100

ImageFormat = Literal["auto", "png", "jpeg"]
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


class PrepError(RuntimeError):
    """The prep run cannot proceed (already complete, options changed, too many bad records)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrepOptions:
    """Options of :func:`prep_shards` / :func:`write_samples`."""

    split: str = "train"
    """Split part name; shards are ``{split}-NNNNNN.tar`` and energon's split.yaml maps them."""
    max_shard_size: int = 64 * 1024 * 1024
    """Bytes per shard (a tar is closed before it would grow past this)."""
    max_pixels: int | None = 28 * 28 * 1280
    """Cap on stored image pixels (downscaled above; ``None``: no cap)."""
    image_format: ImageFormat = "auto"
    """``auto``: keep JPEG/PNG bytes when nothing changes, else PNG (JPEG stays JPEG)."""
    max_tokens: int | None = None
    """Skip samples whose rendered length exceeds this (needs ``tokenizer``)."""
    tokenizer: str | None = None
    """Local HF tokenizer dir for the length check."""
    image_config: ImageProcessingConfig = dataclasses.field(default_factory=ImageProcessingConfig)
    """The loader's image settings, to count image tokens in the length check."""
    max_error_rate: float = 0.01
    """Fail the run when bad records / all records exceeds this."""
    allow_prompt_only: bool = False
    """Accept samples without assistant turn when they have an ``answer`` (RL prompt data)."""
    overwrite: bool = False
    """Delete a previous run of this split (complete or not) and start again."""
    s3_endpoint: str | None = None
    """S3 endpoint URL (else ``AWS_ENDPOINT_URL``)."""
    progress: bool = True
    """Show a tqdm progress bar."""

    def fingerprint(self) -> dict[str, Any]:
        """Options that change the output; a resume requires them unchanged."""
        return {
            "split": self.split,
            "max_shard_size": self.max_shard_size,
            "max_pixels": self.max_pixels,
            "image_format": self.image_format,
            "max_tokens": self.max_tokens,
            "tokenizer": os.path.abspath(self.tokenizer) if self.tokenizer else None,
            "image_config": dataclasses.asdict(self.image_config),
            "allow_prompt_only": self.allow_prompt_only,
        }


@dataclasses.dataclass
class PrepReport:
    """What a prep run did (also stored in the manifest)."""

    out: str
    split: str
    records: int = 0
    """Records read (written + skipped)."""
    written: int = 0
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    """Skipped records by reason."""
    errors: list[dict[str, str]] = dataclasses.field(default_factory=list)
    """The first bad records: ``{"location", "reason", "detail"}``."""
    shards: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """Committed shards: ``{"name", "samples", "bytes"}``."""
    resumed: bool = False
    seconds: float = 0.0

    @property
    def error_rate(self) -> float:
        """Share of records skipped."""
        return sum(self.skipped.values()) / self.records if self.records else 0.0

    def summary(self) -> str:
        """A few human-readable lines."""
        lines = [
            f"{self.out} [{self.split}]: {self.written} written, "
            f"{sum(self.skipped.values())} skipped of {self.records} records "
            f"({100 * self.error_rate:.2f}% bad) in {len(self.shards)} shards"
            + (" (resumed)" if self.resumed else "")
        ]
        for reason, n in sorted(self.skipped.items()):
            lines.append(f"  skipped {reason}: {n}")
        for err in self.errors[:5]:
            lines.append(f"  e.g. {err['location']}: {err['reason']}: {err['detail']}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- samples -> tar


def _prepare_image(
    src: str | bytes, base_dir: str, max_pixels: int | None, fmt: ImageFormat
) -> tuple[bytes, str, tuple[int, int]]:
    """Read, verify, cap and (if needed) re-encode one image.

    Returns:
        ``(bytes, extension, (width, height))``.
    """
    if isinstance(src, str):
        path = src if os.path.isabs(src) else os.path.join(base_dir, src)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise BadRecord("missing_image", f"{src}: {e.strerror or e}") from e
    else:
        data = src
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
        orig_format = img.format
        capped = cap_image(img, max_pixels) if max_pixels else img.convert("RGB")
    except Exception as e:  # PIL raises many types for bad data
        name = src if isinstance(src, str) else "<bytes>"
        raise BadRecord("bad_image", f"{name}: cannot decode ({type(e).__name__}: {e})") from e
    unchanged = capped.size == img.size and img.mode == "RGB"
    target = ("jpeg" if orig_format == "JPEG" else "png") if fmt == "auto" else fmt
    ext = "jpg" if target == "jpeg" else "png"
    if unchanged and orig_format == ("JPEG" if target == "jpeg" else "PNG"):
        return data, ext, capped.size
    return encode_image(capped, target), ext, capped.size


class _LengthChecker:
    """Counts rendered tokens of a sample (longest response when it carries several)."""

    def __init__(self, tokenizer_dir: str, image_config: ImageProcessingConfig) -> None:
        from megatron_autothink.data.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.image_config = image_config

    def count(self, sample: Sample, sizes: list[tuple[int, int]]) -> int:
        cfg = self.image_config
        counts = []
        for w, h in sizes:
            rh, rw = smart_resize(h, w, cfg.factor, cfg.min_pixels, cfg.max_pixels)
            counts.append(
                num_image_tokens((1, rh // cfg.patch_size, rw // cfg.patch_size), cfg.merge_size)
            )
        modes = list(sample.responses) if sample.responses else [None]
        longest = 0
        for mode in modes:
            turns = sample.with_response(mode) if mode else sample.conversations
            ids = tokenize_messages(self.tokenizer, turns_to_messages(turns, counts)).ids
            longest = max(longest, len(ids))
        return longest


def sample_to_members(
    sample: Sample,
    *,
    base_dir: str,
    options: PrepOptions,
    length_checker: _LengthChecker | None = None,
) -> dict[str, bytes]:
    """Turn a validated sample into tar members ``{extension: bytes}`` (``json``, ``img{i}.*``).

    Raises:
        BadRecord: For missing / undecodable images or a sample over ``max_tokens``.
    """
    members: dict[str, bytes] = {}
    names: list[str] = []
    sizes: list[tuple[int, int]] = []
    for i, src in enumerate(sample.images):
        data, ext, size = _prepare_image(src, base_dir, options.max_pixels, options.image_format)
        name = f"img{i}.{ext}"
        members[name] = data
        names.append(name)
        sizes.append(size)
    if length_checker is not None and options.max_tokens is not None:
        n = length_checker.count(sample, sizes)
        if n > options.max_tokens:
            raise BadRecord("too_long", f"{n} tokens > max_tokens={options.max_tokens}")
    record = sample.model_dump(mode="json", exclude_none=True, exclude={"images"})
    record["images"] = names  # member names, resolved by the loader
    members["json"] = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode()
    return {"json": members.pop("json"), **members}


class _TarShard:
    """A tar being filled in a local file (deterministic headers: mtime 0, root owner)."""

    def __init__(self, local_path: str) -> None:
        self.local_path = local_path
        # Both stay open while the shard fills up; close() closes them.
        self._file = open(local_path, "wb")  # noqa: SIM115
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115
        self.count = 0

    def final_size(self, members: dict[str, bytes]) -> int:
        """Size of the closed tar if ``members`` were added: a 512-byte header per member, data
        padded to 512 bytes, two end blocks, the whole padded to tarfile's 10 KiB records."""
        add = sum(512 + (len(v) + 511) // 512 * 512 for v in members.values())
        raw = self._file.tell() + add + 1024
        return (raw + tarfile.RECORDSIZE - 1) // tarfile.RECORDSIZE * tarfile.RECORDSIZE

    def add(self, key: str, members: dict[str, bytes]) -> None:
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mode = 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self.count += 1

    def close(self) -> int:
        self._tar.close()
        self._file.close()
        return os.path.getsize(self.local_path)


# ----------------------------------------------------------------------------- manifest + run


class _Output:
    """The output location: shards, manifest, atomic writes (local rename / single S3 PUT)."""

    def __init__(self, out: str, endpoint: str | None) -> None:
        self.url = out
        self.fs, self.root = filesystem(out, endpoint=endpoint)
        self.remote = out.startswith("s3://")
        self.endpoint = endpoint
        if not self.remote:
            os.makedirs(self.root, exist_ok=True)

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def read_json(self, rel: str) -> dict[str, Any] | None:
        if not self.fs.exists(self.path(rel)):
            return None
        with self.fs.open(self.path(rel), "rb") as f:
            return json.loads(f.read())  # type: ignore[no-any-return]

    def write_json(self, rel: str, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, indent=1, sort_keys=True).encode()
        if self.remote:
            self.fs.pipe_file(self.path(rel), data)  # one PUT: atomic on object storage
            return
        target = self.path(rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".tmp-")
        # mkstemp creates 0600; the manifest is read by whoever reads the shards (other users,
        # the training job's account), so give it the mode a plain open() would.
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)

    def commit_file(self, local_path: str, rel: str) -> None:
        if self.remote:
            self.fs.put_file(local_path, self.path(rel))
            os.remove(local_path)
        else:
            os.replace(local_path, self.path(rel))

    def list_names(self) -> list[str]:
        self.fs.invalidate_cache()  # s3fs caches listings; we just wrote/deleted objects
        if not self.fs.exists(self.root):
            return []
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.root, detail=False))

    def remove(self, rel: str) -> None:
        p = self.path(rel)
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def scratch_dir(self) -> str:
        # Shards are built next to their destination locally (rename is then atomic), in a
        # temp dir for S3 (uploaded when complete).
        if self.remote:
            return tempfile.mkdtemp(prefix="autothink-shards-")
        return self.root


def _empty_split_state(fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {
        "status": "in_progress",
        "fingerprint": fingerprint,
        "cursor": [0, 0],
        "shards": [],
        "records": 0,
        "written": 0,
        "skipped": {},
        "errors": [],
        "updated": time.time(),
    }


class _ShardRun:
    """One prep run of one split: resume logic, shard rotation, manifest commits."""

    def __init__(self, out: str, options: PrepOptions, input_id: dict[str, Any]) -> None:
        if not _SPLIT_RE.match(options.split):
            raise ValueError(f"split name must match {_SPLIT_RE.pattern}, got {options.split!r}")
        self.options = options
        self.output = _Output(out, options.s3_endpoint)
        self.fingerprint = {"options": options.fingerprint(), "inputs": input_id}
        manifest = self.output.read_json(MANIFEST_PATH) or {}
        if manifest and manifest.get("format") != MANIFEST_FORMAT:
            raise PrepError(f"{out}: unknown manifest format {manifest.get('format')!r}")
        self.manifest: dict[str, Any] = manifest or {"format": MANIFEST_FORMAT, "splits": {}}
        splits = self.manifest["splits"]
        state = splits.get(options.split)
        self.resumed = False
        prefix = f"{options.split}-"
        if options.overwrite:
            self._delete_split()
            state = None
        elif state is None and any(n.startswith(prefix) for n in self.output.list_names()):
            raise PrepError(
                f"{out} has {prefix}* files that no prep run of ours recorded; refusing to touch "
                "them (use --overwrite to delete them, or another --out)"
            )
        if state is not None:
            if state["fingerprint"] != self.fingerprint:
                raise PrepError(
                    f"{out} [{options.split}] was prepared from other inputs or options; "
                    "rerun with --overwrite to replace it (or write to another --out)"
                )
            if state["status"] == "complete":
                raise PrepError(
                    f"{out} [{options.split}] is already complete "
                    f"({state['written']} samples in {len(state['shards'])} shards); "
                    "use --overwrite to rebuild it"
                )
            self.resumed = True
        else:
            state = _empty_split_state(self.fingerprint)
        splits[options.split] = state
        self.state = state
        if self.resumed:
            self._remove_uncommitted()
        else:
            self._save()  # from now on, files of this split are ours (see the check above)

    # -- bookkeeping
    def _shard_names(self) -> set[str]:
        return {s["name"] for s in self.state["shards"]}

    def _remove_uncommitted(self) -> None:
        """Delete leftovers of an interrupted run: shards not in the manifest, partial files."""
        keep = self._shard_names()
        prefix = f"{self.options.split}-"
        for name in self.output.list_names():
            if name.startswith(prefix) and name.split(".tar")[0] + ".tar" not in keep:
                logger.info("removing uncommitted %s", name)
                self.output.remove(name)

    def _delete_split(self) -> None:
        prefix = f"{self.options.split}-"
        for name in self.output.list_names():
            if name.startswith(prefix):
                self.output.remove(name)
        self.manifest["splits"].pop(self.options.split, None)
        self.manifest.pop("energon", None)
        self.output.write_json(MANIFEST_PATH, self.manifest)

    def _record_error(self, location: str, err: BadRecord) -> None:
        skipped = self.state["skipped"]
        skipped[err.reason] = skipped.get(err.reason, 0) + 1
        if len(self.state["errors"]) < MAX_REPORTED_ERRORS:
            self.state["errors"].append(
                {"location": location, "reason": err.reason, "detail": err.detail}
            )
        logger.warning("skip %s: %s: %s", location, err.reason, err.detail)

    def _commit(self, shard: _TarShard, name: str, cursor: tuple[int, int]) -> None:
        nbytes = shard.close()
        self.output.commit_file(shard.local_path, name)
        self.state["shards"].append({"name": name, "samples": shard.count, "bytes": nbytes})
        self._save(cursor)

    def _save(self, cursor: tuple[int, int] | None = None) -> None:
        if cursor is not None:
            self.state["cursor"] = list(cursor)
        self.state["updated"] = time.time()
        self.output.write_json(MANIFEST_PATH, self.manifest)

    # -- main loop
    def run(self, source: SourceFn, total: int | None, finalize: bool = True) -> PrepReport:
        t0 = time.time()
        opts = self.options
        st = self.state
        checker = (
            _LengthChecker(opts.tokenizer, opts.image_config)
            if opts.tokenizer and opts.max_tokens is not None
            else None
        )
        if opts.max_tokens is not None and checker is None:
            raise ValueError("max_tokens needs a tokenizer directory")
        if st["status"] == "in_progress":
            scratch = self.output.scratch_dir()
            shard: _TarShard | None = None
            shard_name = ""
            cursor: tuple[int, int] = (int(st["cursor"][0]), int(st["cursor"][1]))
            pbar = tqdm(
                total=total,
                initial=st["records"],
                unit="rec",
                desc=f"prep {opts.split}",
                disable=not opts.progress or None,
            )
            try:
                # Counters and cursor always advance together, so a manifest saved at a shard
                # commit describes exactly the records before `prev` (none counted twice).
                prev = cursor
                for item in source(cursor):
                    pbar.update(1)
                    try:
                        members = self._to_members(item, checker)
                    except BadRecord as err:
                        st["records"] += 1
                        self._record_error(item.location, err)
                        prev = item.cursor
                        self._maybe_abort()
                        continue
                    if shard is not None and shard.final_size(members) > opts.max_shard_size:
                        self._commit(shard, shard_name, prev)
                        shard = None
                    if shard is None:
                        shard_name = f"{opts.split}-{len(st['shards']):06d}.tar"
                        shard = _TarShard(os.path.join(scratch, shard_name + ".partial"))
                    shard.add(f"{opts.split}_{st['written']:09d}", members)
                    st["records"] += 1
                    st["written"] += 1
                    prev = item.cursor
                if shard is not None:
                    self._commit(shard, shard_name, prev)
                    shard = None
                st["status"] = "written"
                self._save(prev)
            finally:
                pbar.close()
                if self.output.remote:
                    shutil.rmtree(scratch, ignore_errors=True)
        report = self.report(time.time() - t0)
        if report.error_rate > opts.max_error_rate:
            raise PrepError(
                f"{report.error_rate:.2%} of records were bad (> max_error_rate "
                f"{opts.max_error_rate:.2%}); shards are written but the dataset is not "
                f"finalized. Fix the input (see the report) or rerun with a higher "
                f"--max-error-rate.\n{report.summary()}"
            )
        if finalize:
            self._finalize()
        return report

    def _maybe_abort(self) -> None:
        n, bad = self.state["records"], sum(self.state["skipped"].values())
        if n >= EARLY_ABORT_MIN_RECORDS and bad / n > max(0.5, self.options.max_error_rate):
            raise PrepError(
                f"{bad} of the first {n} records are bad; the input looks broken. "
                f"First errors: {self.state['errors'][:3]}"
            )

    def _to_members(self, item: SourceItem, checker: _LengthChecker | None) -> dict[str, bytes]:
        payload = item.payload
        if isinstance(payload, BadRecord):
            raise payload
        if isinstance(payload, dict):
            fallback = str(payload.pop("__fallback_id__", item.location))
            sample = record_to_sample(payload, fallback_id=fallback, source=item.source)
        else:
            sample = payload
        prompt_only_ok = self.options.allow_prompt_only and sample.answer is not None
        if not sample.has_assistant() and not prompt_only_ok:
            raise BadRecord("no_assistant_turn", "no assistant turn to train on")
        return sample_to_members(
            sample, base_dir=item.base_dir, options=self.options, length_checker=checker
        )

    def _finalize(self) -> None:
        """Write energon metadata over the shards of all finished splits."""
        splits = {
            name: s for name, s in self.manifest["splits"].items() if s["status"] != "in_progress"
        }
        shard_names = [sh["name"] for s in splits.values() for sh in s["shards"]]
        if not shard_names:
            raise PrepError(f"{self.output.url} [{self.options.split}]: no sample was written")
        prepare_energon_metadata(
            self.output.url,
            shard_names,
            # energon brace-expands patterns and drops backslashes, so no `\d` / `\.` here.
            {name: f"{name}-[0-9]+[.]tar$" for name, s in splits.items() if s["shards"]},
            endpoint=self.options.s3_endpoint,
        )
        for s in splits.values():
            s["status"] = "complete"
        self.manifest["energon"] = {"shards": len(shard_names), "splits": sorted(splits)}
        self._save()

    def report(self, seconds: float = 0.0) -> PrepReport:
        st = self.state
        return PrepReport(
            out=self.output.url,
            split=self.options.split,
            records=st["records"],
            written=st["written"],
            skipped=dict(st["skipped"]),
            errors=list(st["errors"]),
            shards=list(st["shards"]),
            resumed=self.resumed,
            seconds=seconds,
        )


def prepare_energon_metadata(
    out: str,
    shard_names: Sequence[str],
    split_patterns: dict[str, str],
    *,
    endpoint: str | None = None,
) -> None:
    """Index the shards with energon (``energon prepare`` equivalent) and write dataset.yaml.

    Uses ``BaseWebdatasetFactory.prepare_dataset`` (what the CLI calls) with split parts given by
    regex, then a ``dataset.yaml`` declaring a ``CrudeWebdataset`` (our loader cooks the raw
    members itself, see :mod:`megatron_autothink.data.loader`).

    Args:
        out: Dataset folder or ``s3://`` URL.
        shard_names: Shard file names relative to ``out``.
        split_patterns: Split part -> regex over shard names.
        endpoint: S3 endpoint for ``s3://`` outputs.
    """
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors import BaseWebdatasetFactory

    path = EPath(energon_path(out, endpoint=endpoint))
    BaseWebdatasetFactory.prepare_dataset(
        path,
        list(shard_names),
        split_parts_patterns=list(split_patterns.items()),
        workers=max(1, min(4, os.cpu_count() or 1, len(shard_names))),
    )
    with (path / ".nv-meta" / "dataset.yaml").open("w") as f:
        f.write("__module__: megatron.energon\n__class__: CrudeWebdataset\n")


# ----------------------------------------------------------------------------- entry points


def prep_shards(
    inputs: Sequence[str | os.PathLike[str]], out: str, options: PrepOptions | None = None
) -> PrepReport:
    """Convert JSONL / JSON / Parquet conversation files into an energon WebDataset.

    Args:
        inputs: Input files (``.jsonl``, ``.json``, ``.parquet``), processed in order.
        out: Output folder or ``s3://bucket/prefix``.
        options: See :class:`PrepOptions`.

    Returns:
        The run's :class:`PrepReport` (also in ``out/.autothink/manifest.json``).

    Raises:
        PrepError: The split is already complete (without ``overwrite``), was made from other
            inputs/options, or too many records were bad.
    """
    opts = options or PrepOptions()
    run = _ShardRun(out, opts, {"files": input_fingerprint(inputs)})
    return run.run(file_source(inputs), total=None)


def write_samples(
    samples: Callable[[int], Iterable[Sample]],
    out: str,
    options: PrepOptions | None = None,
    *,
    total: int | None = None,
    source_id: dict[str, Any] | None = None,
    finalize: bool = True,
) -> PrepReport:
    """Write generated samples (e.g. the digits set) through the same shard pipeline.

    Args:
        samples: ``start -> samples from index start on``; must be deterministic so a resumed run
            continues with exactly the samples not yet committed.
        out: Output folder or ``s3://bucket/prefix``.
        options: See :class:`PrepOptions`.
        total: Number of samples (for the progress bar).
        source_id: Identity of the generator (parameters); a resume requires it unchanged.
        finalize: Write the energon metadata afterwards (over all finished splits); pass
            ``False`` when more splits follow and finalize with the last one.

    Returns:
        The run's :class:`PrepReport`.
    """
    opts = options or PrepOptions()

    def source(cursor: tuple[int, int]) -> Iterator[SourceItem]:
        for i, sample in enumerate(samples(cursor[1]), start=cursor[1]):
            yield SourceItem(
                cursor=(0, i + 1),
                location=f"{sample.id}",
                payload=sample,
                base_dir=".",
                source=None,
            )

    run = _ShardRun(out, opts, {"generator": source_id or {}})
    return run.run(source, total=total, finalize=finalize)


def read_manifest(out: str, *, endpoint: str | None = None) -> dict[str, Any] | None:
    """The prep manifest of a dataset (``None`` if it was not written by us)."""
    return _Output(out, endpoint).read_json(MANIFEST_PATH)
