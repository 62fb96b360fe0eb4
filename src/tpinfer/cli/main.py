"""The ``tpinfer`` command: one module per subcommand, each with ``register(subparsers)``.

A subcommand module keeps its imports light at module level (no torch) so ``tpinfer --help`` is fast;
``register`` adds its parser and sets ``func`` to a function taking the parsed arguments and returning
an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

SUBCOMMANDS = ("generate", "embed", "info", "plan", "check", "bench", "serve", "verify")

EPILOG = """examples:
  tpinfer generate --tensor-parallel-size 2 "The function returns"
  tpinfer embed --model path/to/all-MiniLM-L6-v2 --tp 2 --json "A sentence to embed."
  tpinfer info --model path/to/hf-checkpoint
  tpinfer plan --model llama-3-70b --gpu h100-80gb --gpus-per-node 8
run `tpinfer COMMAND --help` for each command's options and an example."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tpinfer",
        description="Tensor-parallel inference for Hugging Face checkpoints: decoder LMs and BERT encoders.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging on stderr")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"tpinfer.cli.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"tpinfer.cli.{name}":
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("tpinfer: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; -v shows the traceback
        if args.verbose:
            raise
        print(f"tpinfer {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
