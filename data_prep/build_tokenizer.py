"""Standalone: ``python data_prep/build_tokenizer.py --out DIR`` (the tiny offline tokenizer).

Thin wrapper over ``autothink prep tokenizer`` (see ``megatron_autothink.data.cli``).
"""

import sys

from megatron_autothink.data.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep", "tokenizer", *sys.argv[1:]]))
