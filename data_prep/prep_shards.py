"""Standalone: ``python data_prep/prep_shards.py --input data.jsonl --out DIR_or_s3://b/p``.

Thin wrapper over ``autothink prep shards`` (see ``megatron_autothink.data.cli``).
"""

import sys

from megatron_autothink.data.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep", "shards", *sys.argv[1:]]))
