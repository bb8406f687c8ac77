"""``distnmt bench all``: data, model, train, peer, eval-lag and gpu in turn, into one --out.

Each benchmark keeps its own options' defaults (see ``distnmt bench NAME --help``);
``--tiny`` passes ``--tiny`` to every one (seconds each, for a smoke test), and
``--set`` goes to the two that train (train, peer). eval-lag reads the distnmt run
that peer leaves in ``<out>/runs/distnmt``. One failing benchmark does not stop
the others; the exit status is the worst of theirs.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path


def plan(out: Path, tiny: bool, minutes: float | None, overrides: list[str]) -> list[tuple[str, list[str]]]:
    """(benchmark, argv) in running order."""
    common = ["--out", str(out)] + (["--tiny"] if tiny else [])
    sets = [x for o in overrides for x in ("--set", o)]
    peer = common + sets + (["--minutes", str(minutes)] if minutes is not None else [])
    return [("data", common), ("model", common), ("train", common + sets), ("peer", peer),
            ("eval-lag", ["--run", str(out / "runs/distnmt"), "--out", str(out)]),
            # Without a GPU (or --tiny): its dry mode (tiny sizes, the GPU tests reported skipped).
            ("gpu", common),
            # Its own corpus, prepared data and runs: a subfolder, not beside peer's.
            ("claim", ["--out", str(out / "claim")] + (["--tiny"] if tiny else []) + sets)]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="distnmt bench all", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where every benchmark writes")
    parser.add_argument("--tiny", action="store_true", help="every benchmark in its tiny mode")
    parser.add_argument("--minutes", type=float, default=None, help="peer's budget per system (default: peer's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides for train and peer")
    args = parser.parse_args(argv)
    worst = 0
    for name, bench_argv in plan(args.out.resolve(), args.tiny, args.minutes, args.overrides):
        started = time.time()
        print(f"[bench all] {name}: distnmt bench {name} {' '.join(bench_argv)}", flush=True)
        module = importlib.import_module(f"distnmt.bench.{name.replace('-', '_')}")
        try:
            code = int(module.main(bench_argv))
        except Exception as err:  # one benchmark's failure must not cost the others' figures
            print(f"[bench all] {name} failed: {type(err).__name__}: {err}", flush=True)
            code = 1
        print(f"[bench all] {name}: exit {code} after {time.time() - started:.0f} s", flush=True)
        worst = max(worst, code)
    return worst
