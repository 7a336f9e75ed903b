#!/usr/bin/env python
"""Checkpoint conversion without the ``autothink`` entry point (same arguments)::

python tools/convert.py hf-to-mcore HF_DIR OUT_DIR
python tools/convert.py mcore-to-hf CKPT_DIR OUT_DIR [--tp 2 --pp 2 under torchrun]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Use this checkout's package even when another copy is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

if __name__ == "__main__":  # the checkpoint writer spawns processes: keep the guard
    from megatron_autothink.convert.cli import run

    raise SystemExit(run())
