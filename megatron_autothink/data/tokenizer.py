"""Tokenizers: loading a local HF tokenizer directory, its special-token ids, and an offline,
Qwen-style byte-level BPE trainer for tiny models and tests.

:func:`train_tokenizer` uses the same machinery as Qwen2/Qwen2.5-VL's tokenizer: NFC
normalisation, Qwen's pre-tokenisation regex (single digits, letter runs, punctuation runs,
newlines), GPT-2 byte-level alphabet, BPE merges learned from the given texts, and the Qwen2.5-VL
control tokens appended after the learned vocabulary as added tokens (the digits task's tiny
tokenizer, :func:`megatron_autothink.data.digits.build_tiny_tokenizer`, is trained with it). ``<think>`` /
``</think>`` are added but not "special" (as in Qwen3), so decoding with
``skip_special_tokens=True`` keeps them and reasoning parsers can see them.

Full recipes load a real local HF tokenizer directory instead; everything downstream only needs
the token strings below to exist.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from megatron_autothink.modes import SPECIAL_TOKENS, THINK_TOKENS

if TYPE_CHECKING:
    from megatron_autothink.config import AutothinkConfig

#: Qwen2's pre-tokenizer pattern (from its tokenizer.json).
QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 768) -> Tokenizer:
    """Train the byte-level BPE and append the added tokens.

    Args:
        texts: Training corpus.
        vocab_size: Size of the learned vocabulary (the added tokens come on top).

    Returns:
        A ``tokenizers.Tokenizer``.
    """
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # trim_offsets=False keeps character offsets exact (the loss mask is built from them).
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    return tok


def load_tokenizer(tokenizer: Any) -> Any:
    """A tokenizer object from a local HF tokenizer dir (objects pass through unchanged).

    Loads ``tokenizer.json`` with ``PreTrainedTokenizerFast`` rather than ``AutoTokenizer``: the
    data path needs only the Rust tokenizer and the special-token ids, and ``AutoTokenizer``
    costs ~4 s of imports per process (every loader worker / prep run). Directories without a
    ``tokenizer.json`` fall back to ``AutoTokenizer``.
    """
    if not isinstance(tokenizer, str | os.PathLike):
        return tokenizer
    path = os.fspath(tokenizer)
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


#: What to tell a user whose data has no tokenizer (training, export): where one comes from.
TOKENIZER_HINT = (
    "set data.tokenizer_path=DIR to the tokenizer of the base model you fine-tune (its HF "
    "directory), or, for a model trained from scratch on toy data, build the tiny one next to "
    "the shards: `autothink prep tokenizer --out DATA/tokenizer` (see docs/data.md, Tokenizer)"
)


def resolve_tokenizer_dir(cfg: AutothinkConfig, data_path: str) -> str:
    """``data.tokenizer_path``, else the tokenizer saved next to the prepared data.

    Raises:
        FileNotFoundError: neither exists; the message names the key and the command to run.
    """
    if cfg.data.tokenizer_path:
        if not Path(cfg.data.tokenizer_path).is_dir():
            raise FileNotFoundError(
                f"data.tokenizer_path={cfg.data.tokenizer_path} is not a directory; "
                + TOKENIZER_HINT
            )
        return cfg.data.tokenizer_path
    cand = Path(data_path) / "tokenizer"
    if cand.is_dir():
        return str(cand)
    raise FileNotFoundError(
        f"no tokenizer: data.tokenizer_path is empty and {cand} does not exist; " + TOKENIZER_HINT
    )


def hf_token_ids(tokenizer: Any) -> dict[str, Any]:
    """Special-token ids of ``tokenizer`` for an exported HF config (the ``base`` of
    ``weights.hf_config.hf_config_from_model``).

    eos is ``<|im_end|>``, the chat template's end of turn, so ``generate`` stops after one
    assistant turn; bos is ``<|endoftext|>`` as in Qwen's own configs. Without these the config
    would carry transformers' Qwen defaults (151643...), which point past a small vocabulary.
    """
    names = {
        "eos": "<|im_end|>",
        "bos": "<|endoftext|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
    }
    ids: dict[str, int] = {}
    unk = tokenizer.unk_token_id
    for key, tok in names.items():
        i = tokenizer.convert_tokens_to_ids(tok)
        if i is None or i == unk or not isinstance(i, int):
            raise ValueError(f"the tokenizer has no {tok} token (needed for {key})")
        ids[key] = int(i)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids["bos"]
    return {
        **{k: v for k, v in ids.items() if k.endswith("_id")},
        "text_config": {
            "bos_token_id": ids["bos"],
            "eos_token_id": ids["eos"],
            "pad_token_id": pad,
        },
    }
