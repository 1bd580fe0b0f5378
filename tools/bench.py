"""Throughput of the training step: supervised vs mixup vs meta+mixup, in one run.

    python -m mgssl.tools.bench --model convlarge --device cpu --batch-size 32 --steps 10 --json

Times the real `train.step.train_step` for four rows on synthetic batches that already sit on the
device (this measures the step, not the data pipeline):

- supervised: the labeled-only baseline (CE on the labeled batch), the unit of the ratio;
- mixup: consistency + cross-domain mixup, no meta-gradient;
- meta+mixup fd / meta+mixup jvp: Algorithm 2 with either estimator of J·g (with
  `--meta-precision fp32`, both with the whole meta part in fp32, as `method.meta_precision=fp32`).

`--estimator` (default `auto`, resolved as training resolves `method.estimator`: jvp under
bf16/fp16, fd in fp32) picks the meta row that `pairs_per_s` and `ratio` report.

The variants are interleaved round by round (the order rotates) so that a noisy, shared machine
slows them alike; each reports the median over its steps and its spread ((p90 - p10) / median). A
result that cannot be true (a utilisation above 100%, a supervised step slower than a meta+mixup step)
is refused with an error instead of printed. `--width` times the width a config trains (model.width). On the GPU each step is timed with CUDA
events, on the CPU with perf_counter. After timing, the tool counts each step's FLOPs with
torch.utils.flop_counter, and measures the fidelity of ∇ỹ at the chosen precision: the cosine of
fd's and jvp's ∇ỹ to a float64 jvp reference on a small batch, the model in the meta part's mode.

With --json the last line printed is one JSON object (keys in `summary()`).
"""
import argparse
import copy
import json
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mgssl.model import build_model
from mgssl.train import backends
from mgssl.train.backends import BackendFlags
from mgssl.train.compiling import COMPILE_MODES, compiled
from mgssl.train.config import MethodConfig, OptimConfig
from mgssl.train.engine import build_optimizer, git_commit
from mgssl.train.meta import pseudo_label_grad, resolve_estimator
from mgssl.train.step import SeparateForwards, StepParts, autocast_for, train_step

# name -> (classes, channels, image side): the data sets each network is trained on in the paper.
SHAPES = {
    "convlarge": (10, 3, 32),
    "shakeshake26": (10, 3, 32),
    "resnet18": (1000, 3, 224),
    "digits_cnn": (10, 1, 8),
}

# dense peak TFLOP/s from the H100 SXM datasheet (fp32 convolutions run as TF32); the H200 computes the same
GPU_PEAK_TFLOPS = {"H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
                   "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7}}

FP32_NO_TF32_TFLOPS = 66.9  # H100 SXM datasheet, fp32 without tensor cores (--no-tf32)


@dataclass
class Variant:
    name: str
    method: MethodConfig


def variants(estimator: str, meta_precision: str = "run") -> list[Variant]:
    """The timed rows; the meta+mixup row of `estimator` (fd or jvp) comes first among the meta rows."""
    meta = [Variant(f"meta+mixup {e}", MethodConfig(meta=True, mixup=True, estimator=e, meta_precision=meta_precision))
            for e in sorted(("fd", "jvp"), key=lambda e: e != estimator)]
    return [Variant("supervised", MethodConfig(unlabeled=False, meta=False, mixup=False)),
            Variant("mixup", MethodConfig(meta=False, mixup=True))] + meta


# ---------------------------------------------------------------------------------------------
# Set-up


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mgssl bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convlarge", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=128, help="pairs per step: B labeled + B unlabeled images")
    p.add_argument("--steps", type=int, default=20, help="timed steps per variant (after warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (with --compile, compilation)")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--estimator", default="auto", choices=("auto", "fd", "jvp"),
                   help="which meta+mixup row gives pairs_per_s and ratio (both are timed; auto: as "
                        "method.estimator=auto resolves at --precision)")
    p.add_argument("--meta-precision", default="run", choices=("run", "fp32"),
                   help="as method.meta_precision: fp32 runs g and the meta passes in fp32 without TF32")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC activations (default: on for cuda, off for cpu)")
    p.add_argument("--fd-batched", action="store_true",
                   help="fd's eval-mode passes as one vmapped call (StepParts(fd_batched=True))")
    p.add_argument("--compile", nargs="?", const="default", default="off", choices=COMPILE_MODES,
                   help="torch.compile the network's train-mode forwards and the meta part's passes, as "
                        "train.compile (bare --compile: default; reduce-overhead: CUDA graphs)")
    defaults = BackendFlags()
    p.add_argument("--cudnn-benchmark", action=argparse.BooleanOptionalAction, default=defaults.cudnn_benchmark,
                   help="as train.cudnn_benchmark")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=defaults.deterministic,
                   help="as train.deterministic")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=defaults.tf32, help="as train.tf32")
    p.add_argument("--image-size", type=int, default=None, help="override the image side (e.g. 224 for resnet18)")
    p.add_argument("--width", type=float, default=None, help="channel multiplier, as model.width (convlarge): "
                   "time the width the config trains")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak for model FLOP utilisation; default: the H100 datasheet on an "
                        "H100/H200 (989.4 bf16/fp16, 494.7 TF32 for fp32), on the CPU a measured fp32 matmul rate")
    p.add_argument("--fidelity-batch", type=int, default=8, help="pairs in the float64 fidelity check")
    p.add_argument("--no-flops", action="store_true", help="skip the FLOP count")
    p.add_argument("--json", action="store_true", help="end with one line of JSON")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch; run on a GPU machine or pass --device cpu")
    if args.batch_size < 2 or args.steps < 1 or args.warmup < 0:
        p.error("--batch-size must be at least 2, --steps at least 1 and --warmup at least 0")
    if args.channels_last is None:
        args.channels_last = args.device == "cuda"
    args.estimator_setting = args.estimator
    args.estimator = resolve_estimator(args.estimator, low_precision=args.precision != "fp32")
    return args


def synthetic_batch(classes, channels, side, batch, device, channels_last, generator):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x_l = torch.randn(batch, channels, side, side, generator=generator).to(device, memory_format=fmt)
    x_u = torch.randn(batch, channels, side, side, generator=generator).to(device, memory_format=fmt)
    y_l = torch.randint(0, classes, (batch,), generator=generator).to(device)
    return x_l, y_l, x_u


# ---------------------------------------------------------------------------------------------
# Timing


class StepTimer:
    """Per-step wall time: CUDA events on the GPU (read once at the end), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.pending: list[tuple[str, object, object]] = []
        self.times: dict[str, list[float]] = {}

    def time(self, name: str, fn: Callable[[], None]) -> None:
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.pending.append((name, start, end))
        else:
            t0 = time.perf_counter()
            fn()
            self.times.setdefault(name, []).append(1e3 * (time.perf_counter() - t0))

    def results(self) -> dict[str, list[float]]:
        if self.cuda:
            torch.cuda.synchronize()
            for name, start, end in self.pending:
                self.times.setdefault(name, []).append(start.elapsed_time(end))
            self.pending = []
        return self.times


def run_rounds(steps: dict[str, Callable[[], None]], rounds: int, timer: Optional[StepTimer], label: str) -> None:
    names = list(steps)
    for r in range(rounds):
        print(f"{label} round {r + 1}/{rounds}", file=sys.stderr, flush=True)
        k = r % len(names)
        for name in names[k:] + names[:k]:  # rotate the order so no variant always follows another
            if timer is None:
                steps[name]()
            else:
                timer.time(name, steps[name])


def count_flops(step: Callable[[], None]) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def cpu_matmul_tflops(threads: int, size: int = 1024, repeats: int = 20) -> float:
    """The fp32 matmul rate this CPU reaches now: the practical ceiling for the step's convs."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 * repeats / best / 1e12


def assumed_peak(args, device: torch.device) -> tuple[Optional[float], str]:
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if device.type == "cpu":
        return cpu_matmul_tflops(torch.get_num_threads()), "measured fp32 1024x1024 matmul rate on this CPU"
    name = torch.cuda.get_device_name(device)
    for key, table in GPU_PEAK_TFLOPS.items():
        if key in name:
            if args.precision == "fp32" and not args.tf32:
                return FP32_NO_TF32_TFLOPS, f"{key} datasheet, dense fp32 without TF32"
            return table[args.precision], f"{key} datasheet, dense {args.precision}"
    return None, f"unknown for {name!r}: pass --peak-tflops"


# ---------------------------------------------------------------------------------------------
# Fidelity of ∇ỹ


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Their cosine, or NaN where either is zero: a zero ∇ỹ measures nothing (torch would say 0)."""
    a, b = a.flatten().double(), b.flatten().double()
    if not (a.any() and b.any()):
        return float("nan")
    return F.cosine_similarity(a, b, dim=0).item()


def fidelity(net: nn.Module, batch, precision: str, device: torch.device, meta_mode: str,
             meta_precision: str = "run") -> dict[str, float]:
    """Cosine of ∇ỹ at `precision` to a float64 reference (jvp, exact to rounding)."""
    x_l, y_l, x_u = batch
    model = copy.deepcopy(net).train(meta_mode == "train")
    reference_net = copy.deepcopy(model).double()
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)

    def replayed(fn):  # train mode: every estimator sees the same dropout masks
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state(rng[1], device)
        return fn()

    reference = replayed(lambda: pseudo_label_grad(reference_net, x_l.double(), y_l, x_u.double(), lr=0.1,
                                                   method="jvp"))
    out = {}
    for method in ("fd", "jvp"):
        def grad():
            with autocast_for(device, precision):
                return pseudo_label_grad(model, x_l, y_l, x_u, lr=0.1, method=method,
                                         full_precision=meta_precision == "fp32")
        out[method] = cosine(replayed(grad), reference)
    return out


# ---------------------------------------------------------------------------------------------
# Reporting


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spread(times: list[float]) -> float:
    """(90th - 10th percentile) / median of one variant's step times: how much a busy machine moved them."""
    if len(times) < 2:
        return 0.0
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return (deciles[-1] - deciles[0]) / statistics.median(times)


def impossible_figures(s: dict) -> list[str]:
    """What in a summary cannot be true: a utilisation above 100%, or a supervised step slower than a
    meta+mixup step, which does all of its work and more."""
    problems = [f"{name} at {100 * mfu:.0f}% of the assumed peak ({s['peak_tflops_source']})"
                for name, mfu in s["mfu"].items() if mfu > 1]
    sup = s["median_ms"]["supervised"]
    problems += [f"the supervised step ({sup:.1f} ms) slower than {name} ({ms:.1f} ms)"
                 for name, ms in s["median_ms"].items() if name.startswith("meta") and ms < sup]
    return problems


def summary(args, device, times, flops, peak, peak_source, memory, fid) -> dict:
    median = {name: statistics.median(ts) for name, ts in times.items()}
    sup, meta = median["supervised"], median[f"meta+mixup {args.estimator}"]
    mfu = {}
    for name, ms in median.items():
        if name in flops and peak is not None:
            mfu[name] = flops[name] / (ms / 1e3) / (peak * 1e12)
    return {
        "model": args.model, "device": args.device, "device_name": device_name(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "precision": args.precision, "estimator": args.estimator, "estimator_setting": args.estimator_setting,
        "meta_precision": args.meta_precision, "batch_size": args.batch_size,
        "steps": args.steps, "warmup": args.warmup, "compile": args.compile, "fd_batched": args.fd_batched, "channels_last": args.channels_last,
        "image_size": args.image_size, "torch": torch.__version__, "commit": git_commit(length=12),
        "median_ms": median, "spread": {name: spread(ts) for name, ts in times.items()},
        "width": args.width,
        "pairs_per_s": args.batch_size / (meta / 1e3),
        "steps_per_s": 1e3 / meta,
        "supervised_pairs_per_s": args.batch_size / (sup / 1e3),
        "mixup_pairs_per_s": args.batch_size / (median["mixup"] / 1e3),
        "ratio": meta / sup,
        "ratio_fd": median["meta+mixup fd"] / sup,
        "ratio_jvp": median["meta+mixup jvp"] / sup,
        "ratio_mixup": median["mixup"] / sup,
        "gflop_per_step": {k: v / 1e9 for k, v in flops.items()},
        "mfu": mfu, "mfu_meta": mfu.get(f"meta+mixup {args.estimator}"),
        "peak_tflops": peak, "peak_tflops_source": peak_source,
        "peak_memory_mb": memory, "peak_memory_kind": "CUDA max allocated per variant" if device.type == "cuda"
        else "process peak RSS (all variants)",
        "fidelity_cosine": fid, "fidelity_cosine_meta": fid[args.estimator],
    }


def print_table(s: dict) -> None:
    print(f"{s['model']} on {s['device_name']} ({s['device']}), {s['precision']}, batch {s['batch_size']}+"
          f"{s['batch_size']}, {s['steps']} steps per variant, compile={s['compile']}, "
          f"channels_last={s['channels_last']}, commit {s['commit']}")
    print(f"estimator {s['estimator_setting']} -> {s['estimator']} (the row pairs_per_s and ratio report), "
          f"meta part in {'fp32' if s['meta_precision'] == 'fp32' else 'the run precision'}")
    head = f"{'variant':<18}{'median ms':>11}{'spread':>8}{'pairs/s':>10}{'ratio':>7}{'GFLOP':>9}{'MFU':>8}"
    print(head)
    sup = s["median_ms"]["supervised"]
    for name, ms in s["median_ms"].items():
        gflop = s["gflop_per_step"].get(name)
        mfu = s["mfu"].get(name)
        print(f"{name:<18}{ms:>11.2f}{100 * s['spread'][name]:>7.0f}%{s['batch_size'] / ms * 1e3:>10.1f}{ms / sup:>7.2f}"
              f"{'' if gflop is None else f'{gflop:9.1f}':>9}{'' if mfu is None else f'{100 * mfu:7.1f}%':>8}")
    print(f"peak {s['peak_tflops'] and round(s['peak_tflops'], 2)} TFLOP/s ({s['peak_tflops_source']}); "
          f"peak memory {s['peak_memory_mb']} MB ({s['peak_memory_kind']})")
    print("fidelity of ∇ỹ (cosine to float64): " + ", ".join(f"{k} {v:.6f}" for k, v in s["fidelity_cosine"].items()))


# ---------------------------------------------------------------------------------------------


def run_bench(argv=None) -> dict:
    """Parse `argv`, measure, print; returns the summary."""
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    classes, channels, side = SHAPES[args.model]
    side = args.image_size or side
    args.image_size = side
    flags = backends.apply(BackendFlags(cudnn_benchmark=args.cudnn_benchmark, deterministic=args.deterministic,
                                        tf32=args.tf32))  # the switches training sets, from the same keys

    net = build_model(args.model, classes, channels, channels_last=args.channels_last,
                      width=args.width).to(device).train()
    optimizer = build_optimizer(net, OptimConfig(lr=0.01), device)  # the trainer's own SGD kernel choice
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    parts = StepParts(SeparateForwards(compiled(net, args.compile)), net, optimizer, classes, precision=args.precision,
                      scaler=scaler, fd_batched=args.fd_batched, compile_meta=args.compile)
    gen = torch.Generator().manual_seed(args.seed)
    batch = synthetic_batch(classes, channels, side, args.batch_size, device, args.channels_last, gen)

    def step_of(method: MethodConfig) -> Callable[[], None]:
        def step():
            train_step(parts, batch, method=method, lr=0.01, consistency_weight=1.0)
        return step

    rows = variants(args.estimator, args.meta_precision)
    steps = {v.name: step_of(v.method) for v in rows}

    run_rounds(steps, args.warmup, None, "warm-up")
    memory: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        for name, step in steps.items():  # one step each, alone, for its peak memory
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize()
            memory[name] = round(torch.cuda.max_memory_allocated(device) / 2 ** 20, 1)
    timer = StepTimer(device)
    run_rounds(steps, args.steps, timer, "timed")
    times = timer.results()
    if device.type == "cpu":
        memory = {"process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}

    flops = {} if args.no_flops else {name: count_flops(step) for name, step in steps.items()}
    peak, peak_source = assumed_peak(args, device)
    fid_batch = synthetic_batch(classes, channels, side, args.fidelity_batch, device, args.channels_last, gen)
    fid = fidelity(net, fid_batch, args.precision, device, rows[-1].method.meta_mode, args.meta_precision)

    s = summary(args, device, times, flops, peak, peak_source, memory, fid)
    s["backend_flags"] = flags
    problems = impossible_figures(s)
    if problems:
        raise SystemExit("error: refusing to report figures that cannot be true: " + "; ".join(problems)
                         + ". The machine was busier during some variants than others: rerun with more --steps "
                         "on a quieter machine (or give --peak-tflops)")
    print_table(s)
    if args.json:
        print(json.dumps(s))
    return s


def main(argv=None) -> int:
    run_bench(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
