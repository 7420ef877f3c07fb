"""Speed benchmarks against peers measured side by side (the sections: bench/benchmark.py, or --help).

    python scripts/benchmark.py                      # every section, JSON to bench/results.json
    python scripts/benchmark.py --only sim --seconds 5
"""

import argparse
import sys
from pathlib import Path

from bench import benchmark
from harness.cli import report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=benchmark.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", choices=sorted(benchmark.SECTIONS), default=sorted(benchmark.SECTIONS))
    parser.add_argument("--seconds", type=float, default=8.0, help="timing window per measurement")
    parser.add_argument("--out", default=str(benchmark.ROOT / "bench" / "results.json"))
    parser.add_argument("--pipeline-dir", default="runs/pipeline", help="where the pipeline section runs (cached)")
    args = parser.parse_args(argv)
    return report(lambda: benchmark.run_sections(args.only, args.seconds, Path(args.out), args.pipeline_dir))


if __name__ == "__main__":
    sys.exit(main())
