"""Check a dataset directory: `python scripts/validate_dataset.py PATH`. Prints OK with totals, or the problems
(exit code 1)."""

import argparse
import sys

from store.lerobot import LeRobotDataset
from store.validate import validate_dataset


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("path", help="dataset root (the directory holding meta/ and data/)")
    args = parser.parse_args(argv)
    problems = validate_dataset(args.path)
    if problems:
        print(f"{args.path}: {len(problems)} problem(s)")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    info = LeRobotDataset(args.path).info
    print(f"OK {args.path}: {info['total_episodes']} episodes, {info['total_frames']} frames, "
          f"{info['total_tasks']} instructions, {info['fps']} fps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
