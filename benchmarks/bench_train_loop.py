"""Throughput of one trial's training loop (trials.train.train_alignment).

Random features, two linear heads, CLIP + λ·R_S (λ fixed, no warm-up), a fixed
LR, validation every epoch. Prints samples/s and the fraction of the machine's
own fp32 matmul throughput (measured in the same run) that the loop achieves,
counting the matmul FLOPs of heads, CLIP logits and R_S (forward + backward).

    python benchmarks/bench_train_loop.py            # N=5000, 384->256, batch 4096, 50 epochs
    python benchmarks/bench_train_loop.py --impl reference
    python benchmarks/bench_train_loop.py --smoke-test

The FLOPs counted are those of the reference formulas (the work to be done),
whichever path runs them. benchmarks/bench_fast_loop.py compares the paths.
"""

from __future__ import annotations

import argparse
import time

import torch

from trials.heads import build_head
from trials.losses import AlignmentLoss
from trials.train import TrainConfig, train_alignment


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=5000, help="training pairs (and validation pairs)")
    parser.add_argument("--in-dim", type=int, default=384)
    parser.add_argument("--out-dim", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lam", type=float, default=10.0)
    parser.add_argument("--matmul-size", type=int, default=None, help="square fp32 matmul size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--impl", choices=("auto", "fast", "reference"), default="auto",
                        help="train_alignment's path (auto: fast where it applies)")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.smoke_test:
        args.n, args.in_dim, args.out_dim, args.batch_size, args.epochs = 512, 64, 32, 256, 3
        args.matmul_size = args.matmul_size or 256
    args.matmul_size = args.matmul_size or (8192 if args.device.startswith("cuda") else 2048)
    return args


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_flops_per_s(size: int, device: str, repeats: int = 10) -> float:
    """Measured fp32 FLOP/s of a ``size``-square matmul (the machine's practical peak)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up (kernel selection, lazy init)
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    return [min(batch_size, n - s) for s in range(0, n, batch_size)]


def loop_flops(n: int, d_in: int, d_out: int, batch_size: int, epochs: int, lam: float) -> float:
    """Matmul FLOPs of the loop: train steps (fwd + bwd) and validation (fwd), both modalities."""
    rs = lam > 0
    train = val = 0.0
    for b in _batch_sizes(n, batch_size):
        heads = 2 * (2 * b * d_in * d_out) * 2  # 2 heads; forward + weight gradient
        clip = 2 * b * b * d_out * 3  # logits forward + two gradient matmuls
        reg = 2 * (2 * b * b * d_in + 3 * 2 * b * b * d_out) if rs else 0  # X Xᵀ; A Aᵀ fwd + bwd
        train += heads + clip + reg
        val += heads / 2 + clip / 3 + (2 * (2 * b * b * d_in + 2 * b * b * d_out) if rs else 0)
    return epochs * (train + val)


def run_loop(args, epochs: int) -> float:
    """Seconds for ``epochs`` epochs of train_alignment on random features."""
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(args.n, args.in_dim, generator=g).to(args.device) for _ in range(4)]
    heads = [build_head("linear", args.in_dim, args.out_dim, seed=s) for s in (0, 1)]
    loss_fn = AlignmentLoss(structure_lambda=args.lam, warmup_steps=0)
    config = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=1e-3, patience=epochs + 1,
                         device=args.device)
    _sync(args.device)
    start = time.perf_counter()
    train_alignment(*heads, loss_fn, *feats, config, impl=args.impl)
    _sync(args.device)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    peak = matmul_flops_per_s(args.matmul_size, args.device)
    run_loop(args, epochs=1)  # warm-up: allocator, kernels
    seconds = run_loop(args, args.epochs)
    flops = loop_flops(args.n, args.in_dim, args.out_dim, args.batch_size, args.epochs, args.lam)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    print(f"device: {args.device} ({name})")
    print(f"loop ({args.impl}): N={args.n} train + {args.n} val, {args.in_dim}->{args.out_dim} linear heads, "
          f"batch {args.batch_size}, {args.epochs} epochs, lambda={args.lam}")
    print(f"time: {seconds:.3f} s  ({seconds / args.epochs * 1e3:.2f} ms/epoch)")
    print(f"throughput: {args.n * args.epochs / seconds:,.0f} training samples/s")
    print(f"matmul peak ({args.matmul_size}^2 fp32): {peak / 1e12:.3f} TFLOP/s")
    print(f"loop: {flops / seconds / 1e12:.3f} TFLOP/s achieved = {flops / seconds / peak:.1%} of matmul peak")


if __name__ == "__main__":
    main()
