"""The recipe reward (megatron_autothink.rl.rewards.rubric.Rubric), with each shipped recipe's
``rl.rewards``: hand-computed totals, the EOS rule, and the per-recipe grading options."""

from __future__ import annotations

import pytest

from megatron_autothink.config import RewardWeights, load_config
from megatron_autothink.data.batch import PromptSample
from megatron_autothink.rl.rewards import Rubric, Score
from megatron_autothink.rl.rewards.verifier import MathVerifier

BOXED_7 = r"<think>" + "\n3+4=7\n" + r"</think>" + "\n\n" + r"The answer is \boxed{7}."
CUT_MID_THOUGHT = "<think>\nFirst, 3+4=7"  # stopped by the token limit, no answer yet


def _rubric(recipe: str, verifier: MathVerifier) -> Rubric:
    return Rubric(load_config(recipe).rl.rewards, verifier=verifier)


def _score(r: Rubric, text: str, gt: str, *, finished: bool = True, kind: str = "number") -> Score:
    return r.score(text, answer=gt, answer_type=kind, finished=finished)


def test_recipe_options() -> None:
    """What each recipe's released code does (see docs/rl.md, "Rewards")."""
    expected = {
        "r4b_bpo_tiny": (False, None),
        "r4b_bpo_3b": (False, None),
        "lmm_r1_tiny": (True, 1.0),
        "lmm_r1_3b": (True, 1.0),
        "vl_rethinker_tiny": (True, None),
        "vl_rethinker_7b": (True, None),
        "demo_tiny": (False, None),
    }
    for name, opts in expected.items():
        w = load_config(name).rl.rewards
        assert (w.parse_whole_text, w.unparseable_gold_accuracy) == opts, name


@pytest.mark.parametrize("recipe", ["r4b_bpo_tiny", "lmm_r1_tiny", "vl_rethinker_tiny"])
def test_unfinished_response_never_earns_accuracy(recipe: str, verifier: MathVerifier) -> None:
    r = _rubric(recipe, verifier)
    assert _score(r, BOXED_7, "7").components["accuracy"] == 1.0
    for text in (BOXED_7, CUT_MID_THOUGHT):
        s = _score(r, text, "7", finished=False)
        assert s.components["accuracy"] == 0.0 and not s.correct
    assert not _score(r, r"\boxed{B}", "B", finished=False, kind="choice").correct


def test_r4b_bpo(verifier: MathVerifier) -> None:
    r = _rubric("r4b_bpo_tiny", verifier)  # accuracy 1.0, nothing else
    assert _score(r, BOXED_7, "7") == Score(1.0, True, {"accuracy": 1.0})
    assert _score(r, BOXED_7, "8") == Score(0.0, False, {"accuracy": 0.0})
    assert _score(r, CUT_MID_THOUGHT, "7", finished=False) == Score(0.0, False, {"accuracy": 0.0})
    # No answer marker: the number in the reasoning is not graded (parse_whole_text off).
    assert _score(r, "<think>\n3+4=7\n</think>\n\n$7$", "7").reward == 0.0
    # BPO with the think-format reward (tests/rl/test_trainer.py's configuration).
    bpo = Rubric(RewardWeights(think_format=0.5), verifier=verifier)
    short = "<think>\n\n</think>\n\n" + r"\boxed{7}"
    assert _score(bpo, short, "7") == Score(1.5, True, {"accuracy": 1.0, "think_format": 1.0})
    assert _score(bpo, short, "7", finished=False).reward == 0.5  # format only
    assert _score(bpo, r"\boxed{7}", "7").reward == 1.0  # no think block: accuracy only


def test_lmm_r1(verifier: MathVerifier) -> None:
    r = _rubric("lmm_r1_tiny", verifier)  # 0.5 format + 1.0 accuracy
    good = r"<think>3+4</think><answer>\boxed{7}</answer>"
    assert _score(r, good, "7") == Score(1.5, True, {"accuracy": 1.0, "lmm_r1_format": 1.0})
    assert _score(r, good, "8").reward == 0.5
    assert _score(r, r"\boxed{7}", "7").reward == 1.0
    assert _score(r, "<think>3+4</think><answer>7</answer>", "7").reward == 1.5
    # Released code: no marker -> math-verify searches the whole response.
    assert _score(r, "3+4 makes $7$.", "7") == Score(
        1.0, True, {"accuracy": 1.0, "lmm_r1_format": 0.0}
    )
    # Unparseable ground truth: accuracy reward 1 (skip the example), but not counted correct.
    broken = r"\sqrt{}"
    fmt_only = "<think>x</think><answer>3</answer>"
    assert _score(r, fmt_only, broken) == Score(1.5, False, {"accuracy": 1.0, "lmm_r1_format": 1.0})
    assert _score(r, fmt_only, broken, finished=False).reward == 0.5  # EOS rule first
    # Without the option (default weights) the same ground truth grades by string comparison.
    plain = Rubric(RewardWeights(lmm_r1_format=0.5), verifier=verifier)
    assert _score(plain, fmt_only, broken).reward == 0.5


def test_vl_rethinker(verifier: MathVerifier) -> None:
    r = _rubric("vl_rethinker_tiny", verifier)  # accuracy 1.0, invalid -> -0.1
    assert _score(r, r"so \boxed{7}", "7") == Score(1.0, True, {"accuracy": 1.0, "valid": 1.0})
    assert _score(r, r"so \boxed{6}", "7").reward == 0.0
    assert _score(r, r"so \boxed{7}", "7", finished=False) == Score(
        -0.1, False, {"accuracy": 0.0, "valid": 0.0}
    )
    # No box: invalid whatever it says; the whole-text grade still decides ``correct``.
    assert _score(r, "It is $7$.", "7") == Score(-0.1, True, {"accuracy": 1.0, "valid": 0.0})
    assert _score(r, "Wait. " * 6 + r"\boxed{7}", "7").reward == -0.1
    assert _score(r, r"\boxed{(C)}", "C", kind="choice").reward == 1.0
    assert _score(r, r"\boxed{B}", "C", kind="choice").reward == 0.0


def test_rubric_is_the_rollout_score_fn(verifier: MathVerifier) -> None:
    r = _rubric("lmm_r1_tiny", verifier)
    prompt = PromptSample("p0", "q", [1], "q", answer="7", answer_type="number")
    text = r"<think>3+4</think><answer>\boxed{7}</answer>"
    assert r(text, prompt, True) == (1.5, True, {"accuracy": 1.0, "lmm_r1_format": 1.0})
    assert r(text, prompt, False) == (0.5, False, {"accuracy": 0.0, "lmm_r1_format": 1.0})


@pytest.mark.timeout(60)
def test_degenerate_response_is_scored_within_the_time_limit() -> None:
    """Extraction is linear; the whole-text math-verify call has the worker's hard limit."""
    with MathVerifier(timeout_s=2.0, inner_timeout_s=1) as v:
        r = Rubric(RewardWeights(parse_whole_text=True), verifier=v)
        s = r.score(r"\boxed{" * 8000, answer="7", answer_type="number", finished=True)
        assert s == Score(0.0, False, {"accuracy": 0.0})
