#!/usr/bin/env python3
"""
Memory benchmark: the daemon's peak RSS must not grow with the queue or the
message (DESIGN.md, contract 5).

    python bench/memory.py            # both cases below
    python bench/memory.py --queue    # 100,000 queued messages of 2 KB: < 200 MB
    python bench/memory.py --large    # one 100 MB message:            < 100 MB

Each case is a ``bench/drain.py`` run (the spool filled through the enqueue
API, ``twistd -n relayagent`` draining it into smtp-sink); the figure is
the daemon's VmHWM from /proc.  Measured here, never asserted in tests.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import drain  # noqa: E402  (bench/ on sys.path)

CASES = {
    "queue": (["--messages", "100000", "--size", "2000"], 200),
    "large": (["--messages", "1", "--size", "100000000"], 100),
}


def run(name: str, workers: int = 1) -> bool:
    arguments, limit_mib = CASES[name]
    args = drain.parse_arguments([*arguments, "--workers", str(workers)])
    workdir = tempfile.mkdtemp(prefix=f"relayagent-memory-{name}-")
    try:
        os.makedirs(os.path.join(workdir, "relayagent"))
        result = drain.run_relayagent(args, os.path.join(workdir, "relayagent"))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    drain.report(result, args)
    peak = result["peak_rss_mib"]
    verdict = "ok" if result["complete"] and peak < limit_mib else "OVER THE LIMIT or incomplete"
    print(f"{name}: peak RSS {peak:.0f} MiB (limit {limit_mib} MiB): {verdict}", flush=True)
    return verdict == "ok"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queue", action="store_true", help="100,000 queued messages of 2 KB")
    parser.add_argument("--large", action="store_true", help="one 100 MB message")
    parser.add_argument("--workers", type=int, default=1,
                        help="relayagent_workers; the peak RSS is then the sum over the processes")
    options = parser.parse_args(argv)
    names = [n for n in CASES if getattr(options, n)] or list(CASES)
    results = [run(name, options.workers) for name in names]
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
