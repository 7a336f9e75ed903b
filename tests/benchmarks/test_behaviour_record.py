"""The before/after comparison of ``benchmarks/behaviour_record.py`` (issue #23's proof that a
restructuring changed nothing) reports what moved and ignores timings."""

from __future__ import annotations

import copy
from typing import Any

from benchmarks.behaviour_record import compare


def _record() -> dict[str, Any]:
    return {
        "seconds": {"train": 20.0},
        "train_losses": {"sft": {"1": 6.9, "2": 6.5}},
        "demo_eval": {"eval_after": {"long": {"1": {"accuracy": 0.5}}}},
        "export_digest": "abc",
        "round_trip_digest": "abc",
    }


def test_identical_records_and_timings_do_not_count() -> None:
    new = _record()
    new["seconds"]["train"] = 99.0
    assert compare(_record(), new) == []


def test_loss_beyond_tolerance_tables_and_weights_are_reported() -> None:
    new = copy.deepcopy(_record())
    new["train_losses"]["sft"]["2"] += 1e-7  # within 1e-6: unchanged
    assert compare(_record(), new) == []
    new["train_losses"]["sft"]["2"] += 1e-5
    new["demo_eval"]["eval_after"]["long"]["1"]["accuracy"] = 0.25
    new["round_trip_digest"] = "abd"
    diffs = compare(_record(), new)
    assert any(d.startswith("train_losses[sft]: max |loss diff| 1.0") for d in diffs), diffs
    assert "demo_eval: differs" in diffs
    assert "conversion round trip: hf1 and hf2 differ" in diffs
    del new["train_losses"]["sft"]["2"]
    assert any("steps" in d for d in compare(_record(), new))


def test_a_step_that_trained_nothing_is_nan_in_both() -> None:
    old, new = copy.deepcopy(_record()), copy.deepcopy(_record())
    old["train_losses"]["ssr"] = {"1": float("nan")}
    new["train_losses"]["ssr"] = {"1": float("nan")}
    assert compare(old, new) == []
    new["train_losses"]["ssr"]["1"] = 0.5
    assert compare(old, new) == ["train_losses[ssr]: NaN in one record only at steps ['1']"]
