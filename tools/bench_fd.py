"""fd's ±εg passes: separate calls against one batched (vmapped) call, on the device it runs on.

    python -m mgssl.tools.bench_fd --model convlarge --device cpu --batch-size 32 --rounds 8

Times the finite-difference passes of the meta part alone, for one g, in fp32 (as fd runs them):
`sequential` calls the network once per parameter set (θ, θ+εg, θ−εg), `batched` stacks the sets
and makes one `torch.vmap` call (convolutions become grouped ones; train.meta.batched_probs), each
with the centre pass (3 sets) and with `--midpoint`'s two. The variants are interleaved round by
round, the order rotating, so that a busy machine slows them alike; each reports its median and
spread ((p90 - p10) / median). The batched call must give the sequential call's ỹ and J·g (to fp32
rounding) or nothing is printed. `method.fd_batched`'s default follows what this measures; under
bf16/fp16 the meta part uses jvp (one exact forward-mode pass) and runs no ±εg pair at all.

With --json the last line printed is one JSON object.
"""
import argparse
import json
import statistics
import sys

import torch

from mgssl.model import build_model
from mgssl.tools.bench import SHAPES, StepTimer, device_name, run_rounds, spread, synthetic_batch
from mgssl.train.meta import _state, fd_passes, labeled_grad


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mgssl bench-fd", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="convlarge", choices=sorted(SHAPES))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--batch-size", type=int, default=128, help="unlabeled images per pass (and labeled ones for g)")
    p.add_argument("--image-size", type=int, default=None, help="override the image side (e.g. 224 for resnet18)")
    p.add_argument("--rounds", type=int, default=10, help="timed rounds, each variant once per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="NHWC activations (default: on for cuda, off for cpu)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="end with one line of JSON")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to torch; run on a GPU machine or pass --device cpu")
    if args.batch_size < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--batch-size and --rounds must be at least 1, --warmup at least 0")
    if args.channels_last is None:
        args.channels_last = args.device == "cuda"
    return args


def run_bench(args: argparse.Namespace) -> dict:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    classes, channels, side = SHAPES[args.model]
    side = args.image_size or side
    torch.manual_seed(0)
    net = build_model(args.model, classes, channels, channels_last=args.channels_last).to(device).eval()
    x_l, y_l, x_u = synthetic_batch(classes, channels, side, args.batch_size, device, args.channels_last,
                                    torch.Generator().manual_seed(0))
    names, params, buffers = _state(net)
    g = labeled_grad(net, names, params, buffers, x_l, y_l)
    variants = {f"{kind} {'2' if midpoint else '3'} sets": (kind == "batched", midpoint)
                for midpoint in (False, True) for kind in ("sequential", "batched")}
    outputs = {}

    def call(name):
        batched, midpoint = variants[name]
        outputs[name] = fd_passes(net, g, x_u, midpoint=midpoint, batched=batched)

    steps = {name: (lambda name=name: call(name)) for name in variants}
    run_rounds(steps, args.warmup, None, "warm-up")
    timer = StepTimer(device)
    run_rounds(steps, args.rounds, timer, "timing")
    times = timer.results()
    for sets in ("3", "2"):  # the batched call computes what the separate calls do
        (center_s, jg_s, _), (center_b, jg_b, _) = outputs[f"sequential {sets} sets"], outputs[f"batched {sets} sets"]
        scale = jg_s.abs().max().clamp_min(1e-12)
        if not (torch.allclose(center_s, center_b, atol=1e-5) and ((jg_s - jg_b).abs().max() / scale) < 1e-2):
            raise SystemExit(f"the batched fd passes ({sets} sets) differ from the separate ones; not timing them")
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {"model": args.model, "device": device_name(device), "batch_size": args.batch_size, "image_size": side,
            "channels_last": args.channels_last, "threads": torch.get_num_threads(), "rounds": args.rounds,
            "median_ms": median, "spread": {name: spread(ts) for name, ts in times.items()},
            "batched_over_sequential": {sets: median[f"batched {sets} sets"] / median[f"sequential {sets} sets"]
                                        for sets in ("3", "2")}}


def print_table(s: dict) -> None:
    print(f"{s['model']} {s['batch_size']} images at {s['image_size']} px on {s['device']} "
          f"({s['threads']} threads), {s['rounds']} interleaved rounds")
    print(f"{'variant':<22}{'median ms':>11}{'spread':>8}")
    for name, ms in s["median_ms"].items():
        print(f"{name:<22}{ms:>11.2f}{100 * s['spread'][name]:>7.0f}%")
    for sets, ratio in s["batched_over_sequential"].items():
        print(f"batched / sequential, {sets} sets: {ratio:.3f} ({'faster' if ratio < 1 else 'slower'} batched)")


def main(argv=None) -> int:
    args = parse_args(argv)
    s = run_bench(args)
    print_table(s)
    if args.json:
        print(json.dumps(s))
    return 0


if __name__ == "__main__":
    sys.exit(main())
