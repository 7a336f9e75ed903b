"""One typed config tree for every stage of megatron-autothink.

A run is described by one YAML file (``recipes/*.yaml``) plus dotted overrides from the command
line (``train.lr=1e-5 parallel.tp=2``). Everything is validated before any work starts: unknown
keys, wrong types and impossible parallel layouts fail with a message naming the key.

Why pydantic and not plain dataclasses: we get per-field type coercion from YAML/CLI strings and
error messages that carry the dotted location for free, with ``extra="forbid"`` catching typos.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key and the allowed values."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class VisionConfig(_Section):
    """Qwen2.5-VL vision tower (HF ``vision_config``)."""

    depth: int = 2
    """Number of ViT blocks."""
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    patch_size: int = 14
    temporal_patch_size: int = 2
    in_channels: int = 3
    spatial_merge_size: int = 2
    window_size: int = 56
    """Window attention size in pixels (HF default 112); blocks not in ``fullatt_block_indexes``
    attend within windows of ``window_size // patch_size // spatial_merge_size`` merged tokens."""
    fullatt_block_indexes: list[int] = Field(default_factory=lambda: [1])
    rms_norm_eps: float = 1e-6


class ModelConfig(_Section):
    """Qwen2.5-VL-architecture VLM: a megatron GPT stack plus a vision tower."""

    name: str = "tiny"
    """Free-form size label (``tiny``, ``qwen2.5-vl-3b``, ...); shapes come from the fields below."""
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: int = 256
    num_attention_heads: int = 4
    num_query_groups: int = 2
    """GQA: key/value heads."""
    vocab_size: int = 1024
    """Tokenizer vocabulary; padded up for TP by ``make_vocab_size_divisible_by``."""
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 4096
    rope_theta: float = 1_000_000.0
    mrope_section: list[int] = Field(default_factory=lambda: [4, 6, 6])
    """Rotary frequencies given to (t, h, w); sums to head_dim // 2."""
    rms_norm_eps: float = 1e-6
    add_qkv_bias: bool = True
    tie_word_embeddings: bool = True
    image_token_id: int = -1
    """Id of ``<|image_pad|>``; -1 means: read from the tokenizer at build time."""
    vision: VisionConfig = Field(default_factory=VisionConfig)
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """``auto``: Transformer Engine layers when TE imports and a GPU is present, else local."""
    fp8: Literal["none", "hybrid", "e4m3"] = "none"
    """FP8 recipe for TE layers on Hopper; must be ``none`` with local layers. Checked against the
    machine at start-up (``models.specs.resolve_backend``): needs Transformer Engine and a GPU with
    compute capability >= 8.9, else a config error."""
    recompute: Literal["none", "selective", "full"] = "none"
    """Activation recompute in the language model: ``selective`` recomputes core attention,
    ``full`` every transformer layer (megatron ``recompute_method=uniform``, one layer per unit)."""
    init_method_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# ----------------------------------------------------------------------------------------------
# Parallelism, data, optimisation, training
# ----------------------------------------------------------------------------------------------


class ParallelConfig(_Section):
    tp: int = Field(1, ge=1)
    """Tensor-parallel size."""
    pp: int = Field(1, ge=1)
    """Pipeline-parallel size."""
    vpp: int | None = Field(None, ge=1)
    """Virtual pipeline stages per rank (interleaved 1F1B); ``None`` disables."""
    cp: int = Field(1, ge=1)
    """Context-parallel size. Only 1 for now: splitting packed rows across CP ranks is not
    implemented (refused with an error, not run wrongly)."""
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """``auto``: nccl with CUDA, gloo without."""


class DataConfig(_Section):
    train_path: str = ""
    """Folder or ``s3://``/``msc://`` URL of prepared shards (``autothink prep``)."""
    eval_path: str = ""
    tokenizer_path: str = ""
    """Local HF tokenizer directory; empty -> the one saved next to the shards."""
    seq_length: int = Field(512, ge=16)
    micro_batch_size: int = Field(2, ge=1)
    global_batch_size: int = Field(8, ge=1)
    pack: bool = True
    think_ratio: float = Field(0.5, ge=0.0, le=1.0)
    """Share of samples rendered with their thinking answer when a sample carries both."""
    think_min_difficulty: int | None = None
    """R-4B-style curation: samples carrying both answers use the thinking one when their
    difficulty is at least this, the direct one below it (overrides ``think_ratio``)."""
    think_ratio_by_difficulty: dict[int, Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=dict
    )
    """P(thinking answer) per difficulty for samples carrying both answers, e.g.
    ``{1: 0.2, 2: 0.2, 3: 0.2}`` next to ``think_min_difficulty: 4``: a curation that keeps some
    thinking answers on easy questions (without them, forced thinking there is a mode the model
    never saw). Listed difficulties take precedence; the others follow ``think_min_difficulty``
    or ``think_ratio``."""
    min_pixels: int = 4 * 28 * 28
    max_pixels: int = 256 * 28 * 28
    num_workers: int = Field(0, ge=0)
    shuffle_buffer: int = 100
    max_error_rate: float = Field(0.01, ge=0, le=1)
    """The run stops (exit status 4) once more than this share of the samples a loading process
    has read, from its 200th on, could not be read or decoded. Samples skipped by rule (longer
    than ``seq_length``, RL prompts without an answer) do not count; shards left out at start
    are reported and counted (``data/corrupt_shard_samples``), not counted here."""
    max_unusable_in_a_row: int = Field(100, ge=0)
    """The run stops (exit status 4) when this many samples in a row were unusable for any
    reason, e.g. every sample longer than ``seq_length``: no batch could ever form. 0: off."""
    on_shard_change: Literal["refuse", "restart_order"] = "refuse"
    """Resume when a shard that was usable at the checkpoint is unusable now: ``refuse``, or
    ``restart_order`` (the stage's sample order starts afresh without it; not an exact resume,
    samples seen before may come again). A shard repaired since the checkpoint stays left out
    until the next stage or run, so the resume stays exact."""
    text_only: bool = False
    s3_endpoint: str = ""
    """Object-storage endpoint URL (else ``AWS_ENDPOINT_URL``)."""


class OptimizerConfig(_Section):
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(0.0, ge=0)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_fraction: float = Field(0.03, ge=0, le=1)
    decay_style: Literal["constant", "linear", "cosine"] = "cosine"


class TrainConfig(_Section):
    steps: int = Field(100, ge=0)
    seed: int = 1234
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 on GPU, fp32 on CPU."""
    eval_every: int = Field(0, ge=0)
    eval_steps: int = Field(4, ge=0)
    log_every: int = Field(1, ge=1)
    init_from: str = ""
    """The base model a fine-tuning run starts from (its first stage, when there is nothing to
    resume): a Hugging Face Qwen2.5-VL directory (config.json + safetensors, converted on the
    fly), a ``autothink convert hf-to-mcore`` output, or a training checkpoint's ``iter_N`` dir
    or its ``dist/`` (model weights only). Later stages start from the stage before. Empty is a
    config error unless ``from_scratch`` is true."""
    from_scratch: bool = False
    """Allow an empty ``init_from``: the run starts from random weights on purpose (the tiny
    CPU recipes, pre-training experiments). Ignored when ``init_from`` is set."""


class CheckpointConfig(_Section):
    dir: str = ""
    """Checkpoint root; empty -> ``<run_dir>/checkpoints``."""
    save_every: int = Field(0, ge=0)
    keep_last: int = Field(2, ge=1)
    save_on_signal: bool = True
    """Save when SIGTERM/SIGUSR1 arrives (SLURM pre-emption), then exit."""
    preempt_timeout_s: float = Field(900.0, ge=0)
    """After such a signal, the ranks wait for the end of the current step to save. When no
    step boundary comes within this many seconds (a rank stuck in data loading or in a
    collective), the process exits without a checkpoint, status 128 + the signal, with "no step
    boundary within N s" on stderr. Larger than the slowest step; 0: wait forever (a second
    SIGTERM still exits)."""
    resume: bool = True
    """Resume from the latest valid checkpoint in ``dir`` when one exists."""
    allow_changes: list[str] = Field(default_factory=list)
    """Settings (dotted keys or sections, e.g. ``[optim.lr, data.seq_length]``) that may differ
    from the checkpoint's when resuming: the new value takes effect, with a warning. Others are
    refused, naming the key (see docs/training.md, "Changing settings on resume")."""


class WandbConfig(_Section):
    enabled: bool = False
    project: str = "megatron-autothink"
    mode: Literal["online", "offline"] = "offline"


class LoggingConfig(_Section):
    run_dir: str = "runs/default"
    tensorboard: bool = True
    wandb: WandbConfig = Field(default_factory=WandbConfig)


# ----------------------------------------------------------------------------------------------
# Rollout and RL
# ----------------------------------------------------------------------------------------------


class RolloutConfig(_Section):
    backend: Literal["vllm"] = "vllm"
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    eval_temperature: float = 0.0
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1)
    sleep_level: Literal[0, 1, 2] = 1
    """vLLM sleep level while the trainer steps (no-op on CPU). Level 2 drops weights and relies on
    the next weight sync; see docs."""
    enforce_eager: bool = True
    weight_bucket_mb: int = Field(64, ge=1)
    require_fresh_weights: bool = True
    """The engine refuses to generate with a policy version older than the trainer's."""
    min_think_tokens: int = Field(8, ge=0)
    """Forced-thinking (``long``) rollouts and eval answers may not close their think block, or
    stop, before writing this many content (not whitespace-only) tokens: a ``<think>\\n`` prefill
    alone does not force thinking, the model can close the block at once (issue #19). 0 turns
    the ban off. The engine's log-probs of these tokens stay the unconstrained policy's
    (docs/rl.md, "Forced modes"). Same default as ``rollout.types.DEFAULT_MIN_THINK_TOKENS``."""
    ban_think_in_short: bool = True
    """Forced non-thinking (``short``) rollouts and eval answers may not sample ``<think>``, so
    the prefilled empty block stays the only one."""
    engine_process: Literal["auto", "in_process", "subprocess"] = "auto"
    """Where vLLM's engine core runs. ``in_process`` passes weight buckets as tensors but shares
    (and on shutdown destroys) torch's default process group, so it is only safe in a
    single-rank run; ``subprocess`` gives vLLM its own process and its own torch.distributed
    world (buckets travel as safetensors bytes). ``auto``: in-process for one rank, subprocess
    otherwise."""


class BPOConfig(_Section):
    train_decision: bool = True
    """Train the forced mode prefill as part of the response. The prefill ends at the token where
    the policy decides to think or not; without it in the loss, BPO's advantages never reach
    that decision and auto mode cannot learn when to think."""
    decision_weighting: Literal["none", "importance"] = "none"
    """How the mode decision token is trained from the forced groups. ``none``: with the group
    advantage like every other target, a push of the same size whatever the policy prefers.
    ``importance``: weighted by ``pi(mode) / q(mode)`` (``q`` the forced share), the gradient auto
    mode itself would get, which settles where the choice is made (``rl.bpo.decision_weights``;
    docs/rl.md, "Decision weighting"). Needs ``train_decision``."""
    prefill_anchor: float = Field(0.0, ge=0.0)
    """Advantage of the forced prefills' *shared* targets (those before the decision, e.g.
    ``<think>\n``), in place of the sample's own. Both modes of a group train them in the same
    context, so their group advantages cancel and nothing holds auto mode's opening in place
    while the rest of the policy moves (from the first m3 checkpoint, BPO left 65-77 % of
    level-5 auto answers without the think block; not reproduced from the rebuilt m3, with or
    without the anchor, so its effect is not shown; docs/demo_study.md). A positive value trains them
    like an NLL term of that weight, which fades where their probability is already 1; 0 keeps
    the sample's advantage. Needs ``train_decision`` (docs/rl.md, "Anchoring the opening")."""
    g_think: int = Field(4, ge=0)
    """Rollouts per prompt forced into thinking mode (``long`` prefill)."""
    g_nothink: int = Field(4, ge=0)
    """Rollouts per prompt forced into non-thinking mode (``short`` prefill)."""


class SSRConfig(_Section):
    enabled: bool = False
    alpha: float = 1.0
    all_correct_share: float = 0.1


class RethinkConfig(_Section):
    """VL-Rethinker's forced rethinking (``rl/rethinking.py``). The token budgets are the paper's
    (a 2k-4k answer budget); scale them with ``rollout.max_new_tokens``, or rethinking never
    triggers (a 96-token budget never leaves 1024 tokens) or every continuation is too short."""

    enabled: bool = False
    drop_prob: float = 0.35
    truncate_prob: float = 0.5
    min_budget_tokens: int = Field(1024, ge=1)
    """A finished response is eligible only if it leaves this many of ``rollout.max_new_tokens``."""
    min_continuation_tokens: int = Field(30, ge=1)
    """A continuation shorter than this is rejected (``too_short``); one longer than 1024 (the
    paper's cap) too, and none is longer than what ``rollout.max_new_tokens`` leaves after its
    prefix and trigger."""
    temperature: float = 0.9


class RewardWeights(_Section):
    """Rule-based rewards combined by weight, and the recipe's grading options
    (``rl/rewards/rubric.Rubric``; RL rollouts and ``autothink eval`` both score with it).

    Every recipe: a response that did not end with EOS earns no accuracy."""

    accuracy: float = 1.0
    """math-verify on the extracted answer (multiple choice: the letter)."""
    think_format: float = 0.0
    """R-4B: response in the thinking or non-thinking format."""
    lmm_r1_format: float = 0.0
    """LMM-R1: whole response is <think>...</think><answer>...</answer> (paper: 0.5)."""
    length_cost: float = Field(0.0, ge=0.0)
    """A correct answer's reward loses ``length_cost * turn_tokens / rollout.max_new_tokens``
    (prefill included, so both modes count the same tokens). Not in R-4B: a tie-break for BPO.
    Where both forced modes are right (easy questions), accuracy alone gives every response the
    same reward, zero advantage and no reason to stop thinking; the cost makes the shorter,
    direct answer win there while a correct trace still beats a wrong direct answer (docs/rl.md,
    "Length cost"). 0 disables it."""
    invalid_penalty: float = 0.0
    """VL-Rethinker: an invalid response (no EOS, no box, > 5 "wait") scores -invalid_penalty;
    0 disables the rule."""
    parse_whole_text: bool = False
    """With no \\boxed{} / <answer> / Answer: marker, hand the whole response to math-verify
    (LMM-R1 and VL-Rethinker released code: true). Off: no marker, no accuracy, so numbers in
    the reasoning cannot score."""
    unparseable_gold_accuracy: float | None = None
    """Accuracy reward when math-verify cannot parse the ground truth (LMM-R1: 1.0, skipping a
    broken example); None grades with math-verify's string comparison. ``correct`` is not
    changed."""


class RLConfig(_Section):
    algorithm: Literal["grpo", "bpo", "reinforce"] = "grpo"
    prompts_per_step: int = Field(8, ge=1)
    group_size: int = Field(8, ge=1)
    """Samples per prompt (GRPO / REINFORCE); BPO uses ``bpo.g_think + bpo.g_nothink``."""
    std_normalize: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float = Field(3.0, gt=1.0)
    """Dual-clip bound for negative advantages (verl's ``clip_ratio_c``, default 3): a token with
    A < 0 contributes at most ``-A * clip_ratio_c``, so an off-policy replay whose ratio has run
    far above ``1 + clip_high`` cannot push with an unbounded gradient."""
    kl_coef: float = 0.0
    nll_coef: float = 0.0
    updates_per_step: int = Field(1, ge=1)
    dynamic_filter: bool = False
    bpo: BPOConfig = Field(default_factory=BPOConfig)
    ssr: SSRConfig = Field(default_factory=SSRConfig)
    rethink: RethinkConfig = Field(default_factory=RethinkConfig)
    rewards: RewardWeights = Field(default_factory=RewardWeights)


class StageConfig(_Section):
    """One stage of a multi-stage recipe (annealing, FRE text-only RL, MGT multimodal RL, ...)."""

    name: str
    kind: Literal["sft", "rl"]
    steps: int = Field(ge=0)
    train_path: str = ""
    """Overrides ``data.train_path`` for this stage."""
    text_only: bool = False
    """Documents a text-only stage (LMM-R1 FRE); the data comes from ``train_path``."""
    lr: float | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted config overrides for this stage only, e.g. ``{rl.algorithm: reinforce}``."""
    start_from: str = ""
    """Name of an earlier stage whose final weights this stage starts from; empty: the stage
    just before it. Several stages starting from one checkpoint are branches: e.g. BPO and a
    plain GRPO control both from the annealed model (``recipes/demo_tiny.yaml``)."""


# ----------------------------------------------------------------------------------------------
# Root
# ----------------------------------------------------------------------------------------------


class AutothinkConfig(_Section):
    """The whole run."""

    recipe: str = "tiny_cpu"
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimizerConfig = Field(default_factory=OptimizerConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    stages: list[StageConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_static(self) -> AutothinkConfig:
        check_static(self)
        return self

    def world_layout(self, world_size: int) -> dict[str, int]:
        """Validate the layout against a world size and return ``{tp, pp, cp, dp}``."""
        return check_world_size(self, world_size)


def _fail(key: str, msg: str) -> None:
    raise ConfigError(f"{key}: {msg}")


def check_static(cfg: AutothinkConfig) -> None:
    """Checks that need no knowledge of the launch (world size, hardware)."""
    m, p, v = cfg.model, cfg.parallel, cfg.model.vision
    if m.hidden_size % m.num_attention_heads:
        _fail("model.hidden_size", f"{m.hidden_size} is not divisible by model.num_attention_heads")
    if m.num_attention_heads % m.num_query_groups:
        _fail(
            "model.num_query_groups",
            f"{m.num_query_groups} must divide num_attention_heads={m.num_attention_heads}",
        )
    if sum(m.mrope_section) * 2 != m.head_dim:
        _fail(
            "model.mrope_section",
            f"{m.mrope_section} sums to {sum(m.mrope_section)}; must be head_dim/2={m.head_dim // 2}",
        )
    if m.num_attention_heads % p.tp:
        allowed = [d for d in range(1, m.num_attention_heads + 1) if m.num_attention_heads % d == 0]
        _fail(
            "parallel.tp", f"{p.tp} does not divide model.num_attention_heads; allowed: {allowed}"
        )
    if m.num_query_groups % p.tp:
        allowed = [d for d in range(1, m.num_query_groups + 1) if m.num_query_groups % d == 0]
        _fail("parallel.tp", f"{p.tp} does not divide model.num_query_groups; allowed: {allowed}")
    if v.num_heads % p.tp:
        allowed = [d for d in range(1, v.num_heads + 1) if v.num_heads % d == 0]
        _fail("parallel.tp", f"{p.tp} does not divide model.vision.num_heads; allowed: {allowed}")
    stages = p.pp * (p.vpp or 1)
    if m.num_layers % stages:
        allowed = [d for d in range(1, m.num_layers + 1) if m.num_layers % d == 0]
        _fail(
            "parallel.pp",
            f"pp*vpp={stages} does not divide model.num_layers={m.num_layers}; allowed: {allowed}",
        )
    if p.vpp is not None and p.pp < 2:
        _fail("parallel.vpp", "interleaved schedules need parallel.pp >= 2")
    if p.cp > 1:
        # megatron's attention would treat each rank's full row as its shard: the loader does not
        # split sequences across CP ranks, and packed samples need per-sample attention there.
        _fail(
            "parallel.cp",
            f"{p.cp}: context parallelism is not implemented yet; use parallel.cp=1 with "
            "tp / pp / dp (and model.recompute for long sequences)",
        )
    if p.sequence_parallel and p.tp == 1:
        _fail("parallel.sequence_parallel", "needs parallel.tp > 1")
    if any(i >= v.depth or i < 0 for i in v.fullatt_block_indexes):
        _fail("model.vision.fullatt_block_indexes", f"indexes must lie in [0, {v.depth})")
    d = cfg.data
    if d.global_batch_size % d.micro_batch_size:
        _fail(
            "data.global_batch_size",
            f"{d.global_batch_size} is not a multiple of data.micro_batch_size={d.micro_batch_size}",
        )
    if m.transformer_impl == "local" and m.fp8 != "none":
        _fail("model.fp8", "FP8 needs model.transformer_impl=transformer_engine (or auto on GPU)")
    if cfg.rl.algorithm == "bpo" and cfg.rl.bpo.g_think + cfg.rl.bpo.g_nothink < 2:
        _fail("rl.bpo", "g_think + g_nothink must be >= 2 for group advantages")
    names = [st.name for st in cfg.stages]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        _fail("stages", f"stage names must be unique (each has its checkpoint folder): {dup}")
    for i, stage in enumerate(cfg.stages):
        if stage.start_from and stage.start_from not in names[:i]:
            _fail(
                f"stages[{i}] ({stage.name}).start_from",
                f"{stage.start_from!r} is not an earlier stage; earlier: {names[:i]}",
            )
    for i, stage in enumerate(cfg.stages):
        if stage.kind != "rl":
            continue
        # The stage's own values; its overrides are applied (and validated) when it runs.
        seq = int(_stage_value(cfg, stage, "data.seq_length"))
        new = int(_stage_value(cfg, stage, "rollout.max_new_tokens"))
        if new >= seq:
            _fail(
                f"stages[{i}] ({stage.name})",
                f"rollout.max_new_tokens={new} leaves no room for the prompt in "
                f"data.seq_length={seq} (prompt + prefill + response must fit); lower "
                "rollout.max_new_tokens or raise data.seq_length for this stage",
            )


def input_paths(cfg: AutothinkConfig) -> list[tuple[str, str]]:
    """(key, local path) of everything a run reads: each stage's data (its ``train_path`` or
    ``data.train_path``), the eval data, the tokenizer and the base model. Empty values and
    object-store URLs (``s3://``, ``msc://``: the loader names the shard it cannot read) are
    left out."""
    stages = cfg.stages or [StageConfig(name="sft", kind="sft", steps=cfg.train.steps)]
    named = [
        (f"stages[{s.name}].train_path", s.train_path)
        if s.train_path
        else ("data.train_path", cfg.data.train_path)
        for s in stages
    ]
    named += [
        ("data.eval_path", cfg.data.eval_path),
        ("data.tokenizer_path", cfg.data.tokenizer_path),
        ("train.init_from", cfg.train.init_from),
    ]
    return list(dict.fromkeys((k, v) for k, v in named if v and "://" not in v))


def _stage_value(cfg: AutothinkConfig, stage: StageConfig, dotted: str) -> Any:
    """``dotted``'s value in ``stage``: its override (dotted key, or nested under a section
    key), else the run's."""
    if dotted in stage.overrides:
        return stage.overrides[dotted]
    section, key = dotted.split(".", 1)
    nested = stage.overrides.get(section)
    if isinstance(nested, dict) and key in nested:
        return nested[key]
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check_world_size(cfg: AutothinkConfig, world_size: int) -> dict[str, int]:
    """Checks that need the world size; returns the derived data-parallel size."""
    p, d = cfg.parallel, cfg.data
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel: world size {world_size} is not divisible by tp*pp*cp={model_parallel}; "
            f"use a world size that is a multiple of {model_parallel}"
        )
    dp = world_size // model_parallel
    if d.global_batch_size % (d.micro_batch_size * dp):
        raise ConfigError(
            f"data.global_batch_size: {d.global_batch_size} is not divisible by "
            f"micro_batch_size*dp={d.micro_batch_size * dp} (dp={dp} at world size {world_size})"
        )
    return {"tp": p.tp, "pp": p.pp, "cp": p.cp, "dp": dp}


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def recipe_path(name_or_path: str) -> Path:
    """Resolve ``tiny_cpu`` or ``recipes/tiny_cpu.yaml`` or any YAML path."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = RECIPES_DIR / f"{p.stem}.yaml"
    if cand.exists():
        return cand
    known = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml"))
    raise ConfigError(f"recipe '{name_or_path}' not found; known recipes: {known}")


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: '{k}' is a value, not a section")
        node = nxt
    node[keys[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """``["train.lr=1e-5", "parallel.tp=2"]`` -> ``[("train.lr", 1e-05), ("parallel.tp", 2)]``.

    Values are parsed as YAML scalars/lists so ``a=[1,2]`` and ``b=true`` work.
    """
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.sub=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw != "" else ""))
    return out


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        if e["type"] == "extra_forbidden":
            lines.append(f"  {loc}: unknown key")
        else:
            lines.append(f"  {loc}: {e['msg']} (got {e.get('input')!r})")
    return "\n".join(lines)


def load_config(
    recipe: str | Path = "tiny_cpu", overrides: list[str] | None = None
) -> AutothinkConfig:
    """Load one recipe YAML and apply dotted overrides; raise ``ConfigError`` on any problem."""
    path = recipe_path(str(recipe))
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    tree.setdefault("recipe", path.stem)
    try:
        cfg = AutothinkConfig.model_validate(tree)
    except ValidationError as err:
        # A ConfigError raised inside a validator arrives wrapped; surface its own message.
        for e in err.errors():
            ctx_err = (e.get("ctx") or {}).get("error")
            if isinstance(ctx_err, ConfigError):
                raise ConfigError(f"{path}: {ctx_err}") from None
        raise ConfigError(_format_validation_error(err, str(path))) from None
    try:
        check_run(cfg)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    return cfg


def check_run(cfg: AutothinkConfig) -> None:
    """Checks on a run a user asks for (recipe + overrides, :func:`load_config`).

    Kept out of :func:`check_static`, which every config passes through: configs built in code
    (a conversion's throw-away layout) and run configs saved before ``train.from_scratch``
    existed are read back without them.
    """
    t = cfg.train
    if not t.init_from and not t.from_scratch:
        _fail(
            "train.init_from",
            "empty, so the run would start from random weights. Name the base model: a Hugging "
            "Face model dir (e.g. train.init_from=/models/Qwen2.5-VL-3B-Instruct), an "
            "`autothink convert hf-to-mcore` output or a checkpoint's iter_N dir; or set "
            "train.from_scratch=true to train from random weights on purpose",
        )


def dump_config(cfg: AutothinkConfig) -> str:
    """YAML text of a resolved config (saved in every run dir and checkpoint)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def with_stage_lr(cfg: AutothinkConfig, lr: float) -> AutothinkConfig:
    """The config of a stage with its own peak LR; ``min_lr`` keeps its ratio to the peak."""
    ratio = cfg.optim.min_lr / cfg.optim.lr
    optim = cfg.optim.model_copy(update={"lr": lr, "min_lr": lr * ratio})
    return cfg.model_copy(update={"optim": optim})


def stage_config(cfg: AutothinkConfig, stage: StageConfig) -> AutothinkConfig:
    """The config one stage runs with: its dotted ``overrides`` and its LR applied, validated."""
    out = cfg
    if stage.overrides:
        tree = cfg.model_dump(mode="json")
        for key, value in stage.overrides.items():
            _set_dotted(tree, key, value)
        try:
            out = AutothinkConfig.model_validate(tree)
        except ValidationError as err:
            raise ConfigError(
                _format_validation_error(err, f"stage {stage.name} overrides")
            ) from None
    return with_stage_lr(out, stage.lr) if stage.lr is not None else out
