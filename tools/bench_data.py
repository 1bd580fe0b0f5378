"""Images per second of each data pipeline, alone and while a network trains on its batches.

    python -m mgssl.tools.bench_data                       # CPU, synthetic data of the real shapes
    python -m mgssl.tools.bench_data --device cuda --cifar-root /data/cifar10 --imagenet-root /data/imagenet
    python -m mgssl.tools.bench_data --pipelines dali --imagenet-root /data/folders --boundaries 3

With --boundaries N, the DALI streams run (alone) until the unlabeled stream has crossed N epoch
boundaries (the labeled stream crosses many more), and the tool reports the steady images/s and the
longest gap between two batches against the median gap; the goal is no gap over 3x the median.

A step is one paired batch (x_l, y_l, x_u): 2 x batch images. "alone" only draws batches (and waits
for them to be ready on the device); "with model" also runs a forward and backward pass of the
network on both halves each step, so the number shows whether the pipeline keeps up while the
device is busy. Without a data root, the in-memory pipeline gets random 32x32 images and the DALI
pipeline a temporary folder of synthetic JPEGs at typical ImageNet size (500x375)."""
import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def synthetic_arrays(n: int, seed: int = 0):
    from mgssl.pipelines.sources import ArrayDataset

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    return ArrayDataset("cifar10", images, labels, images[:1000], labels[:1000], 10, flip=True, pad=4)


def synthetic_jpeg_folders(root: Path, images: int, classes: int, size: tuple[int, int], seed: int = 0) -> Path:
    """Smooth random photos (upsampled noise, like natural images in spectrum more than white noise)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", images), ("val", max(classes, images // 10))):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            small = rng.integers(0, 256, size=(size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
            photo = Image.fromarray(small).resize(size, Image.BICUBIC)
            photo.save(folder / f"img_{i:06d}.JPEG", quality=90)
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(batches, steps: int, warmup: int, device: torch.device, net=None, optimizer=None) -> dict:
    """Median seconds per step over `steps` single-step timings after `warmup` steps."""
    times, images = [], 0
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        x_l, y_l, x_u = next(batches)
        if net is not None:
            logits = net(torch.cat([x_l, x_u]))  # (2B, classes)
            loss = F.cross_entropy(logits[:len(y_l)], y_l) + logits[len(y_l):].logsumexp(1).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        else:
            float(x_l[0, 0, 0, 0] + x_u[0, 0, 0, 0])  # make sure the batch exists, not just its promise
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            images = len(x_l) + len(x_u)
    per_step = statistics.median(times)
    return {"images_per_s": images / per_step, "steps_per_s": 1.0 / per_step, "ms_per_step": 1e3 * per_step,
            "images_per_step": images, "steps": steps}


def measure_gaps(data, boundaries: int, warmup: int, step_ms: float = 0.0) -> dict:
    """Per-batch gaps of the training batches until the unlabeled stream has crossed `boundaries` epoch
    boundaries: the steady rate, the median and the longest gap, and where it fell. With `step_ms`, a
    training step of that length (a sleep, as on a GPU the step leaves the CPU to the decoder) follows
    each batch, so a gap is the step plus any wait for data."""
    from mgssl.train.engine import setup_out_of_collector

    with setup_out_of_collector():  # as the training loop runs
        return _measure_gaps(data, boundaries, warmup, step_ms)


def _measure_gaps(data, boundaries: int, warmup: int, step_ms: float) -> dict:
    train = data.train
    batch = None
    start = time.perf_counter()
    for _ in range(warmup):  # the first batch holds the pipelines' start
        batch = next(train)
    first = time.perf_counter() - start
    per_step = 2 * len(batch[0])
    steps = math.ceil((math.floor(train.unlabeled_epoch) + boundaries) * data.unlabeled_size
                      / (data.world_size * len(batch[0]))) - warmup + 1
    gaps, crossings = [], []
    last = time.perf_counter()
    for i in range(steps):
        before = (math.floor(train.labeled.epoch), math.floor(train.unlabeled.epoch))
        x_l, _, x_u = next(train)
        float(x_l[0, 0, 0, 0] + x_u[0, 0, 0, 0])  # the batch exists, not just its promise
        if step_ms:
            time.sleep(step_ms / 1e3)
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        after = (math.floor(train.labeled.epoch), math.floor(train.unlabeled.epoch))
        if after != before:
            crossings.append(i)
    median, longest = statistics.median(gaps), max(gaps)
    worst = gaps.index(longest)
    builds = getattr(train.labeled, "builds", None), getattr(train.unlabeled, "builds", None)
    # A stall from a boundary shows in the batch that crosses it or the next two (the pipelines' queue).
    at_boundary = max(gaps[j] for c in crossings for j in range(c, min(c + 3, len(gaps))))
    return {"images_per_s": per_step * len(gaps) / sum(gaps), "median_gap_ms": 1e3 * median,
            "max_gap_ms": 1e3 * longest, "max_over_median": longest / median, "worst_step": worst,
            "worst_at_boundary": any(abs(worst - c) <= 2 for c in crossings), "steps": len(gaps),
            "max_boundary_gap_ms": 1e3 * at_boundary, "boundary_over_median": at_boundary / median,
            "first_batches_s": first, "warmup": warmup, "labeled_epochs": train.labeled.epoch,
            "unlabeled_epochs": train.unlabeled.epoch, "boundaries_crossed": len(crossings),
            "pipeline_builds": builds, "images_per_step": per_step,
            "p99_gap_ms": 1e3 * sorted(gaps)[int(0.99 * (len(gaps) - 1))], "step_ms": step_ms}


def build_memory(args, device):
    from mgssl.pipelines import DataConfig, build_data
    from mgssl.pipelines.memory import InMemoryData
    from mgssl.pipelines.splits import balanced_split

    if args.cifar_root:
        cfg = DataConfig(name="cifar10", root=args.cifar_root, labels=4000, batch_size=2 * args.batch_memory)
        return build_data(cfg, seed=0, device=device), f"cifar10 at {args.cifar_root}"
    arrays = synthetic_arrays(args.memory_images)
    split = balanced_split(arrays.train_labels, 10, 0.08, 0, "cifar10")
    data = InMemoryData(arrays, split, include_labeled=False, global_batch=args.batch_memory, eval_batch=500,
                        seed=0, device=device)
    return data, f"synthetic {args.memory_images} x 32x32x3 uint8"


def build_dali(args, device, workdir: Path):
    from mgssl.pipelines import DataConfig, build_data

    root = args.imagenet_root
    what = f"class folders at {root}"
    if not root:
        w, h = args.jpeg_size
        root = str(synthetic_jpeg_folders(workdir / "imagenet", args.jpeg_images, 10, (w, h)))
        what = f"synthetic {args.jpeg_images} JPEGs of {w}x{h} (quality 90)"
    cfg = DataConfig(name="imagenet", root=root, labels=args.labels, batch_size=args.batch_dali, augment=args.augment,
                     image_size=args.image_size, resize_size=args.resize_size, workers=args.workers)
    return build_data(cfg, seed=0, device=device), what + f", augment={args.augment}, {args.workers} threads"


def model_for(name: str, data, device):
    from mgssl.model import build_model

    net = build_model(name, data.num_classes, data.in_channels, channels_last=True).to(device)
    return net, torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mgssl bench-data", description=__doc__.split("\n\n")[0])
    p.add_argument("--pipelines", nargs="+", default=["memory", "dali"], choices=["memory", "dali"])
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-memory", type=int, default=128, help="labeled batch of the in-memory pipeline")
    p.add_argument("--batch-dali", type=int, default=32, help="labeled batch of the DALI pipeline (per GPU)")
    p.add_argument("--cifar-root", help="real CIFAR-10 python pickles instead of synthetic arrays")
    p.add_argument("--memory-images", type=int, default=50000)
    p.add_argument("--imagenet-root", help="real train/<class>/*.JPEG folders instead of synthetic JPEGs")
    p.add_argument("--jpeg-images", type=int, default=400)
    p.add_argument("--jpeg-size", type=int, nargs=2, default=[500, 375], metavar=("W", "H"))
    p.add_argument("--augment", default="authors", choices=["paper", "authors"])
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--resize-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="DALI CPU threads")
    p.add_argument("--labels", type=float, default=0.1, help="labeled fraction of each class (DALI)")
    p.add_argument("--boundaries", type=int, help="DALI: draw batches across this many unlabeled epoch "
                                                  "boundaries and report the gaps between batches")
    p.add_argument("--step-ms", type=float, default=0.0, help="with --boundaries: a simulated training step (a "
                                                               "sleep) after each batch; 0: batches drawn alone")
    p.add_argument("--model-memory", default="convlarge", help="network consuming in-memory batches ('' = none)")
    p.add_argument("--model-dali", default="resnet18", help="network consuming DALI batches ('' = none)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if "dali" in args.pipelines:
        from mgssl.pipelines.dali import DaliUnavailableError, require_dali

        try:
            require_dali(gpu=device.type == "cuda")
        except DaliUnavailableError as e:
            print(f"error: {e} (or leave it out: --pipelines memory)", file=sys.stderr)
            return 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.pipelines:
            data, what = build_memory(args, device) if name == "memory" else build_dali(args, device, Path(tmp))
            if args.boundaries and name == "dali":
                r = measure_gaps(data, args.boundaries, args.warmup, args.step_ms)
                r.update(pipeline=name, mode="gaps", data=what, device=str(device), batch=r["images_per_step"] // 2)
                results.append(r)
                print(f"{name:7s} {'alone' if not args.step_ms else f'with {args.step_ms:g} ms steps'}, gaps over {r['boundaries_crossed']} epoch boundaries ({r['labeled_epochs']:.1f} "
                      f"labeled, {r['unlabeled_epochs']:.2f} unlabeled epochs, {r['steps']} steps): "
                      f"{r['images_per_s']:.1f} images/s, median gap {r['median_gap_ms']:.1f} ms, p99 "
                      f"{r['p99_gap_ms']:.1f} ms, longest {r['max_gap_ms']:.1f} ms = {r['max_over_median']:.2f}x "
                      f"median (step {r['worst_step']}{', at a boundary' if r['worst_at_boundary'] else ''}), "
                      f"longest at a boundary {r['max_boundary_gap_ms']:.1f} ms = {r['boundary_over_median']:.2f}x; "
                      f"goal <= 3x: {'met' if r['max_over_median'] <= 3 else 'MISSED'}; "
                      f"pipeline builds {r['pipeline_builds']}; {what}", flush=True)
                continue
            model = args.model_memory if name == "memory" else args.model_dali
            runs = [("alone", None)] + ([(f"with {model}", model)] if model else [])
            for mode, model_name in runs:
                net, opt = model_for(model_name, data, device) if model_name else (None, None)
                r = measure(data.train, args.steps, args.warmup, device, net, opt)
                r.update(pipeline=name, mode=mode, data=what, device=str(device),
                         batch=r["images_per_step"] // 2)
                results.append(r)
                print(f"{name:7s} {mode:22s} {r['images_per_s']:9.1f} images/s  {r['steps_per_s']:7.2f} steps/s  "
                      f"({r['images_per_step']} images/step; {what})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
