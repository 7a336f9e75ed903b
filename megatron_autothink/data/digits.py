"""Synthetic visual arithmetic on scikit-learn's handwritten digits (a CPU-sized task).

Each image is ``k`` real 8x8 digits from ``sklearn.datasets.load_digits`` (1797 scans, bundled with
scikit-learn, no download), upscaled to ``digit_size`` pixels and placed left to right, dark ink on
white. Questions grow in difficulty:

=========  =====  ======================================  ==========
kind       k      question                                difficulty
=========  =====  ======================================  ==========
first      1-3    the first digit                         1
count      2-5    how many digits                         1 (k<=3), 2
sum        2-5    the sum                                 2, 3, 4, 4
expr       3-5    a*b+c, a*b+c*d, a*b+c*d-e               4, 5, 5
=========  =====  ======================================  ==========

A problem is drawn by first picking a difficulty uniformly, so every level is equally common.

The ``depth`` family (``DigitsConfig(family="depth")``, ``autothink prep digits --family depth``)
keeps what must be *read* fixed and varies only the depth of the computation: every image holds
exactly four digits ``a, b, c, d`` (from 2..9 by default; 28 px each, so at the default ``digit_size`` the 28 x 112
image is 1 x 4 merged vision tokens, one per digit, never resized), and the question names an
expression over them:

=====  ============  ====================================================
level  expression    thinking trace after "The digits are a, b, c, d."
=====  ============  ====================================================
1      ``a``         ``a=7`` (any letter with ``depth_any_letter``)
2      ``a+b``       ``a+b=7+8=15``
3      ``a*b``       ``a*b=7*8=56``
4      ``a*b+c``     ``a*b=7*8=56`` / ``a*b+c=56+3=59``
5      ``a*b+c*d``   ``a*b=7*8=56`` / ``c*d=3*5=15`` / ``a*b+c*d=56+15=71``
=====  ============  ====================================================

Each trace line copies its operands next to the step, so a small model only ever does one
table lookup or one addition per line; the direct answer must do the whole expression at once.
Every sample carries BOTH responses: thinking (read the digits, then one arithmetic step per
line) and non-thinking (empty think block); the answer is ``\\boxed{N}``, ground truth
``answer_type="number"``. Train and test draw from disjoint subsets of the digit scans (a seeded
80/20 split of the 1797 indices), so test images are unseen.

The text-only variant (for text-only RL, LMM-R1's first stage) states the digits in words and asks
the same question; with the same seed it poses the same problems.

Sample ``i`` depends only on ``(seed, split, i)``, so generation can restart anywhere (resume).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import string
from collections.abc import Iterator
from typing import Literal

import numpy as np
from PIL import Image

from megatron_autothink.data.schema import IMAGE_PLACEHOLDER, Sample, Turn
from megatron_autothink.data.tokenizer import train_tokenizer
from megatron_autothink.modes import CHAT_TEMPLATE, EMPTY_THINK

Split = Literal["train", "test"]
Kind = Literal["first", "count", "sum", "expr", "depth"]
Family = Literal["mixed", "depth"]

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
#: (kind, k) -> difficulty; the table in the module docstring.
PROBLEM_TABLE: dict[tuple[Kind, int], int] = {
    ("first", 1): 1,
    ("first", 2): 1,
    ("first", 3): 1,
    ("count", 2): 1,
    ("count", 3): 1,
    ("count", 4): 2,
    ("count", 5): 2,
    ("sum", 2): 2,
    ("sum", 3): 3,
    ("sum", 4): 4,
    ("sum", 5): 4,
    ("expr", 3): 4,
    ("expr", 4): 5,
    ("expr", 5): 5,
}
_SPLIT_CODE = {"train": 0, "test": 1}
_EXPR = {3: "a*b+c", 4: "a*b+c*d", 5: "a*b+c*d-e"}
#: depth family: level -> expression over the four digits (level 1 picks one letter).
DEPTH_EXPR = {2: "a+b", 3: "a*b", 4: "a*b+c", 5: "a*b+c*d"}
DEPTH_DIGITS = 4
BOX_SUFFIX = " Put the final answer in \\boxed{}."


@dataclasses.dataclass(frozen=True, kw_only=True)
class DigitsConfig:
    """Generator settings."""

    digit_size: int = 28
    """Pixels per digit side after upscaling the 8x8 scan."""
    test_fraction: float = 0.2
    """Share of digit scans reserved for the test split."""
    family: Family = "mixed"
    """Problem family: ``mixed`` (the table above: digit count and operation vary by level) or
    ``depth`` (always four digits; only the depth of the expression varies)."""
    depth_low_digit: int = 2
    """Depth family: digits are drawn from ``depth_low_digit..9``. 2 by default: a 0 or 1 among
    a*b+c*d's operands (59 % of problems with 0..9) turns the hardest level into a single lookup
    that a direct answer gets for free (docs/demo_study.md)."""
    depth_any_letter: bool = False
    """Depth family, level 1: ask for a random one of ``a..d`` (True) or always ``a`` (False,
    the default: on images the tiny model never learned to bind a named letter to its position
    in a direct answer and answered a random digit of the image; docs/demo_study.md)."""
    depth_split_sum: bool = False
    """Depth family, level 5: write the two-digit sum in two steps, tens first
    (``a*b+c*d=56+15=66+5=71``): in the study every failed text-only level-5 trace failed in
    that one sum (docs/demo_study.md)."""


@dataclasses.dataclass(frozen=True)
class DigitsProblem:
    """One generated problem (before it is turned into a :class:`Sample`)."""

    kind: Kind
    digits: tuple[int, ...]
    image_indices: tuple[int, ...]
    """Indices into ``load_digits()`` of the scans used (one per digit)."""
    difficulty: int
    question: str
    answer: int
    steps: tuple[str, ...]
    """Reasoning lines of the thinking response."""


@functools.cache
def _digit_data() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.astype(np.float32), d.target.astype(np.int64)


@functools.cache
def split_indices(seed: int, test_fraction: float = 0.2) -> dict[str, tuple[np.ndarray, ...]]:
    """Disjoint scan indices per split, grouped by digit label.

    Returns:
        ``{"train": (idx of 0s, ..., idx of 9s), "test": (...)}``.
    """
    _, labels = _digit_data()
    perm = np.random.default_rng([seed, 7919]).permutation(len(labels))
    n_test = round(len(labels) * test_fraction)
    parts = {"test": np.sort(perm[:n_test]), "train": np.sort(perm[n_test:])}
    return {
        name: tuple(idx[labels[idx] == digit] for digit in range(10)) for name, idx in parts.items()
    }


def compose_image(indices: tuple[int, ...], digit_size: int = 28) -> Image.Image:
    """Render scans left to right as one RGB image (``digit_size`` x ``k*digit_size``)."""
    images, _ = _digit_data()
    tiles = []
    for idx in indices:
        ink = images[idx] / 16.0  # load_digits stores 0..16 ink intensity
        gray = Image.fromarray(np.round(255 * (1 - ink)).astype(np.uint8), mode="L")
        tiles.append(gray.resize((digit_size, digit_size), Image.Resampling.BILINEAR))
    canvas = Image.new("L", (digit_size * len(tiles), digit_size), 255)
    for i, tile in enumerate(tiles):
        canvas.paste(tile, (i * digit_size, 0))
    return canvas.convert("RGB")


def _arith_steps(kind: Kind, d: tuple[int, ...]) -> tuple[int, list[str]]:
    """Answer and the reasoning steps after "The digits are ..."."""
    if kind == "first":
        return d[0], [f"The first is {d[0]}."]
    if kind == "count":
        return len(d), [f"That is {len(d)} digits."]
    if kind == "sum":
        total, steps = d[0], []
        for x in d[1:]:
            steps.append(f"{total}+{x} = {total + x}.")
            total += x
        return total, steps
    a, b, c = d[0], d[1], d[2]
    steps = [f"a*b = {a}*{b} = {a * b}."]
    if len(d) == 3:
        steps.append(f"{a * b}+{c} = {a * b + c}.")
        return a * b + c, steps
    cd = c * d[3]
    steps += [f"c*d = {c}*{d[3]} = {cd}.", f"{a * b}+{cd} = {a * b + cd}."]
    if len(d) == 4:
        return a * b + cd, steps
    steps.append(f"{a * b + cd}-{d[4]} = {a * b + cd - d[4]}.")
    return a * b + cd - d[4], steps


def _question(kind: Kind, k: int, text_only: bool, digits: tuple[int, ...]) -> str:
    where = "in the image"
    prefix = ""
    if text_only:
        prefix = "Digits: " + ", ".join(DIGIT_WORDS[x] for x in digits) + ". "
        where = "listed"
    if kind == "first":
        q = f"What is the first digit {where}?"
    elif kind == "count":
        q = f"How many digits are {where}?"
    elif kind == "sum":
        q = f"What is the sum of the digits {where}?"
    else:
        names = ", ".join("abcde"[:k])
        q = f"Let {names} be the digits {where}, left to right. Compute {_EXPR[k]}."
    return prefix + q + BOX_SUFFIX


def depth_steps(
    level: int, d: tuple[int, ...], letter: int = 0, split_sum: bool = False
) -> tuple[str, int, list[str]]:
    """``(expression, answer, steps after the reading line)`` of a depth-family problem.

    Args:
        level: 1..5 (the table in the module docstring).
        d: The four digits, left to right.
        letter: Level 1 only: which digit (0..3) the question names.
        split_sum: Level 5: add ``c*d``'s tens, then its ones (``56+15=66+5=71``) when it has
            both (one easy addition per step instead of a two-digit sum).
    """
    a, b, c, e = d
    if level == 1:
        name = "abcd"[letter]
        return name, d[letter], [f"{name}={d[letter]}"]
    if level == 2:
        return "a+b", a + b, [f"a+b={a}+{b}={a + b}"]
    ab = a * b
    steps = [f"a*b={a}*{b}={ab}"]
    if level == 3:
        return "a*b", ab, steps
    if level == 4:
        return "a*b+c", ab + c, [*steps, f"a*b+c={ab}+{c}={ab + c}"]
    if level == 5:
        ce = c * e
        total = f"a*b+c*d={ab}+{ce}="
        if split_sum and ce >= 10 and ce % 10:
            total += f"{ab + ce - ce % 10}+{ce % 10}="
        return "a*b+c*d", ab + ce, [*steps, f"c*d={c}*{e}={ce}", f"{total}{ab + ce}"]
    raise ValueError(f"depth level must be 1..5, got {level}")


def _make_depth_problem(
    rng: np.random.Generator, seed: int, split: Split, text_only: bool, cfg: DigitsConfig
) -> DigitsProblem:
    difficulty = int(rng.integers(1, 6))
    letter = int(rng.integers(DEPTH_DIGITS))  # drawn either way: the later draws stay the same
    if not cfg.depth_any_letter:
        letter = 0
    digits = tuple(int(x) for x in rng.integers(cfg.depth_low_digit, 10, size=DEPTH_DIGITS))
    pools = split_indices(seed, cfg.test_fraction)[split]
    image_indices = tuple(int(pools[x][int(rng.integers(len(pools[x])))]) for x in digits)
    expr, answer, steps = depth_steps(difficulty, digits, letter, cfg.depth_split_sum)
    where = "listed" if text_only else "in the image"
    prefix = "Digits: " + ", ".join(DIGIT_WORDS[x] for x in digits) + ". " if text_only else ""
    question = f"{prefix}Let a, b, c, d be the digits {where}, left to right. Compute {expr}."
    read = "The digits are " + ", ".join(str(x) for x in digits) + "."
    return DigitsProblem(
        kind="depth",
        digits=digits,
        image_indices=image_indices,
        difficulty=difficulty,
        question=question + BOX_SUFFIX,
        answer=answer,
        steps=(read, *steps),
    )


def make_problem(
    seed: int,
    split: Split,
    index: int,
    *,
    text_only: bool = False,
    config: DigitsConfig | None = None,
) -> DigitsProblem:
    """Deterministically draw problem ``index`` of a split.

    Args:
        seed: Dataset seed (also fixes the train/test scan split).
        split: ``train`` or ``test``.
        index: Sample number within the split.
        text_only: Phrase the question for the text-only variant.
        config: Generator settings.

    Returns:
        The problem; ``image_indices`` come only from the split's scans.
    """
    cfg = config or DigitsConfig()
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    if cfg.family == "depth":
        return _make_depth_problem(rng, seed, split, text_only, cfg)
    difficulty = int(rng.integers(1, 6))
    options = [key for key, diff in PROBLEM_TABLE.items() if diff == difficulty]
    kind, k = options[int(rng.integers(len(options)))]
    digits = tuple(int(x) for x in rng.integers(0, 10, size=k))
    pools = split_indices(seed, cfg.test_fraction)[split]
    image_indices = tuple(int(pools[x][int(rng.integers(len(pools[x])))]) for x in digits)
    answer, steps = _arith_steps(kind, digits)
    read = "The digits are " + ", ".join(str(x) for x in digits) + "."
    return DigitsProblem(
        kind=kind,
        digits=digits,
        image_indices=image_indices,
        difficulty=difficulty,
        question=_question(kind, k, text_only, digits),
        answer=answer,
        steps=(read, *steps),
    )


def problem_texts(problem: DigitsProblem) -> tuple[str, str, str]:
    """``(question, thinking response, non-thinking response)`` of a problem."""
    final = f"The answer is \\boxed{{{problem.answer}}}."
    thinking = "<think>\n" + "\n".join(problem.steps) + "\n</think>\n\n" + final
    return problem.question, thinking, EMPTY_THINK + final


def problem_to_sample(
    problem: DigitsProblem,
    sample_id: str,
    *,
    text_only: bool = False,
    config: DigitsConfig | None = None,
) -> Sample:
    """Build the schema sample (image as PNG bytes unless ``text_only``) with both responses."""
    cfg = config or DigitsConfig()
    question, thinking, direct = problem_texts(problem)
    images: list[str | bytes] = []
    if not text_only:
        buf = io.BytesIO()
        compose_image(problem.image_indices, cfg.digit_size).save(buf, format="PNG")
        images = [buf.getvalue()]
        question = f"{IMAGE_PLACEHOLDER}\n{question}"
    return Sample(
        id=sample_id,
        images=images,
        conversations=[Turn(role="user", content=question)],
        responses={"thinking": thinking, "non_thinking": direct},
        answer=str(problem.answer),
        answer_type="number",
        difficulty=problem.difficulty,
        source=_tag(text_only, cfg),
    )


def _tag(text_only: bool, cfg: DigitsConfig) -> str:
    """Sample id / source prefix: ``digits[-depth][-text]``."""
    return "digits" + ("-depth" if cfg.family == "depth" else "") + ("-text" if text_only else "")


def generate_digits(
    n: int,
    *,
    split: Split = "train",
    seed: int = 0,
    text_only: bool = False,
    start: int = 0,
    config: DigitsConfig | None = None,
) -> Iterator[Sample]:
    """Samples ``start .. n-1`` of a digits split.

    Example:
        >>> s = next(generate_digits(1, seed=0))
        >>> s.id, s.answer_type, sorted(s.responses)
        ('digits-train-0000000', 'number', ['non_thinking', 'thinking'])
    """
    tag = _tag(text_only, config or DigitsConfig())
    for i in range(start, n):
        problem = make_problem(seed, split, i, text_only=text_only, config=config)
        yield problem_to_sample(
            problem, f"{tag}-{split}-{i:07d}", text_only=text_only, config=config
        )


def digits_corpus(n: int = 2000, seed: int = 0) -> Iterator[str]:
    """Texts the digits generator produces, rendered as chats in both modes (tokenizer training).

    Images are not rendered (only their placeholder tokens), which keeps this fast.
    """
    from megatron_autothink.modes import render_messages

    for text_only in (False, True):
        for i in range(n):
            problem = make_problem(seed, "train", i, text_only=text_only)
            question, thinking, direct = problem_texts(problem)
            user: str | list[dict[str, str]] = question
            if not text_only:
                user = [{"type": "image"}, {"type": "text", "text": question}]
            for response in (thinking, direct):
                yield render_messages(
                    [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
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


def prep_digits(
    out: str,
    *,
    n_train: int = 10_000,
    n_test: int = 1_000,
    seed: int = 0,
    text_only: bool = False,
    config: DigitsConfig | None = None,
    overwrite: bool = False,
    s3_endpoint: str | None = None,
    max_shard_size: int = 64 * 1024 * 1024,
    progress: bool = True,
    save_tokenizer: bool = True,
) -> dict[str, object]:
    """Generate the digits set and write it as an energon dataset with ``train``/``test`` splits.

    The tiny tokenizer (:func:`build_tiny_tokenizer`) is saved
    next to the shards in ``out/tokenizer`` (where ``autothink train`` looks for it).

    Args:
        out: Output folder or ``s3://bucket/prefix``.
        n_train: Training samples.
        n_test: Test samples.
        seed: Generation seed (also fixes which digit scans are test-only).
        text_only: Write the text-only variant (no images).
        config: Generator settings.
        overwrite: Replace a previous dataset at ``out``.
        s3_endpoint: S3 endpoint for ``s3://`` outputs.
        max_shard_size: Bytes per shard.
        progress: Show progress bars.
        save_tokenizer: Also write ``out/tokenizer`` (skipped if one is there already).

    Returns:
        ``{"train": PrepReport, "test": PrepReport}``.
    """
    from megatron_autothink.data.shards import PrepOptions, write_samples

    cfg = config or DigitsConfig()
    reports: dict[str, object] = {}
    jobs = [(split, n) for split, n in (("train", n_train), ("test", n_test)) if n > 0]
    for job_idx, (split, n) in enumerate(jobs):
        split_name: Split = "train" if split == "train" else "test"

        def gen(start: int, split_name: Split = split_name, n: int = n) -> Iterator[Sample]:
            return generate_digits(
                n, split=split_name, seed=seed, text_only=text_only, start=start, config=cfg
            )

        opts = PrepOptions(
            split=split,
            overwrite=overwrite,
            s3_endpoint=s3_endpoint,
            max_shard_size=max_shard_size,
            progress=progress,
            max_error_rate=0.0,  # generated data: any bad sample is a bug
        )
        source_id = {
            "digits": 1,
            "n": n,
            "seed": seed,
            "text_only": text_only,
            # depth-family keys only for that family, so earlier datasets keep their identity
            "config": {
                k: v
                for k, v in dataclasses.asdict(cfg).items()
                if cfg.family == "depth"
                or k not in ("family", "depth_low_digit", "depth_any_letter", "depth_split_sum")
            },
        }
        reports[split] = write_samples(
            gen, out, opts, total=n, source_id=source_id, finalize=job_idx == len(jobs) - 1
        )
    if save_tokenizer:
        _save_tokenizer_next_to(out, s3_endpoint)
    return reports


def _save_tokenizer_next_to(out: str, endpoint: str | None) -> None:
    import tempfile

    from megatron_autothink.data.storage import filesystem

    fs, root = filesystem(out, endpoint=endpoint)
    if fs.exists(f"{root}/tokenizer/tokenizer.json"):
        return
    if not out.startswith("s3://"):
        build_tiny_tokenizer(f"{root}/tokenizer")
        return
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_tokenizer(tmp)
        for name in sorted(os.listdir(tmp)):
            fs.put_file(os.path.join(tmp, name), f"{root}/tokenizer/{name}")
