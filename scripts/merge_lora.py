"""Fold a LoRA run's adapters into its base: a plain checkpoint that acts the same and loads without peft.

    python scripts/merge_lora.py runs/sft-lora/final runs/sft-lora-merged
"""

import argparse
import sys

from harness.cli import report
from vla.checkpoint import merge_lora


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="checkpoint directory of a run with model.lora.r > 0 (its final/)")
    parser.add_argument("output", help="new directory for the merged checkpoint")
    args = parser.parse_args(argv)
    return report(lambda: print(f"merged {args.adapter} into {merge_lora(args.adapter, args.output)}"))


if __name__ == "__main__":
    sys.exit(main())
