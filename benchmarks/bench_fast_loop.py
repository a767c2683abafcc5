"""The fast trial path against the reference path and the official loop, in one run.

Three loops train the same two linear heads (same init) on the same random
features with the same batch order, CLIP + λ·R_S at full λ (no warm-up), a
fixed LR, validation every epoch:

* ``official``: the official trainer's per-batch work written out from
  METHOD.md §2, §3, §5.3 (plain autograd, ``F.kl_div``, ``F.cross_entropy``,
  ``clip_grad_norm_`` per head), independent of ``trials.train``. There is no
  copy of the official code in the repository; this is its reconstruction.
* ``reference``: ``train_alignment(impl="reference")``, the oracle of the tests.
* ``fast``: ``train_alignment(impl="fast")``, what trials run by default;
  ``--frozen-gram`` as ``train_alignment``'s (auto: as trials decide).

Each loop's epochs are timed one by one; the steady-state s/epoch is the median
epoch after the first (the first also pays one-time costs, ``setup``: buffers,
the cached validation half of R_S, the Gram build, which is also timed apart).
Speed-ups are per repeat, then the median. The fp32 matmul peak is measured in
the same run, and the fast path's matmul FLOPs are counted as it executes them.

Settings (the issue's): A: N=5,000 train + 5,000 val, 384→256; B: N=20,000,
768→512; both batch 4096, λ=10, L=1.

    python benchmarks/bench_fast_loop.py --setting A
    python benchmarks/bench_fast_loop.py --setting B --epochs 3 --repeats 1 --frozen-gram on
    python benchmarks/bench_fast_loop.py --smoke-test
    python benchmarks/bench_fast_loop.py --allocator both   # glibc, then under jemalloc

The allocator matters on CPU: a fresh 64 MiB tensor costs ~20 ms of page faults
under glibc. To run anything under jemalloc (Ray's wheel ships one):
``LD_PRELOAD=$(python -c "import ray,os;print(os.path.join(os.path.dirname(ray.__file__),'core/libjemalloc.so'))")``.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from trials.fast_loop import FROZEN_GRAMS, gram_pays
from trials.frozen_gram import FrozenGram
from trials.heads import build_head
from trials.losses import AlignmentLoss
from trials.train import TrainConfig, train_alignment

SETTINGS = {"A": dict(n=5000, in_dim=384, out_dim=256), "B": dict(n=20000, in_dim=768, out_dim=512)}
PATHS = ("official", "reference", "fast")
EPS = 1e-12


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="A")
    parser.add_argument("--epochs", type=int, default=4, help="timed epochs per loop and repeat (>= 2)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of official, reference, fast")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset of " + ",".join(PATHS))
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--levels", type=int, default=1)
    parser.add_argument("--frozen-gram", choices=FROZEN_GRAMS, default="auto",
                        help="the fast path's training Grams: as trials decide (auto), always (on), never (off)")
    parser.add_argument("--lam", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--allocator", choices=("current", "jemalloc", "both"), default="current",
                        help="run in this process, or re-run under jemalloc / under both allocators")
    parser.add_argument("--profile", action="store_true",
                        help="also profile 2 epochs of the fast path (torch.profiler) and print where the time goes")
    parser.add_argument("--smoke-test", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    args.__dict__.update(SETTINGS[args.setting])
    if args.smoke_test:
        args.n, args.in_dim, args.out_dim, args.batch_size, args.epochs, args.repeats = 600, 48, 32, 256, 2, 1
        args.threads = args.threads or 1  # tiny tensors: thread start-up would dominate
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2 (the first epoch is setup)")
    return args


# ------------------------------------------------------------------ the official loop (METHOD.md §2, §3, §5.3)


def _official_safe_norm(x):
    """safe_normalize of the official utils: a Python branch on 'all rows unit norm'."""
    if torch.all(((x.norm(dim=-1) - 1).abs() < 1e-6)):
        return x
    return F.normalize(x, p=2, dim=-1, eps=EPS)


def _official_structure_reg(x, a, levels, temperature):
    """structure_reg as §3 describes it, for the settings benchmarked (mean centring, cosine, 'none')."""
    x, a = _official_safe_norm(x), _official_safe_norm(a)
    x, a = x - x.mean(0, keepdim=True), a - a.mean(0, keepdim=True)
    p, q = F.softmax(x @ x.T / temperature, dim=-1), F.softmax(a @ a.T / temperature, dim=-1)
    total, p_l, q_l = 0.0, p, q
    for level in range(1, levels + 1):
        if level > 1:
            p_l, q_l = p_l @ p, q_l @ q
        m = 0.5 * (p_l + q_l)
        js = 0.5 * (F.kl_div(torch.log(q_l + EPS), m + EPS, reduction="batchmean")
                    + F.kl_div(torch.log(p_l + EPS), m + EPS, reduction="batchmean"))
        total = total + F.relu(js)
    return total / levels


def _official_loss(a_img, a_txt, x_img, x_txt, lam, levels, temperature):
    """CLIPLoss.forward (§2): normalised latents, symmetric CE, λ·mean of the two R_S."""
    a_img, a_txt = _official_safe_norm(a_img), _official_safe_norm(a_txt)
    logits = a_img @ a_txt.T / temperature
    labels = torch.arange(len(logits), device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    if lam > 0:
        loss = loss + lam * 0.5 * (_official_structure_reg(x_img, a_img, levels, temperature)
                                   + _official_structure_reg(x_txt, a_txt, levels, temperature))
    return loss


def official_loop(heads, feats, args, lr, epochs, on_epoch):
    """The official trainer's epochs (§5.3): shuffle, batches of 4096, AdamW, per-head norm clipping,
    periodic cosine, validation in order; .item() per batch as its logging does."""
    train_img, train_txt, val_img, val_txt = feats
    params = [p for h in heads for p in h.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    t_max = 50 * max(len(train_img) // args.batch_size, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / t_max)))
    gen = torch.Generator().manual_seed(0)  # the seed train_alignment uses: same batch order
    loss_args = (args.lam, args.levels, 0.05)
    for epoch in range(epochs):
        for h in heads:
            h.train()
        total = 0.0
        perm = torch.randperm(len(train_img), generator=gen)
        for start in range(0, len(perm), args.batch_size):
            idx = perm[start:start + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = _official_loss(heads[0](train_img[idx]), heads[1](train_txt[idx]), train_img[idx],
                                  train_txt[idx], *loss_args)
            loss.backward()
            for h in heads:
                torch.nn.utils.clip_grad_norm_(h.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            total += loss.item() * len(idx)
        for h in heads:
            h.eval()
        val = 0.0
        with torch.no_grad():
            for start in range(0, len(val_img), args.batch_size):
                x_i, x_t = val_img[start:start + args.batch_size], val_txt[start:start + args.batch_size]
                val += _official_loss(heads[0](x_i), heads[1](x_t), x_i, x_t, *loss_args).item() * len(x_i)
        on_epoch(epoch, {"train_loss": total / len(train_img), "val_loss": val / len(val_img)})


# ------------------------------------------------------------------ timing


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_path(path, feats, args, epochs):
    """Per-epoch (wall, CPU) seconds and per-epoch losses of one loop from a fresh, identical start.

    CPU time (this process, all threads) is reported beside wall time: on a
    shared machine it moves far less with the other processes' load.
    """
    heads = [build_head("linear", args.in_dim, args.out_dim, seed=s).to(args.device) for s in (0, 1)]
    times, history = [], []
    _sync(args.device)
    last = (time.perf_counter(), time.process_time())

    def on_epoch(epoch, row):
        nonlocal last
        _sync(args.device)
        now = (time.perf_counter(), time.process_time())
        times.append((now[0] - last[0], now[1] - last[1]))
        history.append((row["train_loss"], row["val_loss"]))
        last = now

    if path == "official":
        official_loop(heads, feats, args, 1e-3, epochs, on_epoch)
    else:
        loss_fn = AlignmentLoss(structure_lambda=args.lam, warmup_steps=0, structure_levels=args.levels)
        config = TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=1e-3, patience=epochs + 1,
                             device=args.device)
        train_alignment(*heads, loss_fn, *feats, config, on_epoch=on_epoch, impl=path,
                        frozen_gram=args.frozen_gram if path == "fast" else "off")
    return times, history


def matmul_peak(device, size, repeats=3) -> float:
    """Best fp32 FLOP/s of a square product: the machine's practical matmul peak."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    torch.mm(a, b, out=out)
    best = math.inf
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def fast_matmul_flops(args, gram: bool) -> float:
    """Matmul FLOPs of one epoch of the fast path as it runs (steady state: validation's frozen half
    cached; with ``gram``, the training batches' frozen similarity gathered, not multiplied)."""
    d_in, d, extra_levels = args.in_dim, args.out_dim, args.levels - 1
    total = 0.0
    for b in _batch_sizes(args.n, args.batch_size):  # training steps
        heads = 2 * 2 * (2 * b * d_in * d)  # forward + weight gradient, two heads
        clip = 3 * 2 * b * b * d  # logits, two gradients
        frozen = (0 if gram else 2 * b * b * d_in) + extra_levels * 2 * b**3
        aligned = 2 * (2 * b * b * d) + extra_levels * 3 * 2 * b**3  # x xᵀ, (G+Gᵀ)x, powers fwd+bwd
        total += heads + clip + 2 * (frozen + aligned)
    for b in _batch_sizes(args.n, args.batch_size):  # validation, same size as training here
        total += 2 * (2 * b * d_in * d) + 2 * b * b * d + 2 * (2 * b * b * d + extra_levels * 2 * b**3)
    return total


def _batch_sizes(n, bs):
    return [min(bs, n - s) for s in range(0, n, bs)]


def allocator() -> str:
    """Which malloc serves this process: jemalloc if it is mapped (LD_PRELOAD or linked), else glibc."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    if "jemalloc" in maps or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return "jemalloc"
    return "tcmalloc" if "tcmalloc" in maps else "glibc"


def find_jemalloc() -> str | None:
    """Ray's bundled libjemalloc.so (found without importing ray), or the system's."""
    spec = importlib.util.find_spec("ray")
    candidates = [Path(p) / "core" / "libjemalloc.so" for p in (spec.submodule_search_locations or [])] if spec else []
    candidates += [Path("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")]
    return next((str(p) for p in candidates if p.exists()), None)


# ------------------------------------------------------------------ main


def _max_rel_diff(histories_a, histories_b) -> float:
    pairs = [(x, y) for ha, hb in zip(histories_a, histories_b) for ra, rb in zip(ha, hb) for x, y in zip(ra, rb)]
    return max((abs(x - y) / abs(y) for x, y in pairs), default=float("nan"))


def measure(args) -> dict:
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(args.n, args.in_dim, generator=g).to(args.device) for _ in range(4)]
    peak_size = 256 if args.smoke_test else (8192 if args.device.startswith("cuda") else 4096)
    peaks = [matmul_peak(args.device, peak_size)]
    epoch_s, cpu_s, setup_s, histories = ({p: [] for p in args.paths} for _ in range(4))
    load = [os.getloadavg()[0]]
    for _ in range(args.repeats):
        for path in args.paths:  # interleaved: the machine's load hits every path alike
            times, history = run_path(path, feats, args, args.epochs)
            steady = statistics.median(wall for wall, _ in times[1:])
            epoch_s[path].append(steady)
            cpu_s[path].append(statistics.median(cpu for _, cpu in times[1:]))
            setup_s[path].append(times[0][0] - steady)
            histories[path].append(history)
        peaks.append(matmul_peak(args.device, peak_size))
        load.append(os.getloadavg()[0])
    if args.profile:
        profile_fast(args, feats)
    return dict(epoch_s=epoch_s, cpu_s=cpu_s, setup_s=setup_s, histories=histories, peak=max(peaks),
                load=load, gram_s=gram_build_seconds(args, feats) if "fast" in args.paths else None)


def gram_build_seconds(args, feats) -> Optional[float]:
    """The fast path's one-time Gram build (in its ``setup``), timed apart; None if it builds none."""
    if args.frozen_gram == "off" or (args.frozen_gram == "auto" and not gram_pays(
            TrainConfig(epochs=args.epochs, batch_size=args.batch_size), args.n)):
        return None
    _sync(args.device)
    start = time.perf_counter()
    [FrozenGram(x, "mean") for x in feats[:2]]
    _sync(args.device)
    return time.perf_counter() - start


def report(args, m) -> str:
    med = {p: statistics.median(v) for p, v in m["epoch_s"].items()}
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()}"
    print(f"device: {args.device} ({name}), allocator: {allocator()}, torch {torch.__version__}")
    print(f"setting {args.setting}: N={args.n} train + {args.n} val, {args.in_dim}->{args.out_dim}, batch "
          f"{args.batch_size}, lambda={args.lam}, L={args.levels}; {args.epochs} epochs x {args.repeats} repeats; "
          f"frozen_gram={args.frozen_gram}")
    print(f"  1-min load average of the machine: {', '.join(f'{x:.1f}' for x in m['load'])} "
          f"(at start and after each repeat; {os.cpu_count()} CPUs)")
    gram = m["gram_s"]
    for p in args.paths:
        runs = ", ".join(f"{s:.2f}" for s in m["epoch_s"][p])
        built = f" (of which the Gram build {gram:.2f} s)" if p == "fast" and gram is not None else ""
        print(f"  {p:9s} {med[p]:7.3f} s/epoch (runs: {runs}); CPU {statistics.median(m['cpu_s'][p]):.2f} s/epoch; "
              f"setup {statistics.median(m['setup_s'][p]):+.2f} s{built}")
    summary = [f"setting={args.setting}", f"allocator={allocator()}", f"threads={torch.get_num_threads()}"]
    summary += [f"{p}={med[p]:.3f}s/epoch" for p in args.paths]
    summary += [f"fast_gram_build={gram:.2f}s"] if gram is not None else []
    if "fast" in args.paths:
        for base in ("official", "reference"):
            if base in args.paths:
                ratios = [b / f for b, f in zip(m["epoch_s"][base], m["epoch_s"]["fast"])]
                cpu = statistics.median(b / f for b, f in zip(m["cpu_s"][base], m["cpu_s"]["fast"]))
                print(f"  speed-up fast vs {base}: {statistics.median(ratios):.2f}x wall "
                      f"(per repeat: {', '.join(f'{r:.2f}' for r in ratios)}); {cpu:.2f}x in CPU time")
                summary.append(f"speedup_vs_{base}={statistics.median(ratios):.2f}x")
                summary.append(f"cpu_speedup_vs_{base}={cpu:.2f}x")
        rate = fast_matmul_flops(args, gram is not None) / med["fast"]
        print(f"  matmul peak ({args.device}, fp32 square): {m['peak'] / 1e12:.3f} TFLOP/s; fast path's matmuls: "
              f"{rate / 1e12:.3f} TFLOP/s over the whole epoch = {rate / m['peak']:.0%} of peak")
        summary.append(f"fast_matmul_peak_fraction={rate / m['peak']:.2f}")
        if "reference" in args.paths:
            diff = _max_rel_diff(m["histories"]["fast"], m["histories"]["reference"])
            print(f"  max relative difference of per-epoch losses, fast vs reference: {diff:.1e}")
            summary.append(f"max_rel_diff={diff:.1e}")
    if "official" in args.paths and "reference" in args.paths:
        diff = _max_rel_diff(m["histories"]["official"], m["histories"]["reference"])
        print(f"  max relative difference of per-epoch losses, official vs reference: {diff:.1e}")
    line = "SUMMARY " + " ".join(summary)
    print(line)
    return line


def rerun_under_allocators(args, argv) -> None:
    """Run this benchmark again in child processes: under glibc and/or under jemalloc."""
    library = find_jemalloc()
    wanted = ["glibc", "jemalloc"] if args.allocator == "both" else ["jemalloc"]
    if library is None and "jemalloc" in wanted:
        print("jemalloc not found (pip install ray, or apt-get install libjemalloc2)", file=sys.stderr)
        wanted.remove("jemalloc")
    child_argv = _without_option(argv, "--allocator")
    lines = []
    for name in wanted:
        env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        if name == "jemalloc":
            env["LD_PRELOAD"] = library
        out = subprocess.run([sys.executable, __file__, *child_argv], env=env, check=True,
                             capture_output=True, text=True).stdout
        print(out, end="")
        lines += [ln for ln in out.splitlines() if ln.startswith("SUMMARY")]
    print("\n".join(lines))


def profile_fast(args, feats) -> None:
    """Op table of 2 epochs of the fast path, and the share of its time spent in matmuls."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_path("fast", feats, args, 2)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    matmul = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm"))
    print(events.table(sort_by="self_cpu_time_total", row_limit=20))
    print(f"profile: matmuls take {matmul / total:.0%} of the fast path's op time "
          f"({matmul / 1e6:.2f} of {total / 1e6:.2f} s over 2 epochs, the first with setup)")


def _without_option(argv, option):
    """argv less ``option VALUE`` / ``option=VALUE``."""
    drop = {i + 1 for i, arg in enumerate(argv) if arg == option}
    return [a for i, a in enumerate(argv) if a != option and i not in drop and not a.startswith(option + "=")]


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.allocator != "current":
        rerun_under_allocators(args, argv)
        return
    report(args, measure(args))


if __name__ == "__main__":
    main()
