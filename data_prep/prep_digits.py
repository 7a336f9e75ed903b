"""Standalone: ``python data_prep/prep_digits.py --out DIR [--train N --test M --seed S]``.

Thin wrapper over ``autothink prep digits`` (see ``megatron_autothink.data.cli``).
"""

import sys

from megatron_autothink.data.cli import main

if __name__ == "__main__":
    sys.exit(main(["prep", "digits", *sys.argv[1:]]))
