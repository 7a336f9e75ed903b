"""Local folders and S3-compatible object storage behind one small interface.

Shards are written with ``fsspec`` (``s3fs`` for ``s3://``), and read by megatron-energon, whose
paths understand ``msc://PROFILE/...`` (multi-storage-client) but not ``s3://``. So for reading we
translate ``s3://bucket/prefix`` into ``msc://autothink-s3-<bucket>/prefix`` and register that
profile in an MSC config file (endpoint and region only; credentials come from the usual AWS
environment variables through boto3's default chain and are never written to disk).

Endpoint: ``--s3-endpoint`` / ``endpoint=`` wins, else ``AWS_ENDPOINT_URL``; region
``AWS_DEFAULT_REGION`` / ``AWS_REGION`` (default ``us-east-1``).
"""

from __future__ import annotations

import os
import tempfile
import threading
from typing import Any

import fsspec
import yaml

S3_PREFIX = "s3://"
MSC_PREFIX = "msc://"
_MSC_LOCK = threading.Lock()


def s3_endpoint(endpoint: str | None = None) -> str | None:
    """The S3 endpoint to use: the argument, else ``AWS_ENDPOINT_URL``, else AWS's default."""
    return endpoint or os.environ.get("AWS_ENDPOINT_URL") or None


def _region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


def filesystem(path: str, *, endpoint: str | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """An fsspec filesystem and the path inside it for a local path or ``s3://`` URL.

    Args:
        path: Local path or ``s3://bucket/prefix``.
        endpoint: S3 endpoint URL (see :func:`s3_endpoint`).

    Returns:
        ``(fs, root)``: ``root`` has no trailing slash (``bucket/prefix`` for S3).
    """
    if path.startswith(S3_PREFIX):
        import s3fs

        url = s3_endpoint(endpoint)
        # skip_instance_cache: tests start servers on fresh ports; a cached client would point at
        # a dead endpoint. Credentials: env vars via botocore's default chain.
        fs = s3fs.S3FileSystem(
            endpoint_url=url,
            client_kwargs={"region_name": _region()},
            skip_instance_cache=True,
        )
        return fs, path[len(S3_PREFIX) :].rstrip("/")
    if path.startswith(MSC_PREFIX):
        raise ValueError(f"writing to msc:// is not supported, use s3:// ({path})")
    fs = fsspec.filesystem("file")
    return fs, os.path.abspath(path).rstrip("/")


def msc_profile_name(bucket: str) -> str:
    """Name of the MSC profile we register for an S3 bucket."""
    return f"autothink-s3-{bucket}"


def register_s3_profile(bucket: str, *, endpoint: str | None = None) -> str:
    """Make ``msc://autothink-s3-<bucket>/`` resolve to the S3 bucket, for energon.

    Writes a private MSC config (merging the one ``MSC_CONFIG`` pointed to, if any) and points
    ``MSC_CONFIG`` at it. Set before energon's loader forks its workers, so they inherit it.

    Args:
        bucket: Bucket name.
        endpoint: S3 endpoint (see :func:`s3_endpoint`).

    Returns:
        The profile name.
    """
    profile = msc_profile_name(bucket)
    options: dict[str, Any] = {"base_path": bucket, "region_name": _region()}
    url = s3_endpoint(endpoint)
    if url:
        options["endpoint_url"] = url
    with _MSC_LOCK:
        config: dict[str, Any] = {}
        current = os.environ.get("MSC_CONFIG")
        if current and os.path.isfile(current):
            with open(current) as f:
                config = yaml.safe_load(f) or {}
        profiles = config.setdefault("profiles", {})
        wanted = {"storage_provider": {"type": "s3", "options": options}}
        if profiles.get(profile) == wanted and current:
            return profile
        profiles[profile] = wanted
        fd, cfg_path = tempfile.mkstemp(prefix="autothink-msc-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            yaml.safe_dump(config, f)
        os.environ["MSC_CONFIG"] = cfg_path
        _reset_msc_clients()
    return profile


def _reset_msc_clients() -> None:
    # MSC caches one client per profile; a re-registered profile (new endpoint) must not reuse
    # the stale one. The cache is module state without a public reset, hence the guarded access.
    try:
        from multistorageclient import shortcuts

        cache = getattr(shortcuts, "_STORAGE_CLIENT_CACHE", None)
        if isinstance(cache, dict):
            cache.clear()
    except ImportError:  # pragma: no cover - energon[s3] always brings MSC
        pass


def energon_path(path: str, *, endpoint: str | None = None) -> str:
    """Translate a dataset location into a path megatron-energon can open.

    Local paths become absolute, ``msc://`` passes through, ``s3://bucket/prefix`` becomes
    ``msc://autothink-s3-<bucket>/prefix`` (registering the profile).

    Example:
        >>> energon_path("msc://prof/data")
        'msc://prof/data'
    """
    if path.startswith(MSC_PREFIX):
        return path
    if path.startswith(S3_PREFIX):
        bucket, _, prefix = path[len(S3_PREFIX) :].partition("/")
        profile = register_s3_profile(bucket, endpoint=endpoint)
        return f"{MSC_PREFIX}{profile}/{prefix.strip('/')}"
    return os.path.abspath(path)
