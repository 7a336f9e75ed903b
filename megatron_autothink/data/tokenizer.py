"""An offline, Qwen-style byte-level BPE tokenizer for tiny models and tests.

Same machinery as Qwen2/Qwen2.5-VL's tokenizer: NFC normalisation, Qwen's pre-tokenisation regex
(single digits, letter runs, punctuation runs, newlines), GPT-2 byte-level alphabet, BPE merges
learned here from the digits generator's texts plus ASCII letters / digits / punctuation, and the
Qwen2.5-VL control tokens appended after the learned vocabulary as added tokens. ``<think>`` /
``</think>`` are added but not "special" (as in Qwen3), so decoding with
``skip_special_tokens=True`` keeps them and reasoning parsers can see them.

Full recipes load a real local HF tokenizer directory instead; everything downstream only needs
the token strings below to exist.
"""

from __future__ import annotations

import json
import os
import string
from collections.abc import Iterable, Iterator
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

from megatron_autothink.modes import CHAT_TEMPLATE, SPECIAL_TOKENS, THINK_TOKENS

if TYPE_CHECKING:
    from megatron_autothink.config import AutothinkConfig

#: Qwen2's pre-tokenizer pattern (from its tokenizer.json).
QWEN_PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


# Frequent English words, so text beyond the digits task (e.g. LLaVA-style test data) does not
# fall apart into single bytes; the digits corpus alone is too small to fill the vocabulary.
_COMMON_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or "
    "one had by word but not what all were we when your can said there use an each which she do "
    "how their if will up other about out many then them these so some her would make like him "
    "into time has look two more write go see number no way could people my than first water been "
    "call who its now find long down day did get come made may part over new sound take only "
    "little work know place year live me back give most very after thing our just name good "
    "sentence man think say great where help through much before line right too mean old any "
    "same tell boy follow came want show also around form three small set put end does another "
    "well large must big even such because turn here why ask went men read need land different "
    "home us move try kind hand picture again change off play spell air away animal house point "
    "page letter mother answer found study still learn should image question describe color what "
    "shown left count digit digits sum total compute step reason final box please correct option "
    "choose following which best table chart text object person photo scene"
)


def _base_corpus() -> Iterator[str]:
    yield string.ascii_letters + string.digits + string.punctuation
    yield " ".join(string.ascii_lowercase) + " " + " ".join(string.ascii_uppercase)
    yield " ".join(string.digits) + " " + " ".join(string.punctuation)
    for _ in range(2):  # min_frequency=2: every word must appear twice to be merged
        yield _COMMON_WORDS
        yield _COMMON_WORDS.title()
    yield "You are a helpful assistant. The answer is \\boxed{}. Please reason step by step."


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


def build_tiny_tokenizer(
    out_dir: str | os.PathLike[str], *, vocab_size: int = 768, corpus_size: int = 2000
) -> str:
    """Train the tiny tokenizer and save it as an HF tokenizer directory.

    The directory holds ``tokenizer.json`` and ``tokenizer_config.json`` (with
    :data:`~megatron_autothink.modes.CHAT_TEMPLATE` as ``chat_template``, eos
    ``<|im_end|>``, pad ``<|endoftext|>``) and loads offline with
    ``transformers.AutoTokenizer.from_pretrained(out_dir)``. Deterministic for fixed arguments.

    Args:
        out_dir: Target directory (created).
        vocab_size: Learned vocabulary size (about 768 + 9 added tokens).
        corpus_size: Digits problems per variant used as training text.

    Returns:
        ``out_dir`` as a string.
    """
    from transformers import PreTrainedTokenizerFast

    from megatron_autothink.data.digits import digits_corpus

    texts = [*_base_corpus(), *digits_corpus(corpus_size)]
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    hf.save_pretrained(out)
    # Keep the template inside tokenizer_config.json too: older loaders and vLLM read it there.
    cfg_path = os.path.join(out, "tokenizer_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["chat_template"] = CHAT_TEMPLATE
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
    return out


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
    ``convert.hf_config.hf_config_from_model``).

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
