"""Set-up decisions of the RL stage that need no training run."""

from __future__ import annotations

from megatron_autothink.config import load_config
from megatron_autothink.rl.stage import engine_context_length


def test_engine_is_sized_for_the_longest_rl_stage() -> None:
    """Issue #18 defect 1: the run's one engine serves every RL stage, so its context is the
    largest RL stage's seq_length, not the first stage's."""
    # lmm_r1_3b: data.seq_length 8192 (FRE); the MGT stage overrides it to 16384.
    assert engine_context_length(load_config("lmm_r1_3b")) == 16384
    stages = (
        "[{name: anneal, kind: sft, steps: 1, overrides: {data.seq_length: 2048}}, "
        "{name: fre, kind: rl, steps: 1}, "
        "{name: mgt, kind: rl, steps: 1, overrides: {data.seq_length: 384}}]"
    )
    cfg = load_config("lmm_r1_tiny", [f"stages={stages}", "data.seq_length=256"])
    assert engine_context_length(cfg) == 384  # SFT stages do not count (2048)
    assert engine_context_length(load_config("lmm_r1_tiny", ["stages=[]"])) == 512
