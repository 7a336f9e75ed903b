"""Tiny random HF Qwen2.5-VL models and matching text+image inputs, built offline.

Shapes are chosen to exercise what conversion can get wrong: GQA ratios, hidden sizes that are
not powers of two, a vision tower with one window-attention and one full-attention block, and
images whose merged grid spans several attention windows (so window ordering matters).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

VOCAB = (
    1100  # pads differently at TP=1 (1152) and TP=2 (1280) with make_vocab_size_divisible_by=128
)
BOS, EOS = 1, 2
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = 5, 6, 7, 8
INIT_STD = 0.1
"""Larger than transformers' 0.02 on purpose: with 0.02 the attention is nearly uniform and a wrong
mrope_section moves the logits by only ~5e-4; with 0.1 it moves them by ~0.2 (exact: ~6e-6)."""


@dataclass(frozen=True)
class TinySpec:
    """One tiny architecture."""

    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 24  # hidden = heads * head_dim (96: not a power of two)
    layers: int = 2
    ffn: int = 152
    tie: bool = True
    mrope_section: tuple[int, int, int] = (2, 4, 6)  # sums to head_dim / 2
    vision_hidden: int = 48
    vision_heads: int = 4
    vision_ffn: int = 88
    seed: int = 0

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def label(self) -> str:
        return f"h{self.heads}kv{self.kv_heads}-{'tied' if self.tie else 'untied'}"


def hf_config(spec: TinySpec) -> Any:
    from transformers import Qwen2_5_VLConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = Qwen2_5_VLConfig(
            text_config={
                "vocab_size": VOCAB,
                "hidden_size": spec.hidden,
                "intermediate_size": spec.ffn,
                "num_hidden_layers": spec.layers,
                "num_attention_heads": spec.heads,
                "num_key_value_heads": spec.kv_heads,
                "max_position_embeddings": 2048,
                "rms_norm_eps": 1e-6,
                "bos_token_id": BOS,
                "initializer_range": INIT_STD,
                "eos_token_id": EOS,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 1_000_000.0,
                    "mrope_section": list(spec.mrope_section),
                },
            },
            vision_config={
                "depth": 2,
                "hidden_size": spec.vision_hidden,
                "intermediate_size": spec.vision_ffn,
                "num_heads": spec.vision_heads,
                "out_hidden_size": spec.hidden,
                "window_size": 56,  # 2x2 merged tokens per window
                "fullatt_block_indexes": [1],
                "initializer_range": INIT_STD,
            },
            image_token_id=IMAGE_PAD,
            video_token_id=VIDEO_PAD,
            vision_start_token_id=VISION_START,
            vision_end_token_id=VISION_END,
            tie_word_embeddings=spec.tie,
        )
        cfg.initializer_range = INIT_STD
        return cfg


def build_hf_model(spec: TinySpec) -> Any:
    """Random fp32 model in eval mode, with every weight (norms and biases too) randomised."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(spec.seed)
    cfg = hf_config(spec)
    cfg._attn_implementation = "eager"  # the reference: plain matmul-softmax attention
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_q" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.02 * torch.randn_like(p))
    return model


def save_hf_model(spec: TinySpec, out: Path) -> Any:
    model = build_hf_model(spec)
    model.save_pretrained(out)
    return model


@dataclass
class VLInputs:
    input_ids: Tensor  # [B, S]
    position_ids: Tensor  # [3, B, S] from transformers' get_rope_index
    pixel_values: Tensor  # [N, 1176]
    image_grid_thw: Tensor  # [M, 3]


def vl_inputs(hf_model: Any, seed: int = 0) -> VLInputs:
    """Two rows, one image each: row 0 a 8x12-patch image (4x6 merged tokens: six 2x2 windows
    and a ragged grid), row 1 a 4x8-patch image; positions from transformers' get_rope_index."""
    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor([[1, 8, 12], [1, 4, 8]])
    rows = []
    for (t, h, w), pre in zip(grids.tolist(), (3, 9), strict=True):
        n_img = t * h * w // 4
        text = lambda n: torch.randint(10, VOCAB, (n,), generator=g)  # noqa: E731
        rows.append(
            torch.cat(
                [
                    text(pre),
                    torch.tensor([VISION_START]),
                    torch.full((n_img,), IMAGE_PAD),
                    torch.tensor([VISION_END]),
                ]
            )
        )
    seq = max(len(r) for r in rows) + 6
    input_ids = torch.stack(
        [torch.cat([r, torch.randint(10, VOCAB, (seq - len(r),), generator=g)]) for r in rows]
    )
    mm_types = (input_ids == IMAGE_PAD).int()
    position_ids, _ = hf_model.model.get_rope_index(
        input_ids, mm_token_type_ids=mm_types, image_grid_thw=grids
    )
    n_patches = int(grids.prod(-1).sum())
    pixel_values = torch.randn(n_patches, 3 * 2 * 14 * 14, generator=g)
    return VLInputs(input_ids, position_ids, pixel_values, grids)


@torch.no_grad()
def hf_logits(hf_model: Any, x: VLInputs) -> Tensor:
    out = hf_model(
        input_ids=x.input_ids,
        position_ids=x.position_ids,
        pixel_values=x.pixel_values,
        image_grid_thw=x.image_grid_thw,
    )
    return out.logits.float()


SPECIAL_TOKENS = {
    "<|endoftext|>": 0,
    "<|im_start|>": BOS,
    "<|im_end|>": EOS,
    "<think>": 3,
    "</think>": 4,
    "<|vision_start|>": VISION_START,
    "<|vision_end|>": VISION_END,
    "<|image_pad|>": IMAGE_PAD,
    "<|video_pad|>": VIDEO_PAD,
}


def tiny_tokenizer(chat_template: str | None = None) -> Any:
    """Character-level fast tokenizer with Qwen's special tokens at our tiny ids (offline)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = dict(SPECIAL_TOKENS)
    vocab["[UNK]"] = 9
    for c in range(32, 127):
        vocab[chr(c)] = 10 + c - 32
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=chat_template,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="[UNK]",
        additional_special_tokens=[
            t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")
        ],
    )


ORIGINAL_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
"""A stand-in for the source model's own template: export must replace it with ours."""


def save_hf_dir(spec: TinySpec, out: Path) -> Any:
    """HF model + tokenizer (with a non-thinking template) + a processor config, like a Hub dir."""
    import json

    model = save_hf_model(spec, out)
    tiny_tokenizer(ORIGINAL_TEMPLATE).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "image_processor_type": "Qwen2VLImageProcessor",
                "patch_size": 14,
                "temporal_patch_size": 2,
                "merge_size": 2,
                "min_pixels": 3136,
                "max_pixels": 50176,
            }
        )
    )
    return model


def assert_generate_stops_at_end_of_turn(model: Any, tok: Any, question: str, at: int) -> None:
    """``model.generate`` of an exported model stops at ``<|im_end|>`` when that is sampled.

    A barely trained model rarely ends a turn by itself, so a logits processor forces the
    end-of-turn token as the ``at``-th generated token; generation must stop right there (the
    export's generation config names the end-of-turn id as EOS)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")

    class EndTurnAt(LogitsProcessor):
        def __init__(self, start: int) -> None:
            self.start = start

        def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
            if input_ids.shape[1] - self.start == at - 1:
                scores = torch.full_like(scores, -1e9)
                scores[:, end_of_turn] = 0.0
            return scores

    prompt = tok.apply_chat_template(
        [{"role": "user", "content": question}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    n = prompt["input_ids"].shape[1]
    gen = model.generate(
        **prompt,
        max_new_tokens=20,
        do_sample=False,
        logits_processor=LogitsProcessorList([EndTurnAt(n)]),
    )
    assert gen.shape[1] - n == at and int(gen[0, -1]) == end_of_turn, gen[0, n:].tolist()
