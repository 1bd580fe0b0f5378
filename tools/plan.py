"""A time model of a whole run: what it does, counted from its config, and how long that takes at given rates.

    python -m mgssl.tools.plan resnet18_imagenet_10pct --gpus 8 --device h100
    python -m mgssl.tools.plan resnet18_imagenet_10pct --gpus 8 --bench bench.json --bench-data data.json \\
        --allreduce-gbps 310 --allreduce-source "nccl-tests on our node"

Counts (from the config and the data set's size): steps, pairs, JPEG decodes (training and evaluation),
FLOPs per pair (counted with torch's FLOP counter on the real training step of the config's network, at
its image size, on the CPU) and the bytes all-reduced per step. Rates: the step time (`tools.bench
--json`, scaled to the per-GPU batch), the decode rate (`tools.bench_data --json`), the all-reduce bus
bandwidth; each is either "measured" (the file it came from) or "published" (its source), and the
table says which. Per step the GPU computes and all-reduces while the data path decodes the next
batch, so a step takes max(compute + all-reduce, decode); the longer side is the bottleneck.
"""
import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

# (classes, channels, side, training images, test images) of each data set as published.
PUBLISHED_SIZES = {"digits": (10, 1, 8, 1262, 535), "svhn": (10, 3, 32, 73257, 26032),
                   "cifar10": (10, 3, 32, 50000, 10000), "cifar100": (100, 3, 32, 50000, 10000),
                   "imagenet": (1000, 3, 224, 1281167, 50000)}


@dataclass(frozen=True)
class Rate:
    value: float
    unit: str
    kind: str  # "measured" | "published"
    source: str

    def label(self) -> str:
        return f"{self.value:,.4g} {self.unit} [{self.kind}: {self.source}]"


# Published figures for an H100 SXM node, each with where it comes from.
H100 = {
    "peak_tflops": Rate(989.4, "TFLOP/s", "published", "H100 SXM datasheet, dense bf16 tensor cores"),
    # NVIDIA's ResNet-50 v1.5 reference (AMP, batch 256) on one A100; its utilisation is carried to H100
    "reference_images_per_s": Rate(2470, "images/s", "published",
                                   "NVIDIA DeepLearningExamples ResNet-50 v1.5, one A100, AMP"),
    "reference_peak_tflops": Rate(312.0, "TFLOP/s", "published", "A100 datasheet, dense bf16 tensor cores"),
    "decode_images_per_s": Rate(7000, "images/s per GPU", "published",
                                "A100 hardware JPEG decoder + CUDA decode (NVIDIA nvJPEG A100 figures), "
                                "taken unchanged for H100"),
    "fp32_slowdown": Rate(989.4 / 66.9, "x", "published", "H100 SXM datasheet: dense bf16 989.4 vs fp32 "
                          "without tensor cores 66.9 TFLOP/s, applied to the whole step (an upper bound)"),
    "allreduce_busbw": Rate(370, "GB/s", "published",
                            "8 H100 over NVLink, NCCL ring bus bandwidth (NCCL maintainer, NVIDIA/nccl-tests#212)"),
}


@dataclass
class RunCounts:
    world_size: int
    global_batch: int
    labeled_size: int
    unlabeled_size: int
    test_size: int
    sizes_from: str
    steps: int
    pairs: int
    train_decodes: int
    evaluations: int
    eval_decodes: int
    parameters: int
    forward_gflop_per_image: float
    step_gflop_per_pair: float
    allreduce_bytes_per_step: int
    labeled_cache: bool = False  # data.labeled_cache: each process decodes the labeled set once, not every step
    fp32_meta_steps: int = 0  # method.fp32_meta_steps: first steps with the meta part in fp32

    @property
    def decodes_per_step_per_gpu(self) -> float:
        return (1 if self.labeled_cache else 2) * self.global_batch / self.world_size

    @property
    def start_decodes_per_gpu(self) -> int:
        return self.labeled_size if self.labeled_cache else 0

    @property
    def decodes(self) -> int:
        return self.train_decodes + self.eval_decodes

    @property
    def total_flop(self) -> float:
        return self.pairs * self.step_gflop_per_pair * 1e9 + self.eval_decodes * self.forward_gflop_per_image * 1e9


def data_sizes(cfg) -> tuple[int, int, int, str]:
    """(labeled, unlabeled, test) images of the run's data set: listed from data.root when it holds an
    image-folder tree, else from the published size (labels as a fraction of the whole set)."""
    from mgssl.pipelines.splits import per_class_counts

    name, root = cfg.data.name, cfg.data.root
    if name == "imagenet" and root and (Path(root) / "train").is_dir():
        from mgssl.pipelines.folders import load_image_folders

        folders = load_image_folders(root, name)
        labeled = int(per_class_counts(folders.train_labels, folders.num_classes, cfg.data.labels).sum())
        train, test, where = len(folders.train_files), len(folders.test_files), f"listed from {root}"
    else:
        classes, _, _, train, test = PUBLISHED_SIZES[name]
        labels = cfg.data.labels
        labeled = round(labels * train) if isinstance(labels, float) else int(labels)
        where = f"published size of {name} ({train:,} training, {test:,} test images)"
    unlabeled = train - labeled if cfg.data.unlabeled == "disjoint" else train
    return labeled, unlabeled, test, where


def evaluations(total_steps: int, eval_every: int) -> int:
    """Evaluations of a run: every eval_every steps, and one at the end if the last step is not one."""
    return total_steps // eval_every + (1 if total_steps % eval_every else 0)


def network_flops(cfg, num_classes: int, channels: int, side: int, batch: int = 2) -> tuple[int, float, float]:
    """(parameters, forward GFLOP per image, training-step GFLOP per pair) of the config's network and
    method, counted by torch's FLOP counter on CPU tensors of the run's image size."""
    from mgssl.train.engine import build_optimizer
    from mgssl.train.meta import resolve_estimator
    from mgssl.train.step import StepParts, train_step

    torch.manual_seed(0)
    net = cfg.model.build(num_classes, channels).train()
    parameters = sum(p.numel() for p in net.parameters())
    x = torch.randn(batch, channels, side, side)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net.eval()(x[:1])
    forward = counter.get_total_flops() / 1e9
    net.train()
    method = cfg.method
    if method.meta:  # count the estimator the run resolves to at its precision
        from dataclasses import replace

        method = replace(method, estimator=resolve_estimator(method.estimator,
                                                             low_precision=cfg.train.precision != "fp32"))
    optimizer = build_optimizer(net, cfg.optim, torch.device("cpu"))
    batch_ = (x, torch.randint(0, num_classes, (batch,)), torch.randn(batch, channels, side, side))
    with FlopCounterMode(display=False) as counter:
        train_step(StepParts.of(net, optimizer, num_classes), batch_, method=method, lr=0.01, consistency_weight=1.0)
    return parameters, forward, counter.get_total_flops() / 1e9 / batch


def count_run(cfg, world_size: int, flops_batch: int = 2) -> RunCounts:
    from mgssl.train.schedule import plan

    classes, channels, side, _, _ = PUBLISHED_SIZES[cfg.data.name]
    if cfg.data.name == "imagenet":
        side = cfg.data.image_size
    labeled, unlabeled, test, where = data_sizes(cfg)
    steps = plan(cfg, unlabeled).total_steps
    pairs = steps * cfg.data.batch_size
    evals = evaluations(steps, cfg.train.eval_every)
    parameters, forward, per_pair = network_flops(cfg, classes, channels, side, flops_batch)
    # Per step: DDP's gradient all-reduce (fp32), and g's before the meta pass (fp32 or bf16).
    g_bytes = 2 if cfg.method.grad_reduce_dtype == "bf16" else 4
    reduced = parameters * (4 + g_bytes * int(cfg.method.meta and cfg.method.allreduce_grad)) if world_size > 1 else 0
    cache = cfg.data.labeled_cache
    train_decodes = pairs + labeled * world_size if cache else 2 * pairs
    return RunCounts(world_size, cfg.data.batch_size, labeled, unlabeled, test, where, steps, pairs, train_decodes,
                     evals, evals * test, parameters, forward, per_pair, reduced, cache,
                     min(steps, cfg.method.fp32_meta_steps) if cfg.method.meta and cfg.train.precision != "fp32" else 0)


# ---------------------------------------------------------------------------------------------
# Rates


def step_rate_from_bench(path: Path, estimator: str) -> tuple[float, int, Rate]:
    """(ms per step, pairs per step, the rate) from `tools.bench --json` output (its last JSON line)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip().startswith("{")]
    if not lines:
        raise ValueError(f"{path} holds no JSON line; write it with python -m mgssl.tools.bench --json > FILE")
    s = json.loads(lines[-1])
    row = f"meta+mixup {estimator}"
    if row not in s["median_ms"]:
        raise ValueError(f"{path} has no {row!r} row; rerun tools.bench")
    ms = s["median_ms"][row]
    what = (f"tools.bench in {path}: {row}, {s['model']} on {s['device_name']}, {s['precision']}, batch "
            f"{s['batch_size']}, compile={s['compile']}, commit {s['commit']}")
    return ms, s["batch_size"], Rate(s["batch_size"] / ms * 1e3, "pairs/s per GPU", "measured", what)


def decode_rate_from_bench(path: Path) -> Rate:
    rows = [r for r in json.loads(Path(path).read_text()) if r.get("pipeline") == "dali"]
    if not rows:
        raise ValueError(f"{path} has no DALI row; write it with python -m mgssl.tools.bench_data --json FILE")
    best = next((r for r in rows if r["mode"] == "gaps"), rows[0])
    return Rate(best["images_per_s"], "images/s per GPU", "measured",
                f"tools.bench_data in {path}: {best['mode']}, {best['data']} on {best['device']}")


@dataclass
class Prediction:
    compute_ms: float
    allreduce_ms: float
    decode_ms: float
    step_ms: float
    train_s: float
    eval_s: float
    wall_s: float
    bottleneck: str
    shares: dict


def predict(counts: RunCounts, step_pairs_per_s: float, decode_per_s: float, busbw_gbps: float,
            eval_forward_per_s: float, fp32_slowdown: float = 1.0) -> Prediction:
    n = counts.world_size
    local = counts.global_batch / n
    compute = local / step_pairs_per_s
    ring = 2 * (n - 1) / n  # bytes each GPU sends per byte reduced, ring all-reduce
    allreduce = counts.allreduce_bytes_per_step * ring / (busbw_gbps * 1e9)
    decode = counts.decodes_per_step_per_gpu / decode_per_s
    step = max(compute + allreduce, decode)
    eval_images = counts.eval_decodes / n
    eval_s = max(eval_images / decode_per_s, eval_images / eval_forward_per_s)
    window = counts.fp32_meta_steps * (max(compute * fp32_slowdown + allreduce, decode) - step)
    train = counts.steps * step + window + counts.start_decodes_per_gpu / decode_per_s  # the cache fills first
    wall = train + eval_s
    parts = {"compute": counts.steps * compute + window, "all-reduce": counts.steps * allreduce,
             "decode": counts.steps * decode + counts.start_decodes_per_gpu / decode_per_s, "evaluation": eval_s}
    bottleneck = "decode" if decode > compute + allreduce else "compute"
    return Prediction(1e3 * compute, 1e3 * allreduce, 1e3 * decode, 1e3 * step, train, eval_s, wall, bottleneck,
                      {k: v / wall for k, v in parts.items()})


def hours(seconds: float) -> str:
    return f"{seconds / 3600:,.2f} h"


def reference_gflop_per_image() -> float:
    """Training FLOPs per image of torchvision's ResNet-50 at 224 px: 3 forward-equivalents, counted here."""
    import torchvision

    net = torchvision.models.resnet50().eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.randn(1, 3, 224, 224))
    return 3 * counter.get_total_flops() / 1e9


def run_plan(argv=None) -> dict:
    """The counts, rates and prediction of `mgssl plan ARGV`, printed and returned."""
    p = argparse.ArgumentParser(prog="mgssl plan", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="a YAML file or the name of one in configs/")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE")
    p.add_argument("--gpus", type=int, required=True, help="GPUs (processes) the run uses")
    p.add_argument("--device", choices=("h100",), help="use the published figures of this GPU for what is "
                                                        "not measured")
    p.add_argument("--bench", type=Path, help="tools.bench --json output measured on the target GPU")
    p.add_argument("--bench-data", type=Path, help="tools.bench_data --json output measured on the target node")
    p.add_argument("--allreduce-gbps", type=float, help="all-reduce bus bandwidth measured on the target node")
    p.add_argument("--allreduce-source", default="given on the command line", help="where --allreduce-gbps comes from")
    p.add_argument("--flops-batch", type=int, default=2, help="pairs in the FLOP count of one step")
    p.add_argument("--json", type=Path, help="also write the counts, rates and prediction here")
    args = p.parse_args(argv)

    from mgssl.train.config import load_config
    from mgssl.train.meta import resolve_estimator

    cfg = load_config(args.config, tuple(args.overrides))
    if cfg.data.batch_size % args.gpus:
        p.error(f"data.batch_size={cfg.data.batch_size} is global and must be divisible by --gpus {args.gpus}")
    if not args.device and not (args.bench and args.bench_data and (args.allreduce_gbps or args.gpus == 1)):
        p.error("give --device h100 (published figures) or measured --bench, --bench-data and --allreduce-gbps")
    counts = count_run(cfg, args.gpus, args.flops_batch)
    published = H100 if args.device == "h100" else {}

    if args.bench:
        estimator = resolve_estimator(cfg.method.estimator, low_precision=cfg.train.precision != "fp32")
        _, _, step_rate = step_rate_from_bench(args.bench, estimator)
        eval_rate = Rate(step_rate.value * counts.step_gflop_per_pair / counts.forward_gflop_per_image,
                         "images/s per GPU", "measured", "the step rate at the forward's FLOPs")
    else:
        ref = reference_gflop_per_image()
        utilisation = (published["reference_images_per_s"].value * ref * 1e9
                       / (published["reference_peak_tflops"].value * 1e12))
        sustained = utilisation * published["peak_tflops"].value
        how = (f"{published['peak_tflops'].source} x {100 * utilisation:.1f}% utilisation "
               f"({published['reference_images_per_s'].value:,.0f} images/s x {ref:.2f} GFLOP / "
               f"{published['reference_peak_tflops'].value} TFLOP/s: {published['reference_images_per_s'].source})")
        step_rate = Rate(sustained * 1e3 / counts.step_gflop_per_pair, "pairs/s per GPU", "published", how)
        eval_rate = Rate(sustained * 1e3 / counts.forward_gflop_per_image, "images/s per GPU", "published",
                         "the same utilisation at the forward's FLOPs")
    decode_rate = decode_rate_from_bench(args.bench_data) if args.bench_data else published["decode_images_per_s"]
    if args.allreduce_gbps:
        busbw = Rate(args.allreduce_gbps, "GB/s", "measured", args.allreduce_source)
    else:
        busbw = published.get("allreduce_busbw", Rate(float("inf"), "GB/s", "published", "one GPU: none"))
    slowdown = H100["fp32_slowdown"]  # no measured ratio is read: the datasheet's, labelled below
    pred = predict(counts, step_rate.value, decode_rate.value, busbw.value, eval_rate.value, slowdown.value)

    c = counts
    print(f"{args.config} on {args.gpus} GPU(s): global batch {c.global_batch} + {c.global_batch}, "
          f"{c.global_batch // args.gpus} + {c.global_batch // args.gpus} per GPU")
    print(f"data: {c.labeled_size:,} labeled, {c.unlabeled_size:,} unlabeled, {c.test_size:,} test images "
          f"({c.sizes_from})")
    print(f"counted: {c.steps:,} steps, {c.pairs:,} pairs, {c.decodes:,} JPEG decodes ({c.train_decodes:,} training "
          f"+ {c.eval_decodes:,} in {c.evaluations} evaluations; labeled cache {'on' if c.labeled_cache else 'off'})")
    print(f"network: {c.parameters:,} parameters, forward {c.forward_gflop_per_image:.3f} GFLOP per image, "
          f"training step {c.step_gflop_per_pair:.2f} GFLOP per pair "
          f"({c.step_gflop_per_pair / c.forward_gflop_per_image:.1f} forward-equivalents), "
          f"{c.total_flop / 1e18:.2f} EFLOP in all; all-reduce {c.allreduce_bytes_per_step / 1e6:.1f} MB per step; "
          f"{c.fp32_meta_steps:,} steps with the meta part in fp32")
    print("rates:")
    for name, rate in (("step", step_rate), ("evaluation forward", eval_rate), ("decode", decode_rate),
                       ("all-reduce bus bandwidth", busbw), ("fp32 meta window slowdown", slowdown)):
        print(f"  {name}: {rate.label()}")
    print(f"per step: compute {pred.compute_ms:.2f} ms + all-reduce {pred.allreduce_ms:.2f} ms "
          f"vs decode {pred.decode_ms:.2f} ms -> {pred.step_ms:.2f} ms")
    print(f"predicted wall time: {hours(pred.wall_s)} ({hours(pred.train_s)} training + {hours(pred.eval_s)} "
          f"evaluation); bottleneck: {pred.bottleneck}")
    print("share of the wall time (compute and all-reduce run while the next batch decodes): "
          + ", ".join(f"{k} {100 * v:.1f}%" for k, v in pred.shares.items()))
    result = {"counts": {**asdict(c), "decodes": c.decodes, "total_flop": c.total_flop},
              "rates": {"step": asdict(step_rate), "eval_forward": asdict(eval_rate), "decode": asdict(decode_rate),
                        "allreduce_busbw": asdict(busbw), "fp32_slowdown": asdict(slowdown)},
              "prediction": asdict(pred)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, default=str))
    return result


def main(argv=None) -> int:
    run_plan(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
