"""Results store at scale: write, compact and query a 100,000-row trials table.

    python benchmarks/bench_results_store.py                # 100 parts x 1,000 rows
    python benchmarks/bench_results_store.py --smoke-test   # 10 parts x 100 rows

Prints the time of each step (not a test: these machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from orchestrator.results import ResultsStore


def rows(part: int, n: int) -> list[dict]:
    metrics = {f"zs/set{k}/top1": 0.5 for k in range(10)}
    config = {f"config/f{k}": k for k in range(25)}
    return [{"fingerprint": f"{part}-{i}", "status": "done", "error": "", **config, **metrics}
            for i in range(n)]


def timed(label: str, fn):
    start = time.perf_counter()
    out = fn()
    print(f"{label}: {time.perf_counter() - start:.2f} s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", type=int, default=100)
    parser.add_argument("--rows", type=int, default=1000, help="rows per part file")
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args()
    if args.smoke_test:
        args.parts, args.rows = 10, 100
    with tempfile.TemporaryDirectory() as tmp:
        store = ResultsStore(tmp)
        timed(f"write {args.parts} part files of {args.rows} rows",
              lambda: [store.write("trials", rows(p, args.rows)) for p in range(args.parts)])
        timed("query before compaction", lambda: store.query("trials", {"status": "done"}))
        timed("compact", lambda: store.compact("trials"))
        frame = timed("filtered query after compaction",
                      lambda: store.query("trials", {"status": "done"},
                                          columns=["fingerprint", "zs/set0/top1"]))
        print(f"rows: {len(frame)}")


if __name__ == "__main__":
    main()
