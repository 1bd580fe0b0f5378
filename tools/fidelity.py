"""How faithful ∇ỹ, the meta-gradient with respect to the pseudo labels, is under bf16/fp16 autocast.

    python -m tools.fidelity --network convlarge --precision bf16 [--batch 128] [--size 32] [--json]

For one of the paper's networks at its batch size and resolution it prints the cosine (and relative
error) of ∇ỹ to a float64 reference, per estimator: `fd` (g under autocast, the ±εg passes in fp32),
`jvp` (one pass in the low precision) and `auto` (what the default resolves to). One more row,
`floor`, is ∇ỹ in float64 arithmetic at the convolution and linear weights rounded to the low
precision: autocast runs every convolution on those weights, so no estimator under autocast can be expected to beat it.

Fidelity is a property of the arithmetic, not of the device: run it on the CPU. The data are
synthetic (standard normal images, uniform labels) and the network is at its initialisation, with
BatchNorm's running statistics set from the two batches so that eval mode normalises as a trained
network's would.
"""
import argparse
import copy
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from model import build_model
from train.meta import pseudo_label_grad, resolve_estimator

# network: (per-process batch, image size, classes) of the paper's experiments (configs/).
PAPER = {"convlarge": (128, 32, 10), "shakeshake26": (128, 32, 10), "resnet18": (64, 224, 1000)}
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def calibrated_network(name: str, classes: int, batches, mode: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = build_model(name, classes, 3, channels_last=True)
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


ROWS = ("floor", "fd", "jvp")


def measure(network: str, precision: str, batch: int, size: int, classes: int, mode: str = "eval", seed: int = 0,
            lr: float = 0.1, rows: tuple[str, ...] = ROWS) -> dict:
    """Cosine of ∇ỹ to float64 for each of `rows` (and `auto`, which is one of them)."""
    low = LOW[precision]
    g = torch.Generator().manual_seed(seed + 1)
    x_l = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    y_l = torch.randint(0, classes, (batch,), generator=g)
    x_u = torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=torch.channels_last)
    net = calibrated_network(network, classes, (x_l, x_u), mode, seed)
    rng = torch.get_rng_state()

    def grad(model, dtype, estimator, autocast):
        torch.set_rng_state(rng)  # train mode: every row sees the same dropout masks and gates
        with torch.autocast("cpu", dtype=low, enabled=autocast):
            return pseudo_label_grad(model, x_l.to(dtype), y_l, x_u.to(dtype), lr=lr, method=estimator)

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
             "jvp": lambda: grad(net, torch.float32, "jvp", True)}
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
            "mode": mode, "seed": seed, "rows": rows, "seconds": round(time.perf_counter() - started, 1),
            "torch": torch.__version__}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", required=True, choices=sorted(PAPER))
    p.add_argument("--precision", default="bf16", choices=sorted(LOW))
    p.add_argument("--batch", type=int, help="labeled and unlabeled images each (default: the paper's per process)")
    p.add_argument("--size", type=int, help="image side in pixels (default: the paper's)")
    p.add_argument("--classes", type=int)
    p.add_argument("--mode", default="eval", choices=("eval", "train"), help="the meta part's mode (method.meta_mode)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int)
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    batch, size, classes = PAPER[args.network]
    result = measure(args.network, args.precision, args.batch or batch, args.size or size, args.classes or classes,
                     args.mode, args.seed)
    print(f"{result['network']} {result['batch']}+{result['batch']} at {result['size']} px, {result['classes']} "
          f"classes, {result['precision']}, {result['mode']} mode: cosine of ∇ỹ to float64")
    print(f"{'estimator':<10} {'cosine':>10} {'rel. error':>11} {'seconds':>8}")
    for name, row in result["rows"].items():
        label = f"auto={row['resolves_to']}" if name == "auto" else name
        print(f"{label:<10} {row['cosine']:>10.6f} {row['relative_error']:>11.2e} {row['seconds']:>8.1f}")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
