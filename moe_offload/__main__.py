"""Command line: ``python -m moe_offload [bench|demo] ...`` (also the ``moe_offload`` script).

``bench`` (the default) measures step time against activation memory for our strategies
and the peers' in one run (``python -m moe_offload bench -h``); ``demo`` trains a small
MoE transformer for a few steps.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

__all__ = ["main"]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the exit code (bad arguments raise ``SystemExit(2)``)."""
    from .bench.config import build_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in ("bench", "demo") and argv[0] not in ("-h", "--help")):
        argv = ["bench", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser.subcommand_parsers[args.command]
    if args.command == "demo":
        from .bench.demo import demo_main
        return demo_main(args, sub)
    from .bench.cli import bench_main
    return bench_main(args, sub)


if __name__ == "__main__":
    sys.exit(main())
