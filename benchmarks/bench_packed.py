"""Packed trials against one trial at a time: trials/s of ``run_pack`` vs ``run_trial``.

Both run the same trials on the same features, in the same process, one after
the other (so the ratio holds on a loaded machine even if the absolute numbers
do not). Two settings:

- ``demo``: the offline demo's trials (64-d synthetic features -> 32, batch
  512, N = 50 / 500 / 2,000, λ ∈ {0, 10}, two temperatures, three seeds: a
  pack of 12 per N), with fewer epochs than the demo's 300.
- ``paper``: the paper's low-data setting (384-d -> 256, batch 4,096, N = 1,000
  of at most 5,000 pairs; λ ∈ {0, 10}, two seeds: a pack of 4), a few epochs.

It also prints the largest relative difference of ``best_val_loss`` between
the two paths (they compute the same numbers). Each path is timed ``--repeats``
times, interleaved, and its best time counts.

    python benchmarks/bench_packed.py                 # both settings
    python benchmarks/bench_packed.py --setting demo --epochs 100
    python benchmarks/bench_packed.py --smoke-test    # tiny, a few seconds
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trials.config import TrialConfig  # noqa: E402
from trials.packed import run_pack  # noqa: E402
from trials.trial import RetrievalSet, TrialData, ZeroShotSet, run_trial  # noqa: E402

SETTINGS = {  # name -> (image dim, text dim, out dim, batch, Ns, pool size, default epochs)
    "demo": (64, 64, 32, 512, (50, 500, 2000), 2000, 20),
    "paper": (384, 384, 256, 4096, (1000,), 1000, 3),
}


def make_data(image_dim: int, text_dim: int, n_pool: int, seed: int = 0, n_val: int = 250,
              n_test: int = 500, classes: int = 10) -> TrialData:
    """Class-clustered paired features through random linear maps (the demo's kind of world)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, 16)) * 2
    to_img, to_txt = rng.standard_normal((16, image_dim)), rng.standard_normal((16, text_dim))

    def sample(n):
        labels = rng.integers(classes, size=n)
        z = centres[labels] + 0.5 * rng.standard_normal((n, 16))
        noise = lambda d: 0.5 * rng.standard_normal((n, d))  # noqa: E731
        return ((z @ to_img + noise(image_dim)).astype(np.float32),
                (z @ to_txt + noise(text_dim)).astype(np.float32), labels)

    (train_i, train_t, _), (val_i, val_t, _) = sample(n_pool), sample(n_val)
    test_i, test_t, test_y = sample(n_test)
    prompts = ((centres[:, None] + 0.1 * rng.standard_normal((classes, 3, 16))) @ to_txt).astype(np.float32)
    return TrialData(train_i, train_t, val_i, val_t, zero_shot={"zs": ZeroShotSet(test_i, test_y, prompts)},
                     retrieval={"ret": RetrievalSet(test_i, test_t, np.arange(n_test))})


def pack_configs(n: int, out_dim: int, batch: int, epochs: int, seeds: int, temperatures) -> list[TrialConfig]:
    return [TrialConfig(out_dim=out_dim, batch_size=batch, epochs=epochs, patience=epochs, lr=1e-3,
                        warmup_steps=20, n_train=n, seed=seed, structure_lambda=lam, temperature=t)
            for seed, lam, t in itertools.product(range(seeds), (0.0, 10.0), temperatures)]


def measure(data: TrialData, configs: list[TrialConfig], device: str, repeats: int) -> dict:
    """Best of ``repeats`` interleaved timings of each path (a loaded machine slows both alike)."""
    one_by_one = pack = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        alone = [run_trial(data, c, device=device) for c in configs]
        one_by_one = min(one_by_one, time.perf_counter() - started)
        started = time.perf_counter()
        packed = run_pack(data, configs, device=device)
        pack = min(pack, time.perf_counter() - started)
    diff = max(abs(p["best_val_loss"] - a["best_val_loss"]) / abs(a["best_val_loss"])
               for p, a in zip(packed, alone))
    return {"trials": len(configs), "alone_tps": len(configs) / one_by_one, "pack_tps": len(configs) / pack,
            "ratio": one_by_one / pack, "max_rel_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=(*SETTINGS, "both"), default="both")
    parser.add_argument("--epochs", type=int, default=None, help="default: 20 (demo), 3 (paper)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timings per path; the best counts")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    settings, eval_rows = dict(SETTINGS), {}
    if args.smoke_test:
        settings, eval_rows = {"demo": (16, 12, 8, 64, (40,), 80, 2)}, {"n_val": 40, "n_test": 40}
    elif args.setting != "both":
        settings = {args.setting: SETTINGS[args.setting]}
    warm = make_data(8, 8, 40, n_val=20, n_test=20)  # first calls load lazily-imported code
    run_pack(warm, pack_configs(20, 4, 16, 1, 1, (0.05,)), device=args.device)
    run_trial(warm, pack_configs(20, 4, 16, 1, 1, (0.05,))[0], device=args.device)
    summary = []
    for name, (di, dt, out, batch, ns, pool, epochs) in settings.items():
        data = make_data(di, dt, pool, **eval_rows)
        seeds, temperatures = (3, (0.05, 0.1)) if name == "demo" else (2, (0.05,))
        for n in ns:
            r = measure(data, pack_configs(n, out, batch, args.epochs or epochs, seeds, temperatures), args.device,
                        1 if args.smoke_test else args.repeats)
            print(f"{name} N={n} ({di}->{out}, batch {batch}, {args.epochs or epochs} epochs, pack of "
                  f"{r['trials']}): one by one {r['alone_tps']:.2f} trials/s, packed {r['pack_tps']:.2f} "
                  f"trials/s, {r['ratio']:.2f}x; best_val_loss max rel diff {r['max_rel_diff']:.1e}")
            summary.append(f"{name} N={n} {r['ratio']:.2f}x")
    print(f"packed vs one by one ({args.device}, {torch.get_num_threads()} threads): " + ", ".join(summary))


if __name__ == "__main__":
    main()
