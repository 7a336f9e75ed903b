"""The forced-mode rule without vLLM: which tokens a request may not sample next."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_autothink.rollout.think_rule import (
    DEFAULT_MIN_THINK_TOKENS,
    ForcedRule,
    RuleTracker,
    ThinkRuleSettings,
    ThinkVocab,
    forced_rule,
)
from megatron_autothink.rollout.types import SamplingConfig

# <think> = 1, </think> = 2, "\n" = 9 (blank), EOS = 0; content tokens are 5, 6, 7.
VOCAB = ThinkVocab(
    open_ids=(1,),
    close_ids=(2,),
    long_prefill=(1, 9),
    short_prefill=(1, 9, 9, 2, 9, 9),
    blank_ids=frozenset({9}),
)
PROMPT = [3, 4]


def test_defaults_agree() -> None:
    # One default for the engine's SamplingConfig, the settings and the run config.
    from megatron_autothink.config import RolloutConfig

    assert SamplingConfig().think_rule.min_think_tokens == DEFAULT_MIN_THINK_TOKENS == 8
    assert ThinkRuleSettings().min_think_tokens == DEFAULT_MIN_THINK_TOKENS
    assert RolloutConfig().min_think_tokens == DEFAULT_MIN_THINK_TOKENS
    assert RolloutConfig().ban_think_in_short is SamplingConfig().think_rule.ban_think_in_short
    assert RolloutConfig().ban_think_in_short is True


def test_long_bans_close_and_stop_until_enough_content() -> None:
    rule = forced_rule(VOCAB, ThinkRuleSettings(3), [*PROMPT, 1, 9], stop_ids=[0])
    assert rule == ForcedRule("long", 3, frozenset({0}))
    out: list[int] = []
    tracker = RuleTracker(VOCAB, rule, out)
    # The first token must be content: a blank one starts the direct answer's empty block.
    assert tracker.banned() == [2, 1, 0, 9]
    out.append(-1)  # an async placeholder is not a token yet
    assert tracker.banned() == [2, 1, 0, 9]
    out[-1] = 5
    assert tracker.banned() == [2, 1, 0]  # blanks allowed now, nested <think> still not
    out += [9, 9, 6]  # blanks do not count: two content tokens so far
    assert tracker.banned() == [2, 1, 0] and not tracker.done
    out.append(-1)
    assert tracker.banned() == [2, 1, 0]
    out[-1] = 7  # ... until it is replaced by the sampled one
    assert tracker.banned() == [] and tracker.done
    out += [2, 5]  # closing afterwards is the model's choice; nothing is banned any more
    assert tracker.banned() == []


def test_short_bans_open_for_the_whole_completion() -> None:
    rule = forced_rule(VOCAB, ThinkRuleSettings(), [*PROMPT, *VOCAB.short_prefill], [0])
    assert rule == ForcedRule("short")
    out: list[int] = []
    tracker = RuleTracker(VOCAB, rule, out)
    for tok in [5, 9, 6, 7, 0]:
        assert tracker.banned() == [1]  # never done: any later <think> would open a block
        out.append(tok)
    assert not tracker.done


def test_auto_and_switched_off_modes_are_not_constrained() -> None:
    assert forced_rule(VOCAB, ThinkRuleSettings(), PROMPT, [0]) is None  # auto: no prefill
    assert forced_rule(VOCAB, ThinkRuleSettings(), None, [0]) is None
    assert forced_rule(VOCAB, ThinkRuleSettings(0), [*PROMPT, 1, 9], [0]) is None
    short = [*PROMPT, *VOCAB.short_prefill]
    assert forced_rule(VOCAB, ThinkRuleSettings(ban_think_in_short=False), short, [0]) is None
    # A rethink continuation ends with its trigger, not with a prefill.
    assert forced_rule(VOCAB, ThinkRuleSettings(), [*PROMPT, 1, 9, 5, 6], [0]) is None


def test_multi_token_tags_are_banned_as_sequences() -> None:
    # "</think>" as three tokens 20 21 22: 22 is banned only right after 20 21.
    vocab = ThinkVocab((10, 11), (20, 21, 22), (10, 11, 9), (10, 11, 9, 20, 21, 22), frozenset({9}))
    out: list[int] = []
    tracker = RuleTracker(vocab, ForcedRule("long", 2), out)
    assert tracker.banned() == [9]  # only the blank first token: no tag is one token away
    out += [20, 21]  # counts as two content tokens, so the ban has ended after them
    assert tracker.banned() == []
    out.clear()
    tracker = RuleTracker(vocab, ForcedRule("long", 5), out)
    out += [20, 21]
    assert tracker.banned() == [22]
    out.append(5)
    assert tracker.banned() == []
    out += [10]  # a nested "<think>" (10 11) is banned as a sequence too
    assert tracker.banned() == [11]


def test_settings_travel_as_flat_extra_args_and_are_validated() -> None:
    s = ThinkRuleSettings(5, False)
    assert ThinkRuleSettings.from_extra_args(s.to_extra_args()) == s
    assert ThinkRuleSettings.from_extra_args(None) == ThinkRuleSettings()
    assert ThinkRuleSettings.from_extra_args({"other": 1}) == ThinkRuleSettings()
    with pytest.raises(ValueError, match="integer"):
        ThinkRuleSettings.from_extra_args({"autothink_min_think_tokens": "8"})
    with pytest.raises(ValueError, match=">= 0"):
        ThinkRuleSettings.from_extra_args({"autothink_min_think_tokens": -1})
    with pytest.raises(ValueError, match="0 or 1"):
        ThinkRuleSettings.from_extra_args({"autothink_ban_think_in_short": 2})
    with pytest.raises(ValueError, match=">= 0"):
        SamplingConfig(think_rule=ThinkRuleSettings(min_think_tokens=-1))


def test_vocab_from_the_package_tokenizer(tmp_path: Path) -> None:
    from megatron_autothink.data.digits import build_tiny_tokenizer
    from megatron_autothink.data.tokenizer import load_tokenizer

    tok = load_tokenizer(build_tiny_tokenizer(str(tmp_path), corpus_size=200))
    vocab = ThinkVocab.from_tokenizer(tok)
    # Added tokens: one id per tag, and the prefills end with them as the engine appends them.
    assert vocab.open_ids == (tok.convert_tokens_to_ids("<think>"),)
    assert vocab.close_ids == (tok.convert_tokens_to_ids("</think>"),)
    assert vocab.long_prefill[0] == vocab.open_ids[0]
    assert vocab.close_ids[0] in vocab.short_prefill
    newline = tok.encode("\n", add_special_tokens=False)
    assert len(newline) == 1 and newline[0] in vocab.blank_ids
    assert not (set(vocab.open_ids) | set(vocab.close_ids)) & vocab.blank_ids
    assert all(not tok.decode([i]).strip() for i in vocab.blank_ids)


def test_vocab_from_a_multi_token_tokenizer() -> None:
    from tests.rollout.harness import CharTokenizer

    # One id per character: the tags span several ids, and whitespace ids are the blanks.
    vocab = ThinkVocab.from_tokenizer(CharTokenizer(), vocab_size=128)
    assert vocab.close_ids == tuple(map(ord, "</think>"))
    assert vocab.open_ids == tuple(map(ord, "<think>"))
    assert sorted(vocab.blank_ids)[:3] == [9, 10, 11]
    assert ord("a") not in vocab.blank_ids
