"""Token streaming: a token trial's peak resident memory, streamed vs memory-mapped.

Writes a synthetic token store with the real TokenWriter (fp16 shards; images
N x (1 CLS + P patches) x D, captions of ragged lengths), then runs
trials.token_trial.run_token_trial for a few epochs on (a) StreamedTokens and
(b) MappedTokens, each in a fresh Python process so that each peak is its own.

Peak resident memory is the child's ru_maxrss: anonymous memory plus the
file-backed pages it maps (a mapped shard's pages count once touched; the
kernel's page cache behind plain reads does not). The budget bounds the
WHOLE process's peak, interpreter and torch included (the stricter reading);
the baseline is printed beside it: resident memory after a warm-up trial on
a few resident samples (torch, the trial code and what they import lazily),
so peak - baseline is the trial's own share. Streamed, that share is set by
the batch (float32 tokens of the batch in use and of the ``DEPTH`` read
ahead, the activations, the allocator's retained free blocks), not by the
cache; mapped, every page of the cache a trial reads adds to it. Dimensions
are small, so compute is cheap next to the bytes moved: it is the memory
that is measured. Both children read a store the parent has just written
(warm page cache), so s/epoch compares reading, not the disk; on a shared
machine it is noisy.

    python benchmarks/bench_token_streaming.py                  # ~1.5 GB cache, budget 0.75 GB
    python benchmarks/bench_token_streaming.py --n-train 50000 --budget-gb 1.0
    python benchmarks/bench_token_streaming.py --smoke-test     # a few MB, no budget check

Exits 1 when the streamed peak exceeds --budget-gb (not in --smoke-test,
where a few MB of tokens cannot be told apart from the interpreter).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GB = 1e9
VARIANTS = ("streamed", "mapped")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-train", type=int, default=26000, help="training pairs (one caption per image)")
    parser.add_argument("--n-val", type=int, default=2000, help="validation pairs (also the retrieval set)")
    parser.add_argument("--patches", type=int, default=196, help="patch tokens per image (P)")
    parser.add_argument("--image-dim", type=int, default=128)
    parser.add_argument("--text-dim", type=int, default=64)
    parser.add_argument("--max-words", type=int, default=40, help="caption lengths are drawn from 8..max")
    parser.add_argument("--out-dim", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--budget-gb", type=float, default=0.75,
                        help="bound on the streamed child's whole peak resident memory (GB = 1e9 B)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--smoke-test", action="store_true", help="a few MB of tokens, a few seconds")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: one measured run
    parser.add_argument("--entries", help=argparse.SUPPRESS)  # internal: JSON of the entry paths
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.n_train, args.n_val, args.patches, args.image_dim, args.text_dim = 96, 32, 16, 16, 8
        args.max_words, args.out_dim, args.batch_size, args.epochs = 12, 8, 32, 2
    return args


# ---- the parent: write the store, run each variant in its own process ----

def write_store(root: Path, args) -> dict:
    """Train/val image and text entries of random tokens; returns their paths by name."""
    from orchestrator.feature_store import FeatureStore
    from orchestrator.token_store import TokenWriter

    store, rng, paths = FeatureStore(root), np.random.default_rng(0), {}
    for split, n in (("train", args.n_train), ("val", args.n_val)):
        for role, dim, prefix in (("image", args.image_dim, 1), ("text", args.text_dim, 0)):
            key = f"{role}-{split}"
            with TokenWriter(store, key, dim=dim, num_prefix=prefix) as writer:
                for first in range(0, n, 512):  # written as an extraction does, batch by batch
                    count = min(512, n - first)
                    lengths = [args.patches] * count if role == "image" else rng.integers(8, args.max_words + 1, count)
                    writer.write(rng.standard_normal((count, prefix, dim), np.float32),
                                 [rng.standard_normal((int(k), dim), np.float32) for k in lengths])
            paths[key] = str(store.path(key))
    return paths


def cache_bytes(paths: dict) -> int:
    return sum(f.stat().st_size for p in paths.values() for f in Path(p).glob("*.npy"))


def run_child(variant: str, paths: dict, argv: list[str]) -> dict:
    """One variant in a fresh interpreter; its JSON report (the last line of its output)."""
    done = subprocess.run([sys.executable, __file__, *argv, "--child", variant, "--entries", json.dumps(paths)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the {variant} run failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return
    argv = sys.argv[1:]  # the children get the same sizes and options
    with tempfile.TemporaryDirectory(prefix="bench-token-streaming-") as tmp:
        start = time.perf_counter()
        paths = write_store(Path(tmp), args)
        size = cache_bytes(paths)
        print(f"store: {size / GB:.3f} GB of fp16 tokens written in {time.perf_counter() - start:.1f} s "
              f"({args.n_train}+{args.n_val} images x (1+{args.patches}) x {args.image_dim}, "
              f"captions of 8..{args.max_words} x {args.text_dim})")
        batch = args.batch_size * (1 + args.patches) * args.image_dim * 4
        print(f"one training batch of image tokens, float32: {batch / 1e6:.1f} MB (batch {args.batch_size})")
        runs = {variant: run_child(variant, paths, argv) for variant in VARIANTS}
    for variant, run in runs.items():
        print(f"{variant}: peak RSS {run['peak'] / GB:.3f} GB (baseline {run['baseline'] / GB:.3f} GB, "
              f"trial's share {(run['peak'] - run['baseline']) / GB:.3f} GB); "
              f"high-water mark after each epoch {[round(h / GB, 3) for h in run['hwm_by_epoch']]} GB; "
              f"s/epoch {[round(s, 2) for s in run['epoch_seconds']]}; "
              f"val loss {run['best_val_loss']:.6f}")
    streamed, mapped = runs["streamed"], runs["mapped"]
    s_streamed, s_mapped = (float(np.mean(r["epoch_seconds"])) for r in (streamed, mapped))
    within = streamed["peak"] <= args.budget_gb * GB
    print(f"token streaming: cache {size / GB:.2f} GB, budget {args.budget_gb:.2f} GB (whole process); "
          f"streamed peak RSS {streamed['peak'] / GB:.2f} GB ({'below' if within else 'ABOVE'} budget), "
          f"mapped {mapped['peak'] / GB:.2f} GB, baseline {streamed['baseline'] / GB:.2f} GB; "
          f"s/epoch streamed {s_streamed:.2f} vs mapped {s_mapped:.2f} ({s_streamed / s_mapped:.2f}x)")
    if not within and not args.smoke_test:
        sys.exit(1)


# ---- a child: one measured trial ----

def _status_bytes(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` of this process, in bytes (Linux's /proc)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _resident_data(args, n: int = 64):
    """A few random resident samples of the benchmark's shapes (the warm-up trial's data)."""
    from trials.token_trial import TokenTrialData
    from trials.tokens import RaggedTokens, TokenPairs

    rng = np.random.default_rng(1)
    image = RaggedTokens(rng.standard_normal((n * args.patches, args.image_dim), np.float32),
                         np.arange(n + 1) * args.patches, rng.standard_normal((n, 1, args.image_dim), np.float32))
    text = RaggedTokens(rng.standard_normal((n * 8, args.text_dim), np.float32), np.arange(n + 1) * 8,
                        np.zeros((n, 0, args.text_dim), np.float32))
    pairs = TokenPairs(image, text, np.arange(n))
    return TokenTrialData(pairs, pairs, retrieval={"warm-up": pairs})


def measure(args) -> dict:
    """Run the trial on the ``args.child`` reader; baseline, peak, per-epoch high-water marks and times."""
    import torch

    from orchestrator.token_store import MappedTokens, StreamedTokens
    from trials.config import TrialConfig
    from trials.token_trial import TokenTrialData, run_token_trial
    from trials.tokens import TokenPairs

    if args.threads:
        torch.set_num_threads(args.threads)
    config = TrialConfig(head="token_projector", head_options={"schedule": "none", "mixed_precision": False},
                         out_dim=args.out_dim, epochs=args.epochs, patience=args.epochs + 1,
                         batch_size=args.batch_size, lr=1e-3, temperature=0.07, structure_lambda=0.0)
    # A one-epoch trial on a few resident samples first: it loads the modules torch imports
    # lazily (the optimiser pulls in torch._dynamo, ~100 MB), so the baseline holds them.
    run_token_trial(_resident_data(args), dataclasses.replace(config, epochs=1, patience=2))
    baseline = _status_bytes("VmRSS")
    reader = StreamedTokens if args.child == "streamed" else MappedTokens
    paths = json.loads(args.entries)

    def pairs(split: str) -> TokenPairs:
        image, text = reader(paths[f"image-{split}"]), reader(paths[f"text-{split}"])
        return TokenPairs(image, text, np.arange(len(text)))

    val = pairs("val")
    data = TokenTrialData(pairs("train"), val, retrieval={"val": val})
    marks = [time.perf_counter()]
    hwm = []

    def on_epoch(epoch: int, row: dict) -> None:
        marks.append(time.perf_counter())
        hwm.append(_status_bytes("VmHWM"))

    metrics = run_token_trial(data, config, on_epoch=on_epoch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"baseline": baseline, "peak": peak, "hwm_by_epoch": hwm, "epoch_seconds": np.diff(marks).tolist(),
            "best_val_loss": metrics["best_val_loss"]}


if __name__ == "__main__":
    main()
