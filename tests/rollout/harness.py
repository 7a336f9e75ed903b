"""Tiny random Qwen2.5-VL checkpoints and a transformers reference, for tests and benchmarks;
fakes for unit tests of the code around the engine.

Everything is built offline: a byte-level BPE tokenizer trained on generated text with the Qwen
special tokens, a random ``Qwen2_5_VLForConditionalGeneration`` saved with ``save_pretrained``,
and a PIL image-processor config. Two "trainer sides" for log-prob parity checks:

* :func:`hf_token_logprobs`: a plain fp32 transformers forward over
  ``prompt + prefill + completion``;
* :func:`megatron_token_logprobs`: our megatron model (:func:`megatron_model_from_hf`) scoring
  the same tokens through the RL trainer's own path (``rl.batching.pack_sequences`` ->
  ``rl.actor.compute_logprobs``), which is what the importance ratios of an RL step use.

For unit tests that need no model: :class:`CharTokenizer` (one token per character, so token
counts are string lengths) and :class:`ScriptedEngine` (a :class:`RolloutEngine` answering each
request id with a canned text and recording every call).

The megatron imports are local to those functions: the rest of this module needs no megatron.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from megatron_autothink.data.tokenizer import SPECIAL_TOKENS, THINK_TOKENS

# One definition of the Qwen special / think tokens, shared with the data tokenizer.
from megatron_autothink.modes import PREFILLS
from megatron_autothink.rollout.engine import RolloutEngine
from megatron_autothink.rollout.images import expand_image_pads
from megatron_autothink.rollout.types import (
    Completion,
    GenerationRequest,
    PreprocessedImages,
    SamplingConfig,
    WeightUpdate,
)

if TYPE_CHECKING:
    from megatron_autothink.config import AutothinkConfig
    from megatron_autothink.parallel import ParallelContext

_SYLLABLES = (
    "ka",
    "ri",
    "to",
    "mu",
    "sen",
    "ba",
    "lo",
    "qui",
    "an",
    "de",
    "el",
    "fo",
    "gra",
    "hi",
    "im",
    "ju",
    "ke",
    "lu",
    "ma",
    "ne",
    "op",
    "pa",
    "qu",
    "re",
    "st",
    "th",
    "un",
    "ve",
    "wa",
    "xi",
    "yo",
    "ze",
    "ing",
    "ion",
    "er",
    "ly",
    "ed",
    "al",
    "ous",
    "ment",
    "ness",
    "able",
)


def _corpus(num_lines: int, seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    words = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(3000)]
    for _ in range(num_lines):
        line = " ".join(rng.choices(words, k=12))
        yield f"{line} {rng.randint(0, 999)} + {rng.randint(0, 99)} = \\boxed{{{rng.randint(0, 9)}}}."


def build_tiny_tokenizer(out_dir: str | Path, vocab_size: int = 1000, seed: int = 0) -> Any:
    """Train and save a byte-level BPE tokenizer with Qwen's special tokens.

    Args:
        out_dir: Where to save (``tokenizer.json`` + ``tokenizer_config.json``).
        vocab_size: Total vocabulary size including the added tokens.
        seed: Corpus seed.

    Returns:
        The ``PreTrainedTokenizerFast``.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    added = len(SPECIAL_TOKENS) + len(THINK_TOKENS)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - added,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(4000, seed), trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=32768,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def build_tiny_qwen2_5_vl(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 1024,
    vision_depth: int = 2,
    vision_hidden_size: int = 64,
    vision_heads: int = 2,
    initializer_range: float = 0.02,
    max_position_embeddings: int = 4096,
    max_pixels: int = 28 * 28 * 16,
    tie_word_embeddings: bool = False,
) -> Path:
    """Save a random fp32 Qwen2.5-VL model, tokenizer and image-processor config.

    Args:
        out_dir: Target directory (created).
        seed: Weight-init seed.
        hidden_size: LLM hidden size; head_dim = hidden_size / num_heads.
        intermediate_size: LLM MLP size.
        num_layers: LLM layers.
        num_heads: LLM attention heads.
        num_kv_heads: LLM KV heads (GQA).
        vocab_size: Embedding rows (>= tokenizer size, padded like Qwen).
        vision_depth: ViT blocks.
        vision_hidden_size: ViT width.
        vision_heads: ViT heads.
        initializer_range: Init std; larger values give peakier (more "trained-like")
            next-token distributions.
        max_position_embeddings: Context length in the config.
        max_pixels: Image-processor resize cap (small images keep tests fast).
        tie_word_embeddings: Share the input embedding with the output head (as the
            small Qwen2.5-VL models and our tiny recipes do).

    Returns:
        The model directory.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer(out, vocab_size=min(vocab_size, 1000))
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden_size // num_heads
    # mrope splits head_dim / 2 rotary frequencies into (temporal, height, width) sections.
    half = head_dim // 2
    mrope_section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate_size,
            "num_hidden_layers": num_layers,
            "num_attention_heads": num_heads,
            "num_key_value_heads": num_kv_heads,
            "max_position_embeddings": max_position_embeddings,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": mrope_section,
            },
            "initializer_range": initializer_range,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": tie_word_embeddings,
        },
        vision_config={
            "depth": vision_depth,
            "hidden_size": vision_hidden_size,
            "intermediate_size": 2 * vision_hidden_size,
            "num_heads": vision_heads,
            "out_hidden_size": hidden_size,
            "fullatt_block_indexes": [vision_depth - 1],
            "window_size": 112,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": initializer_range,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)  # fp32: torch's default dtype
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(str(out))
    Qwen2VLImageProcessorPil(min_pixels=28 * 28 * 4, max_pixels=max_pixels).save_pretrained(
        str(out)
    )
    return out


def chat_prompt(tokenizer: Any, text: str, num_images: int = 0) -> list[int]:
    """Token ids of a one-turn chat prompt ending with ``"<|im_start|>assistant\\n"``.

    Each image is ``<|vision_start|><|image_pad|><|vision_end|>`` before the text (one pad per
    image; the engine and :func:`hf_token_logprobs` expand it).
    """
    vision = "<|vision_start|><|image_pad|><|vision_end|>" * num_images
    chat = f"<|im_start|>user\n{vision}{text}<|im_end|>\n<|im_start|>assistant\n"
    return list(tokenizer.encode(chat, add_special_tokens=False))


@torch.no_grad()
def hf_token_logprobs(
    model: Any,
    prompt_token_ids: Sequence[int],
    completions: Sequence[Completion],
    images: PreprocessedImages | None = None,
) -> list[list[float]]:
    """Log-probs a transformers Qwen2.5-VL assigns to each completion's tokens.

    One forward per completion over ``prompt (pads expanded) + prefill + completion``, exactly
    the sequence a trainer would score.

    Args:
        model: ``Qwen2_5_VLForConditionalGeneration`` in eval mode.
        prompt_token_ids: Prompt with one ``<|image_pad|>`` (or its expansion) per image.
        completions: Completions of that prompt.
        images: The request's preprocessed images, if any.

    Returns:
        Per completion, the log-prob of each of its tokens.
    """
    config = model.config
    pad_id = config.image_token_id
    merge = config.vision_config.spatial_merge_size
    tokens_per_image = [] if images is None else images.num_tokens(merge)
    prompt = expand_image_pads(prompt_token_ids, pad_id, tokens_per_image)
    result = []
    for completion in completions:
        context = prompt + list(completion.prefill_token_ids)
        ids = torch.tensor([context + list(completion.token_ids)])
        kwargs: dict[str, Any] = {"input_ids": ids, "use_cache": False}
        if images is not None:
            kwargs.update(
                pixel_values=images.pixel_values,
                image_grid_thw=images.image_grid_thw,
                mm_token_type_ids=(ids == pad_id).int(),
            )
        model.model.rope_deltas = None  # stateful in transformers; stale deltas shift positions
        logits = model(**kwargs).logits[0].float()
        logp = torch.log_softmax(logits[len(context) - 1 : -1], dim=-1)
        tokens = torch.tensor(completion.token_ids)
        result.append(logp.gather(-1, tokens[:, None])[:, 0].tolist())
    return result


@contextmanager
def megatron_model_from_hf(
    model_dir: str | Path,
) -> Iterator[tuple[list[torch.nn.Module], AutothinkConfig, ParallelContext]]:
    """Our megatron Qwen2.5-VL (TP=PP=1, fp32) holding a HF directory's weights.

    The config comes from the directory's ``config.json`` (``weights.hf_config``), the weights
    through ``weights.load.load_hf_weights``; megatron's process groups exist while the context
    is open (a 1-rank gloo world unless one exists already, e.g. vLLM's in-process one).

    Yields:
        ``(chunks, run_config, parallel_context)``; ``run_config.model`` is the architecture.
    """
    from megatron_autothink.convert.hf_to_mcore import inspect_hf_dir
    from megatron_autothink.convert.runtime import conversion_context
    from megatron_autothink.train.setup import build_model_chunks
    from megatron_autothink.weights.load import load_hf_weights

    model_cfg, ckpt = inspect_hf_dir(model_dir)
    with conversion_context(model_cfg, precision="fp32") as (cfg, ctx):
        chunks = build_model_chunks(
            cfg, ctx, vocab_size=model_cfg.vocab_size, image_token_id=model_cfg.image_token_id
        )
        load_hf_weights(chunks, ckpt, model_cfg, ctx)
        yield chunks, cfg, ctx


def megatron_token_logprobs(
    chunks: Sequence[torch.nn.Module],
    ctx: ParallelContext,
    requests: Sequence[GenerationRequest],
    groups: Sequence[Sequence[Completion]],
    *,
    image_token_id: int,
    pad_id: int,
    seq_length: int,
    micro_batch_size: int = 2,
    spatial_merge_size: int = 2,
) -> list[list[float]]:
    """Log-probs our megatron model assigns to each completion's tokens, as the RL trainer
    computes them: ``prompt (pads expanded) + prefill + completion`` as a
    ``rl.batching.TrainSequence``, first-fit packed by ``pack_sequences`` (several sequences,
    and their images, per row), scored by ``rl.actor.compute_logprobs``.

    Args:
        chunks: Model chunks (e.g. from :func:`megatron_model_from_hf`), TP=PP=1 or not.
        ctx: Their parallel context.
        requests: The generation requests; images must be :class:`PreprocessedImages` (the
            trainer's input, bit-identical to what the engine saw).
        groups: ``engine.generate(requests, ...)``'s completions, one group per request. A
            sampled image token cannot be scored (the trainer cuts the response there first:
            ``rl.rollout.cut_at_vision_tokens``).
        image_token_id: Id of ``<|image_pad|>``.
        pad_id: Padding token of the packed rows.
        seq_length: Packed row length (>= the longest sequence).
        micro_batch_size: Rows per micro-batch.
        spatial_merge_size: The vision tower's merge size.

    Returns:
        Per completion, request by request (``[c for g in groups for c in g]`` order), the
        log-prob of each of its tokens.
    """
    from megatron_autothink.rl.actor import compute_logprobs
    from megatron_autothink.rl.batching import TrainSequence, pack_sequences, per_sample_values

    seqs: list[TrainSequence] = []
    for request, group in zip(requests, groups, strict=True):
        images = request.images
        if images is not None and not isinstance(images, PreprocessedImages):
            raise TypeError(f"request {request.request_id!r}: pass PreprocessedImages, not PIL")
        per_image = [] if images is None else images.num_tokens(spatial_merge_size)
        prompt = expand_image_pads(request.prompt_token_ids, image_token_id, per_image)
        for completion in group:
            if image_token_id in completion.token_ids:
                raise ValueError(
                    f"request {request.request_id!r}: a completion sampled the image token; "
                    "cut it first (rl.rollout.cut_at_vision_tokens)"
                )
            seqs.append(
                TrainSequence(
                    sample_index=len(seqs),
                    prompt_ids=prompt,
                    prefill_ids=list(completion.prefill_token_ids),
                    response_ids=list(completion.token_ids),
                    engine_logprobs=list(completion.logprobs),
                    advantage=0.0,
                    mode_id=-1,
                    pixel_values=None if images is None else images.pixel_values,
                    image_grid_thw=None if images is None else images.image_grid_thw,
                )
            )
    batches = pack_sequences(
        seqs,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        pad_id=pad_id,
        image_token_id=image_token_id,
    )
    logp = compute_logprobs(list(chunks), batches, ctx, seq_length=seq_length)
    return per_sample_values(batches, logp, len(seqs))


class CharTokenizer:
    """Token id = code point: ``len(text)`` tokens, and decode inverts encode exactly.

    >>> tok = CharTokenizer()
    >>> tok.encode("<think>"), tok.decode(tok.encode("ab"))
    ([60, 116, 104, 105, 110, 107, 62], 'ab')
    """

    unk_token_id = -1
    pad_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)

    def convert_tokens_to_ids(self, token: str) -> int:
        return self.unk_token_id  # no vision tokens in this vocabulary


class ScriptedEngine(RolloutEngine):
    """A :class:`RolloutEngine` answering each request id with a canned text (``n`` copies).

    Completions carry the mode's prefill (tokenised by ``tokenizer``), log-prob -0.25 per token
    and ``finish_reason="stop"``. ``calls`` records ``(requests, sampling)`` of every
    ``generate``; ``events`` every call of the interface in order (``"generate"``,
    ``"update_weights"``, ``"sleep"``, ``"wake_up:<tags>"``), for tests of call order.
    """

    def __init__(self, answers: dict[str, str], tokenizer: Any = None) -> None:
        super().__init__()
        self.answers = answers
        self.tokenizer = tokenizer if tokenizer is not None else CharTokenizer()
        self.calls: list[tuple[list[GenerationRequest], SamplingConfig]] = []
        self.events: list[str] = []

    def generate(
        self, requests: Sequence[GenerationRequest], sampling: SamplingConfig
    ) -> list[list[Completion]]:
        self._check_can_generate()
        self.events.append("generate")
        self.calls.append((list(requests), sampling))
        out = []
        for r in requests:
            text = self.answers[r.request_id]
            ids = list(self.tokenizer.encode(text))
            prefill = list(self.tokenizer.encode(PREFILLS[r.mode]))
            out.append(
                [
                    Completion(ids, [-0.25] * len(ids), text, "stop", prefill, r.mode)
                    for _ in range(r.n)
                ]
            )
        return out

    def update_weights(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int
    ) -> WeightUpdate:
        self._check_new_version(version)
        n = sum(1 for _ in named_tensors)
        self.events.append("update_weights")
        self._set_version(version)
        return WeightUpdate(version, n, 0, 1, 0.0)

    def sleep(self) -> None:
        self.events.append("sleep")

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        self.events.append("wake_up:" + ",".join(tags or ("all",)))

    def shutdown(self) -> None:
        self.events.append("shutdown")
