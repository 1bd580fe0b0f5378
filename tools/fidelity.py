"""How faithful ∇ỹ, the meta-gradient with respect to the pseudo labels, is under bf16/fp16 autocast.

    python -m mgssl.tools.fidelity --network convlarge --precision bf16 [--batch 128] [--size 32] [--json]
    python -m mgssl.tools.fidelity --network resnet18 --cifar10 DIR      # natural images instead of noise

For one of the paper's networks at its batch size and resolution it prints the cosine (and relative
error) of ∇ỹ to a float64 reference, per estimator: `fd` (g under autocast, the ±εg passes in fp32),
`jvp` (one pass in the low precision), `jvp-fp32` and `fd-fp32` (g and the passes in fp32 without
TF32, what `method.meta_precision=fp32` runs; fd-fp32 is also what an fp32 run of the authors' estimator
computes) and `auto` (what the default resolves to). One more row, `floor`,
is ∇ỹ in float64 arithmetic at the convolution and linear weights rounded to the low precision:
autocast runs every convolution on those weights, so no estimator in the low precision can be
expected to beat it.

Fidelity is a property of the arithmetic, not of the device: run it on the CPU. By default the data
are synthetic (standard normal images, uniform labels); `--cifar10 DIR` takes CIFAR-10 training
images and their labels instead (from DIR's cifar-10-batches-py/, resized to the network's
resolution and normalised per channel). The network is at its initialisation, with BatchNorm's
running statistics set from the two batches so that eval mode normalises as a trained network's would;
`--weights RUN` measures a trained network instead (a checkpoint of `python -m mgssl.train`).
"""
import argparse
import copy
import json
import sys
import time
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from mgssl.model import build_model
from mgssl.train.meta import pseudo_label_grad, resolve_estimator

# network: (per-process batch, image size, classes) of the paper's experiments (configs/).
PAPER = {"convlarge": (128, 32, 10), "shakeshake26": (128, 32, 10), "resnet18": (64, 224, 1000)}
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def synthetic_batches(batch: int, size: int, classes: int, gen: torch.Generator):
    x_l = torch.randn(batch, 3, size, size, generator=gen)
    y_l = torch.randint(0, classes, (batch,), generator=gen)
    x_u = torch.randn(batch, 3, size, size, generator=gen)
    return x_l, y_l, x_u


def cifar10_batches(root: str, batch: int, size: int, classes: int, gen: torch.Generator):
    """2·batch CIFAR-10 training images drawn at random, bilinearly resized to `size` and normalised
    with their own per-channel mean and std; the labeled half keeps its true labels."""
    from mgssl.pipelines.sources import DataMissingError, load_cifar10_arrays

    try:
        data = load_cifar10_arrays(root)
    except DataMissingError as e:
        raise SystemExit(f"--cifar10: {e}") from None
    if classes < data.num_classes:
        raise SystemExit(f"--classes {classes}: CIFAR-10 has 10 classes; give at least 10")
    pick = torch.randperm(len(data.train_labels), generator=gen)[:2 * batch]
    images = torch.from_numpy(data.train_images[pick.numpy()]).permute(0, 3, 1, 2).double() / 255
    if images.shape[-1] != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = images.mean((0, 2, 3), keepdim=True), images.std((0, 2, 3), keepdim=True)
    images = ((images - mean) / std).float()
    labels = torch.from_numpy(data.train_labels[pick.numpy()])
    return images[:batch], labels[:batch], images[batch:]


def trained_weights(path: str) -> dict:
    """The network weights of a checkpoint of `python -m mgssl.train` (a .pt file or its run folder)."""
    from mgssl.tools.runs import checkpoint_path
    from mgssl.train import checkpoint as ckpt
    from mgssl.train import run_state as rs

    try:
        state = ckpt.load(checkpoint_path(path))
    except FileNotFoundError as e:
        raise SystemExit(f"--weights: {e}") from None
    if rs.MODEL not in state:
        raise SystemExit(f"--weights {path}: no {rs.MODEL!r} entry; pass a checkpoint of `python -m mgssl.train` or its "
                         "run folder")
    return state[rs.MODEL]


def calibrates(weights: Optional[str], calibrate: Optional[bool]) -> bool:
    """Whether BatchNorm's statistics are set from the measured batches: by default only at initialisation."""
    return weights is None if calibrate is None else calibrate


def calibrated_network(name: str, classes: int, batches, mode: str, seed: int, weights: Optional[str] = None,
                       calibrate: Optional[bool] = None) -> nn.Module:
    """The network at its initialisation or at `weights`, its BatchNorm statistics set from `batches`
    (by default only at initialisation: a trained network keeps the statistics it was trained with)."""
    torch.manual_seed(seed)
    net = build_model(name, classes, 3, channels_last=True)
    if weights is not None:
        try:
            net.load_state_dict(trained_weights(weights))
        except RuntimeError as e:
            raise SystemExit(f"--weights {weights} is not a {name} with {classes} classes (set --network and "
                             f"--classes to the run's): {str(e).splitlines()[0]}") from None
    if not calibrates(weights, calibrate):
        return net.train(mode == "train")
    layers = [m for m in net.modules() if isinstance(m, _BatchNorm)]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batches
    net.train()
    with torch.no_grad():
        for x in batches:
            net(x)
    for m in layers:
        m.momentum = 0.1
    return net.train(mode == "train")


ROWS = ("floor", "fd", "jvp", "jvp-fp32", "fd-fp32")


def measure(network: str, precision: str, batch: int, size: int, classes: int, mode: str = "eval", seed: int = 0,
            lr: float = 0.1, rows: tuple[str, ...] = ROWS, cifar10: Optional[str] = None,
            weights: Optional[str] = None, calibrate: Optional[bool] = None) -> dict:
    """Cosine of ∇ỹ to float64 for each of `rows` (and `auto`, which is one of them), on synthetic
    batches or, with `cifar10` (a data root), on CIFAR-10 images; at the network's initialisation or,
    with `weights`, at a trained network's weights and BatchNorm statistics."""
    low = LOW[precision]
    g = torch.Generator().manual_seed(seed + 1)
    x_l, y_l, x_u = (cifar10_batches(cifar10, batch, size, classes, g) if cifar10
                     else synthetic_batches(batch, size, classes, g))
    x_l, x_u = (x.contiguous(memory_format=torch.channels_last) for x in (x_l, x_u))
    net = calibrated_network(network, classes, (x_l, x_u), mode, seed, weights, calibrate)
    rng = torch.get_rng_state()

    def grad(model, dtype, estimator, autocast, full_precision=False):
        torch.set_rng_state(rng)  # train mode: every row sees the same dropout masks and gates
        with torch.autocast("cpu", dtype=low, enabled=autocast):
            return pseudo_label_grad(model, x_l.to(dtype), y_l, x_u.to(dtype), lr=lr, method=estimator,
                                     full_precision=full_precision)

    wanted, rows, started = rows, {}, time.perf_counter()
    reference = grad(copy.deepcopy(net).double(), torch.float64, "jvp", False)
    rounded = copy.deepcopy(net)
    with torch.no_grad():  # the weights autocast rounds: convolutions' and linear layers', not BatchNorm's
        for m in rounded.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                for p in m.parameters(recurse=False):
                    p.copy_(p.to(low).float())
    timed = {"floor": lambda: grad(rounded.double(), torch.float64, "jvp", False),
             "fd": lambda: grad(net, torch.float32, "fd", True),
             "jvp": lambda: grad(net, torch.float32, "jvp", True),
             "jvp-fp32": lambda: grad(net, torch.float32, "jvp", True, full_precision=True),
             "fd-fp32": lambda: grad(net, torch.float32, "fd", True, full_precision=True)}
    resolved = resolve_estimator("auto", low_precision=True)
    for name, fn in timed.items():
        if name not in wanted and name != resolved:
            continue
        tick = time.perf_counter()
        value = fn()
        rows[name] = {"cosine": cosine(value, reference), "relative_error": relative_error(value, reference),
                      "seconds": round(time.perf_counter() - tick, 1)}
    rows["auto"] = {**rows[resolved], "resolves_to": resolved}
    return {"network": network, "precision": precision, "batch": batch, "size": size, "classes": classes,
            "images": "cifar10" if cifar10 else "synthetic",
            "weights": weights or "initialisation", "calibrated": calibrates(weights, calibrate),
            "mode": mode, "seed": seed, "rows": rows, "seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="mgssl fidelity", description=__doc__.split("\n\n")[0])
    p.add_argument("--network", required=True, choices=sorted(PAPER))
    p.add_argument("--precision", default="bf16", choices=sorted(LOW))
    p.add_argument("--batch", type=int, help="labeled and unlabeled images each (default: the paper's per process)")
    p.add_argument("--size", type=int, help="image side in pixels (default: the paper's)")
    p.add_argument("--classes", type=int)
    p.add_argument("--mode", default="eval", choices=("eval", "train"), help="the meta part's mode (method.meta_mode)")
    p.add_argument("--cifar10", metavar="DIR", help="CIFAR-10 images from DIR (holding cifar-10-batches-py/) "
                   "instead of synthetic noise")
    p.add_argument("--weights", metavar="CHECKPOINT", help="a trained network: a checkpoint of `python -m mgssl.train` "
                   "or its run folder (default: the network at its initialisation)")
    p.add_argument("--calibrate", action=argparse.BooleanOptionalAction, default=None,
                   help="set BatchNorm's running statistics from the two batches (default: only at initialisation; "
                        "with --weights at another resolution than the run's, its statistics no longer fit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    return p.parse_args(argv)


def run_fidelity(argv=None) -> dict:
    """Parse `argv`, measure, print; returns the result."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, size, classes = PAPER[args.network]
    result = measure(args.network, args.precision, args.batch or batch, args.size or size, args.classes or classes,
                     args.mode, args.seed, cifar10=args.cifar10, weights=args.weights, calibrate=args.calibrate)
    print(f"{result['network']} {result['batch']}+{result['batch']} {result['images']} images at {result['size']} px, "
          f"{result['classes']} classes, {result['precision']}, {result['mode']} mode, weights: {result['weights']}: "
          "cosine of ∇ỹ to float64")
    print(f"{'estimator':<10} {'cosine':>10} {'rel. error':>11} {'seconds':>8}")
    for name, row in result["rows"].items():
        label = f"auto={row['resolves_to']}" if name == "auto" else name
        print(f"{label:<10} {row['cosine']:>10.6f} {row['relative_error']:>11.2e} {row['seconds']:>8.1f}")
    if args.json:
        print(json.dumps(result))
    return result


def main(argv=None) -> int:
    run_fidelity(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
