"""Time ``trials.similarity.layer_similarity`` (all pairs at once) against a naive per-pair loop.

The naive loop is what the official ``compute_score`` does (METHOD.md §6.2):
normalise both layers and call the metric for every (i, j), so each layer's kNN
sets / Gram matrix are recomputed Ly (or Lx) times.

    python benchmarks/bench_layer_similarity.py                 # 12 x 13 layers, N=2000, D=384
    python benchmarks/bench_layer_similarity.py --smoke-test    # tiny, every metric, a few seconds

Not a test: it prints timings and the speed-up, and checks the two agree.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from trials.similarity import METRICS, layer_similarity, topk_from_rule


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers-x", type=int, default=12, help="number of image layers")
    parser.add_argument("--layers-y", type=int, default=13, help="number of text layers")
    parser.add_argument("--n", type=int, default=2000, help="rows (paired samples)")
    parser.add_argument("--dim", type=int, default=384, help="feature dimension of every layer")
    parser.add_argument("--metrics", default="mutual_knn",
                        help=f"comma-separated, from {', '.join(METRICS)} (the naive CKA loop is O(n^3) per pair)")
    parser.add_argument("--k", default="rice", help="kNN k: an integer or rice / sqrt / sturges")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the box is shared)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes and every metric")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.layers_x, args.layers_y, args.n, args.dim, args.metrics = 3, 4, 120, 32, ",".join(METRICS)
    return args


def random_layers(n_layers: int, n: int, dim: int, seed: int, device: str) -> torch.Tensor:
    """[L, N, D] float32 features sharing a low-rank signal, so kNN sets overlap a little."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 16, generator=g)
    layers = [shared @ torch.randn(16, dim, generator=g) + torch.randn(n, dim, generator=g) for _ in range(n_layers)]
    return torch.stack(layers).to(device)


def naive_scores(xs: torch.Tensor, ys: torch.Tensor, metric: str, k: int) -> torch.Tensor:
    """The official per-pair loop: normalise and score every pair from scratch."""
    spec, args = METRICS.get(metric), ((k,) if METRICS.get(metric).uses_k else ())
    rows = [[spec.pair(F.normalize(x, dim=-1), F.normalize(y, dim=-1), *args) for y in ys] for x in xs]
    return torch.stack([torch.stack(r) for r in rows])


def timed(fn):
    start = time.perf_counter()
    result = fn()
    if result.is_cuda:
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    xs = random_layers(args.layers_x, args.n, args.dim, seed=0, device=args.device)
    ys = random_layers(args.layers_y, args.n, args.dim, seed=1, device=args.device)
    k = topk_from_rule(args.n, args.k)
    print(f"{args.layers_x} x {args.layers_y} layer pairs, N={args.n}, D={args.dim}, k={k}, "
          f"device={args.device}, threads={args.threads}")
    for metric in args.metrics.split(","):
        fast, t_fast = timed(lambda: layer_similarity(xs, ys, metric=metric, k=k))
        slow, t_slow = timed(lambda: naive_scores(xs, ys, metric, k))
        max_diff = (fast - slow.double()).abs().max().item()
        print(f"{metric:>13}: all-pairs {t_fast:8.3f} s | per-pair loop {t_slow:8.3f} s | "
              f"speed-up {t_slow / t_fast:6.1f}x | max |diff| {max_diff:.1e}")


if __name__ == "__main__":
    main()
