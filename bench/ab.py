"""Two trees' proxies in turns: ``python -m bench.ab --before TREE --after TREE``.

What a change saves end to end, measured the way table (e) of ``bench.run`` measures
the proxy against the thin relay: both proxies up at once, one worker each, pinned to
the proxy's CPU, in front of nginx's canned answers, measured one after the other at
64 connections, kind by kind, round after round; a change in the machine's load
between rounds moves both alike. TREE is a directory the proxy's modules are imported
from: a checkout, or its compiled copy (``bash scripts/compiled`` makes
``build/compiled``; for an older commit, ``git worktree add`` it first). Prints, per
kind, the medians of each proxy's CPU µs per request and of each round's after ÷
before.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from . import governed as modes
from . import report, wrk
from .procs import Layout
from .run import QUICK, Bench, MakeConfig


def compare(
    bench: Bench, mode: str, config: MakeConfig, trees: Sequence[Path], kinds: list[str]
) -> report.Turns:
    """``report.Turns`` of the proxy of ``trees[1]`` against that of ``trees[0]``."""
    cpus, canned = bench.layout.proxy, bench.canned[1]
    with contextlib.ExitStack() as up:
        before, after = (
            up.enter_context(bench.proxy(tag, bench.own_ledger(config, tag), 1, cpus, canned, tree))
            for tag, tree in zip(("before", "after"), trees, strict=True)
        )
        return bench.in_turns(mode, before, after, kinds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the baseline tree")
    parser.add_argument("--after", type=Path, required=True)
    parser.add_argument("--mode", choices=("bare", "governed"), default="bare")
    parser.add_argument("--kinds", default="chat,chat stream,long stream", help="comma-separated")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=3, help="per wrk run (whole seconds)")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    unknown = set(kinds) - set(report.RELAY_KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; known: {list(report.RELAY_KINDS)}")
    trees = [tree.resolve() for tree in (args.before, args.after)]
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    wrk.ensure_installed()
    layout = Layout.for_machine()
    if layout.load is not None:
        os.sched_setaffinity(0, layout.load)
    settings = dataclasses.replace(QUICK, seconds=args.seconds, repeat=args.rounds)
    with tempfile.TemporaryDirectory(prefix="morngpt-ab-") as tmp:
        bench = Bench(settings, layout, Path(tmp))
        try:
            if args.mode == "bare":
                turns = compare(bench, "bare", modes.bare, trees, kinds)
            else:
                with modes.backends(bench.workdir, bench.upstream[1]) as (redis, dsn):

                    def governed(upstream: str, port: int, workers: int) -> dict[str, object]:
                        return modes.governed(upstream, port, workers, redis, dsn)

                    turns = compare(bench, "governed", governed, trees, kinds)
        finally:
            bench.close()
    print(f"python -m bench.ab {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"before: {trees[0]}\nafter: {trees[1]}\n")
    print("| mode | kind | before CPU µs/req | after CPU µs/req | after ÷ before |")
    print("| --- | --- | ---: | ---: | ---: |")
    for kind, (first, second, ratio) in turns.costs.items():
        print(f"| {args.mode} | {kind} | {first:.0f} | {second:.0f} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
