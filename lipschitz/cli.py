"""The `lipschitz` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="lipschitz", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    bench = commands.add_parser("bench", help="run a benchmark (projections)")
    bench.add_argument("name", choices=["projections"])
    bench.add_argument("args", nargs=argparse.REMAINDER, help="options for the benchmark")
    args = parser.parse_args(argv)
    if args.command == "bench":
        from lipschitz import bench as bench_module

        bench_module.main(args.args)


if __name__ == "__main__":
    main()
