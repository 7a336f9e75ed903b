"""Forced modes are forced: the decoding rule behind ``long`` and ``short`` (issue #19, item 0).

A prefill cannot force anything by itself: after ``long``'s ``"<think>\\n"`` a model that has
learnt to answer directly samples ``</think>`` at once, and after ``short``'s empty block
``"<think>\\n\\n</think>\\n\\n"`` nothing stops it from opening a second ``<think>``. Thinking
rates, BPO's forced groups and the long-vs-short comparisons then measure the model's habit,
not the mode. So the engine bans tokens while it decodes a forced mode:

* **long** (the completion starts inside an open, empty think block): ``</think>``, a nested
  ``<think>`` and the stop tokens (EOS, ``SamplingConfig.stop_token_ids``) are banned until the
  completion holds ``min_think_tokens`` *content* tokens, i.e. tokens whose text is not
  whitespace only, and the *first* token must be content (blank tokens are banned until one
  content token is written). Blank tokens do not count because a block of newlines is an empty
  block (``rl.rewards.is_thinking`` strips it), and a model that wants to close would otherwise
  pad the block with ``"\\n"`` and close after N of them. A blank first token is the direct
  answer's path itself (``<think>\\n`` + ``"\\n"`` is the empty block's opening): a model that
  answers directly takes it and then writes a direct answer, a second ``<think>`` or noise
  inside the block (measured: 6 % on the hardest digits level with the ban on ``</think>``
  alone, docs/demo_study.md), so the decision position itself is constrained, as a
  ``<think>\\nThe`` prefill would, without naming the trace's first word. Stop tokens are banned
  because ``<think>\\n<|im_end|>`` is as empty as ``<think>\\n</think>``. After the N-th content
  token nothing is banned: the model decides how long to think.
* **short** (the completion starts after an empty, closed think block): ``<think>`` is banned
  for the whole completion, so the think block stays the empty one of the prefill.
* **auto**: nothing is banned; whether to think is the model's decision.

The mode is read from the end of the prompt (the prefill is its last tokens), not from a flag:
the same rule then holds for the rollout engine, which appends the prefill itself, and for the
OpenAI server, whose chat template renders it (``serve.py``). A tag that is several tokens long
(a tokenizer without the added think tokens) is banned as a sequence: its last token is banned
where the output ends with the others, as vLLM's ``bad_words`` does; the package's tokenizers
add both tags as single tokens.

This module is pure Python (no vLLM): :class:`RuleTracker` is used by vLLM's logits processor
(``rollout/vllm_think_rule.py``) and can drive any engine that samples token by token.

How the banned positions enter the RL loss is in ``docs/rl.md`` ("Forced modes"): the engine
reports *raw* log-probs (the policy's full softmax, before the ban), which is what the trainer
recomputes, so ``mismatch/*`` compares like with like, and the tokens are trained as ordinary
on-policy samples of the unconstrained policy.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from megatron_autothink.modes import PREFILLS
from megatron_autothink.rollout.types import (
    DEFAULT_MIN_THINK_TOKENS,
    ThinkRuleSettings,
)

__all__ = [
    "DEFAULT_MIN_THINK_TOKENS",
    "ForcedRule",
    "RuleTracker",
    "ThinkRuleSettings",
    "ThinkVocab",
    "forced_rule",
]


@dataclass(frozen=True, slots=True)
class ThinkVocab:
    """The token ids the rule needs, from one tokenizer.

    Attributes:
        open_ids: ``<think>`` as tokens.
        close_ids: ``</think>`` as tokens.
        long_prefill: ``PREFILLS["long"]`` as tokens (how the engine appends it).
        short_prefill: ``PREFILLS["short"]`` as tokens.
        blank_ids: Tokens whose text is whitespace only (they do not count as thinking).
    """

    open_ids: tuple[int, ...]
    close_ids: tuple[int, ...]
    long_prefill: tuple[int, ...]
    short_prefill: tuple[int, ...]
    blank_ids: frozenset[int]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, vocab_size: int | None = None) -> ThinkVocab:
        """Encode the tags and prefills, and find the blank tokens among the first
        ``vocab_size`` ids (default: the tokenizer's length) by decoding each one.
        """

        def encode(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        n = len(tokenizer) if vocab_size is None else vocab_size
        ids = [[i] for i in range(n)]
        # One batched call where the tokenizer has it (Qwen's 152k ids: well under a second).
        batch = getattr(tokenizer, "batch_decode", None)
        texts = batch(ids) if batch is not None else [tokenizer.decode(i) for i in ids]
        return cls(
            open_ids=encode("<think>"),
            close_ids=encode("</think>"),
            long_prefill=encode(PREFILLS["long"]),
            short_prefill=encode(PREFILLS["short"]),
            blank_ids=frozenset(i for i, t in enumerate(texts) if t and not t.strip()),
        )

    def forced_mode(self, prompt_ids: Sequence[int]) -> Literal["long", "short"] | None:
        """The forced mode a prompt ends in, read from its last tokens; None: not forced.

        >>> v = ThinkVocab((1,), (2,), (1, 9), (1, 9, 9, 2, 9, 9), frozenset({9}))
        >>> v.forced_mode([5, 1, 9]), v.forced_mode([5, 1, 9, 9, 2, 9, 9]), v.forced_mode([5])
        ('long', 'short', None)
        """
        for mode, prefill in (("long", self.long_prefill), ("short", self.short_prefill)):
            k = len(prefill)
            if k and len(prompt_ids) >= k and tuple(prompt_ids[-k:]) == prefill:
                return mode  # type: ignore[return-value]
        return None


@dataclass(frozen=True, slots=True)
class ForcedRule:
    """What one request may not sample (see the module docstring).

    Attributes:
        mode: The forced mode its prompt ends in.
        min_think_tokens: ``long``: content tokens before the close tag and the stop tokens are
            allowed.
        stop_ids: The request's stop tokens (EOS included), banned with the close tag.
    """

    mode: Literal["long", "short"]
    min_think_tokens: int = 0
    stop_ids: frozenset[int] = frozenset()


def forced_rule(
    vocab: ThinkVocab,
    settings: ThinkRuleSettings,
    prompt_ids: Sequence[int] | None,
    stop_ids: Collection[int] = (),
) -> ForcedRule | None:
    """The rule of a request, None when nothing is banned (auto mode, or the rule switched off).

    >>> v = ThinkVocab((1,), (2,), (1, 9), (1, 9, 9, 2, 9, 9), frozenset({9}))
    >>> forced_rule(v, ThinkRuleSettings(4), [5, 1, 9], stop_ids=[0])
    ForcedRule(mode='long', min_think_tokens=4, stop_ids=frozenset({0}))
    >>> forced_rule(v, ThinkRuleSettings(0), [5, 1, 9]) is None
    True
    """
    mode = vocab.forced_mode(prompt_ids or [])
    if mode == "long" and settings.min_think_tokens > 0 and vocab.close_ids:
        return ForcedRule("long", settings.min_think_tokens, frozenset(stop_ids))
    if mode == "short" and settings.ban_think_in_short and vocab.open_ids:
        return ForcedRule("short")
    return None


class RuleTracker:
    """Follows one request's output and says which tokens it may not sample next.

    ``output_ids`` is the request's live output list (vLLM hands its logits processors a
    reference that grows as tokens are sampled); the tracker counts content tokens
    incrementally, so a step costs the new tokens only.

    Example (``<think>`` = 1, ``</think>`` = 2, blank ``"\\n"`` = 9, EOS = 0, two content tokens
    required):
        >>> v = ThinkVocab((1,), (2,), (1, 9), (1, 9, 9, 2, 9, 9), frozenset({9}))
        >>> out: list[int] = []
        >>> t = RuleTracker(v, ForcedRule("long", 2, frozenset({0})), out)
        >>> t.banned()  # the first token must be content
        [2, 1, 0, 9]
        >>> out += [5, 9]; t.banned()  # one content token and a blank
        [2, 1, 0]
        >>> out += [6]; t.banned(), t.done
        ([], True)
    """

    def __init__(self, vocab: ThinkVocab, rule: ForcedRule, output_ids: Sequence[int]) -> None:
        self.vocab = vocab
        self.rule = rule
        self.output_ids = output_ids
        self._seen = 0
        self._content = 0

    @property
    def done(self) -> bool:
        """Nothing will be banned any more (a long rule whose count is reached)."""
        return self.rule.mode == "long" and self._content >= self.rule.min_think_tokens

    def _count(self) -> None:
        out = self.output_ids
        while self._seen < len(out):
            tok = out[self._seen]
            if tok < 0:  # an async-scheduling placeholder, not a token yet: count it later
                break
            if tok not in self.vocab.blank_ids:
                self._content += 1
            self._seen += 1

    def banned(self) -> list[int]:
        """Token ids the next sample may not be."""
        if self.rule.mode == "short":
            return _sequence_ban(self.vocab.open_ids, self.output_ids)
        self._count()
        if self.done:
            return []
        ban = _sequence_ban(self.vocab.close_ids, self.output_ids)
        ban += _sequence_ban(self.vocab.open_ids, self.output_ids) + sorted(self.rule.stop_ids)
        if self._content == 0:
            ban += sorted(self.vocab.blank_ids)
        return ban


def _sequence_ban(tag: tuple[int, ...], output_ids: Sequence[int]) -> list[int]:
    """``[tag[-1]]`` where sampling it would complete ``tag``, else ``[]``.

    >>> _sequence_ban((7,), []), _sequence_ban((3, 7), [1, 3]), _sequence_ban((3, 7), [3, 1])
    ([7], [7], [])
    """
    head = tag[:-1]
    if not tag:
        return []
    if head and tuple(output_ids[len(output_ids) - len(head) :]) != head:
        return []
    return [tag[-1]]
