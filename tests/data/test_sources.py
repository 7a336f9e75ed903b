"""Readers of conversation data: records into the schema, bad records named by reason."""

from __future__ import annotations

import pytest

from megatron_autothink.data import sources


def test_record_conversion() -> None:
    rec = {
        "id": 5,
        "images": ["a.png", "b.png"],
        "conversations": [
            {"from": "system", "value": "s"},
            {"from": "human", "value": "compare"},
            {"from": "gpt", "value": "same"},
        ],
        "answer": 3,
        "answer_type": "number",
        "unrelated": "ignored",
    }
    s = sources.record_to_sample(rec, fallback_id="f", source="src")
    assert s.id == "5" and s.answer == "3" and s.source == "src"
    assert s.conversations[1].content == "<image>\n<image>\ncompare"
    with pytest.raises(sources.BadRecord, match="invalid_schema"):
        sources.record_to_sample({"conversations": "[1"}, fallback_id="f", source=None)
