"""Raw shard iteration, side by side: our reader (`data_pipeline.tario.iter_tar`) against
webdataset's own (`webdataset.WebDataset`, no decoding) over the same local shards.

Why it exists: webdataset could read our shards for us; this measures what that would cost
(it is why webdataset is the format's test reference, not the runtime reader).

    python -m benchmarks.shard_reader [--samples 8000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from data_pipeline.shards import write_shards
from data_pipeline.stats import SkipCounter
from data_pipeline.tario import iter_tar


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=8000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import webdataset as wds

    with tempfile.TemporaryDirectory() as tmp:
        write_shards("shapes", tmp, per_shard=1000, count=args.samples, size=64, seed=0)
        urls = sorted(str(p) for p in Path(tmp).glob("*.tar"))

        def ours() -> int:
            return sum(len(s.fields) for u in urls for s in iter_tar(u, SkipCounter()))

        def theirs() -> int:
            return sum(len(s) - 2 for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False))  # minus __key__, __url__

        best = {"unclip iter_tar": float("inf"), "webdataset.WebDataset": float("inf")}
        for _ in range(args.repeats):  # interleaved: both see the same machine load
            for name, read in zip(best, (ours, theirs)):
                started = time.perf_counter()
                members = read()
                best[name] = min(best[name], time.perf_counter() - started)
        for name, seconds in best.items():
            print(f"{name:24s} {args.samples / seconds:9.0f} samples/s ({members} members, best of {args.repeats})")
        print(f"ratio ours/theirs: {best['webdataset.WebDataset'] / best['unclip iter_tar']:.2f}x")


if __name__ == "__main__":
    main()
