"""python -m mgssl.tools.meta_probe CHECKPOINT_OR_RUN_DIR [--multipliers 0,0.1,1] [--batches 20] [--json PATH]

Does the meta step make the pseudo labels better? For a saved network, on unlabeled training images
whose true labels the data set knows, this compares ỹ = p(x_u) with ŷ = ỹ moved by the meta step,
at the run's scale times each multiplier: top-1 accuracy and Brier score (mean ||ŷ - onehot||²)
against the true labels, and the mean L1 size of the move. Batches are drawn as in training (the run's
batch size, labeled and unlabeled images without augmentation), with the run's estimator, ε, meta
mode and pseudo-label scale, at the run's peak learning rate unless --lr says otherwise.

A multiplier whose Brier score is below multiplier 0's moves the labels towards the truth."""
import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _images(data, subset: str, keep: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """About `keep` images of `subset` chosen at random, with their labels (keeps memory bounded)."""
    xs, ys = [], []
    batches = list(data.eval_batches(subset))
    total = sum(len(y) for _, y in batches)
    share = min(1.0, keep / max(1, total))
    for x, y in batches:
        pick = torch.rand(len(y), generator=gen) < share
        xs.append(x[pick.to(x.device)])
        ys.append(y[pick.to(y.device)])
    return torch.cat(xs), torch.cat(ys)


def probe(path, *, multipliers: Sequence[float] = (0.0, 0.1, 0.3, 1.0, 3.0), batches: int = 20,
          lr: Optional[float] = None, mode: Optional[str] = None, seed: int = 0, data_root: Optional[str] = None,
          device: str = "cpu", warn=print) -> dict:
    from mgssl.tools.runs import restore
    from mgssl.train.losses import update_pseudo_labels
    from mgssl.train.meta import meta_targets, resolve_estimator
    from mgssl.train.step import pseudo_label_step

    restored = restore(path, data_root=data_root, device=device, warn=warn)
    cfg, net, data = restored.cfg, restored.net, restored.data
    if cfg.data.name == "imagenet":
        raise ValueError("tools.meta_probe reads the data sets held in memory (digits, CIFAR, SVHN), not image folders")
    method, batch = cfg.method, cfg.data.batch_size
    lr = cfg.optim.lr if lr is None else lr
    mode = mode or method.meta_mode
    estimator = resolve_estimator(method.estimator, low_precision=False)  # the probe runs in fp32
    gen = torch.Generator().manual_seed(seed)
    x_lab, y_lab = _images(data, "labeled", batches * batch, gen)
    x_unl, y_unl = _images(data, "unlabeled", batches * batch, gen)
    sums = {m: {"correct": 0.0, "brier": 0.0, "shift": 0.0} for m in multipliers}
    count = 0
    net.train(mode == "train")
    for _ in range(batches):
        li = torch.randint(len(y_lab), (batch,), generator=gen).to(y_lab.device)
        ui = torch.randint(len(y_unl), (batch,), generator=gen).to(y_unl.device)
        out = meta_targets(net, x_lab[li], y_lab[li], x_unl[ui], estimator=estimator, eps=method.eps)
        step = pseudo_label_step(out.jg, lr, method, batch)  # (B, C) at the run's scale and multiplier
        truth = F.one_hot(y_unl[ui], data.num_classes).to(out.pseudo_labels.dtype)
        for m in multipliers:
            y_hat = update_pseudo_labels(out.pseudo_labels, m * step)
            sums[m]["correct"] += float((y_hat.argmax(dim=1) == y_unl[ui]).sum())
            sums[m]["brier"] += float((y_hat - truth).pow(2).sum(dim=1).sum())
            sums[m]["shift"] += float((y_hat - out.pseudo_labels).abs().sum(dim=1).sum())
        count += batch
    rows = [{"multiplier": m, "accuracy": s["correct"] / count, "brier": s["brier"] / count,
             "shift": s["shift"] / count} for m, s in sums.items()]
    return {"checkpoint": str(restored.checkpoint), "step": int(restored.state.get("step", -1)), "lr": lr,
            "mode": mode, "estimator": estimator, "meta_scale": method.meta_scale,
            "meta_multiplier": method.meta_multiplier, "batch": batch, "pairs": count, "rows": rows}


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers (e.g. 0,0.1,1)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m mgssl.tools.meta_probe", description=__doc__.split("\n\n")[1],
                                epilog="example:\n  python -m mgssl.tools.meta_probe runs/digits-seed0 --multipliers 0,0.3,1,3",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_OR_RUN_DIR")
    p.add_argument("--multipliers", type=_floats, default=[0.0, 0.1, 0.3, 1.0, 3.0],
                   help="factors on the run's pseudo-label step; 0 is ŷ = ỹ (default: 0,0.1,0.3,1,3)")
    p.add_argument("--batches", type=int, default=20, help="meta steps to average over (default 20)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of the step (default: the run's optim.lr)")
    p.add_argument("--mode", choices=("eval", "train"), default=None, help="mode of the meta part "
                   "(default: the run's method.meta_mode)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="where the data set lies, if not at the run's data.root")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON")
    args = p.parse_args(argv)
    if args.batches < 1:
        p.error("--batches must be at least 1")
    try:
        result = probe(args.checkpoint, multipliers=args.multipliers, batches=args.batches, lr=args.lr,
                       mode=args.mode, seed=args.seed, data_root=args.data_root, device=args.device,
                       warn=lambda text: print(text, file=sys.stderr))
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result['checkpoint']} (step {result['step']}): {result['pairs']} pairs, lr {result['lr']}, "
          f"{result['mode']} mode, {result['estimator']}, {result['meta_scale']} scale")
    print("| multiplier | accuracy | Brier | shift (L1) |\n|---|---|---|---|")
    for row in result["rows"]:
        print(f"| {row['multiplier']:g} | {row['accuracy']:.4f} | {row['brier']:.4f} | {row['shift']:.4f} |")
    if args.json is not None:
        try:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        except OSError as e:
            from mgssl.tools.runs import output_error

            print(f"error: {output_error(e, '--json')}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
