"""The forced-mode rule (:mod:`megatron_autothink.rollout.think_rule`) as a vLLM V1 logits
processor.

Why a logits processor and not a ``SamplingParams`` field: ``bad_words`` / ``logit_bias`` ban a
token for the whole completion (right for ``short``, wrong for ``long``, whose ban must lift
after N content tokens), and ``min_tokens`` only bans *stop* tokens (making ``</think>`` a stop
token would end the completion at the close). A V1 logits processor is built by vLLM inside
its worker from a class name (``LLM(logits_processors=[THINK_RULE_PROCESSOR])``, ``vllm serve
--logits-processors``), so the same code runs in the in-process engine, in the multiprocess
engine's child and in the OpenAI server, and it holds no weights: weight updates do not touch
it. It reads its per-request settings from ``SamplingParams.extra_args`` (set by the rollout
engine, or by a server client through ``vllm_xargs``) and the mode from the end of the prompt.

It is not argmax-invariant, so vLLM applies it before greedy and random sampling alike, and
*after* it has computed the ``raw_logprobs`` it reports (``vllm/v1/sample/sampler.py``): the
log-probs the engine returns are the policy's, unconstrained (see ``docs/rl.md``).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from megatron_autothink.rollout.think_rule import (
    RuleTracker,
    ThinkRuleSettings,
    ThinkVocab,
    forced_rule,
)

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig

logger = logging.getLogger(__name__)


# (tokenizer path, vocab size) -> its ThinkVocab: vLLM builds its input batch, and with it this
# processor, more than once per engine; the vocabulary scan runs once.
_VOCABS: dict[tuple[str, int], ThinkVocab | None] = {}


def _vocab_for(model_config: Any) -> ThinkVocab | None:
    """The model's :class:`ThinkVocab`; None when the engine has no tokenizer."""
    from vllm.tokenizers import cached_tokenizer_from_config

    key = (str(model_config.tokenizer), int(model_config.get_vocab_size()))
    if key not in _VOCABS:
        tokenizer = cached_tokenizer_from_config(model_config)
        if tokenizer is None:  # skip_tokenizer_init: no text, no tags to find
            logger.warning("no tokenizer: the forced-mode rule is off in this engine")
            _VOCABS[key] = None
        else:
            _VOCABS[key] = ThinkVocab.from_tokenizer(tokenizer, min(len(tokenizer), key[1]))
    return _VOCABS[key]


class ForcedModeLogitsProcessor(LogitsProcessor):
    """Bans ``</think>`` + stop tokens early in ``long`` completions, ``<think>`` in ``short``
    ones (``think_rule``'s module docstring)."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        self.vocab = _vocab_for(vllm_config.model_config)
        # Persistent-batch row -> the tracker of the forced request in that row.
        self.trackers: dict[int, RuleTracker] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        # In the front end, before the request is scheduled: a bad value is the client's error.
        ThinkRuleSettings.from_extra_args(sampling_params.extra_args)

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is the argmax

    def _new_tracker(
        self, params: SamplingParams, prompt_ids: list[int] | None, output_ids: list[int]
    ) -> RuleTracker | None:
        if self.vocab is None:
            return None
        settings = ThinkRuleSettings.from_extra_args(params.extra_args)
        rule = forced_rule(self.vocab, settings, prompt_ids, params.all_stop_token_ids)
        return None if rule is None else RuleTracker(self.vocab, rule, output_ids)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.trackers, batch_update, self._new_tracker)
        for row in [r for r, t in self.trackers.items() if t.done]:
            del self.trackers[row]

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.trackers:
            return logits
        rows: list[int] = []
        cols: list[int] = []
        width = logits.shape[-1]
        for row, tracker in self.trackers.items():
            for tok in tracker.banned():
                if tok < width:
                    rows.append(row)
                    cols.append(tok)
        if rows:
            index = (
                torch.tensor(rows, device=logits.device),
                torch.tensor(cols, device=logits.device),
            )
            logits[index] = float("-inf")
        return logits
