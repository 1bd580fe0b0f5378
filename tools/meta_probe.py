"""mgssl meta-probe CHECKPOINT_OR_RUN_DIR [more ...] [--multipliers 0.1,1,10] [--json PATH] [--plot PNG]

Does the meta step do what Theorem 1 says it does? The pseudo labels ŷ are moved to lower
H(ŷ) = L_l(θ − α·∇θ L_u(θ; ŷ)): the labeled loss after one SGD step of the consistency loss towards
them. For each saved network this measures ΔH = H(ŷ) − H(ỹ) directly: it takes that SGD step (α is the
learning rate in force at the checkpoint's step) and evaluates the labeled loss before and after, on
  g-batch   the labeled batch whose gradient g moved the labels,
  held-out  training images whose labels the run never saw (the unlabeled set, with its hidden labels),
  test      test images.
At ŷ = ỹ the consistency gradient is zero (eval mode), so H(ỹ) is the loss at θ itself.

Each multiplier scales the run's own pseudo-label step (1 = the step training took at that point).
Two controls take a step of the same size: `random` shifts the pseudo labels by a random direction of
the same length per image (then the same SGD step), `labeled` moves θ along −g by as far as the meta
step moved it (the best first-order descent of the g-batch loss for that distance).
Batches are drawn as in training (the run's batch size, without augmentation), in eval mode, in fp32."""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

SETS = ("g-batch", "held-out", "test")
VARIANTS = ("meta", "random", "labeled")


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


@dataclass
class Network:
    """A network as a function of its parameters, in eval mode: the loss at any θ without touching it."""
    net: torch.nn.Module
    params: dict
    buffers: dict

    @classmethod
    def of(cls, net: torch.nn.Module) -> "Network":
        net.eval()
        return cls(net, {n: p.detach() for n, p in net.named_parameters()},
                   {n: b for n, b in net.named_buffers()})

    def logits(self, params: dict, x: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        state = {**self.buffers, **params}
        return torch.cat([functional_call(self.net, state, (x[i:i + chunk],)) for i in range(0, len(x), chunk)])

    def labeled_loss(self, params: dict, x: torch.Tensor, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float(F.cross_entropy(self.logits(params, x).double(), y))

    def consistency_step(self, x_u: torch.Tensor, target: torch.Tensor, lr: float) -> dict:
        """α·∇θ L_u(θ; target), the parameter change of one SGD step on the consistency loss."""
        from mgssl.train.losses import consistency_mse

        params = {n: p.clone().requires_grad_(True) for n, p in self.params.items()}
        grads = torch.autograd.grad(consistency_mse(self.logits(params, x_u), target), list(params.values()))
        return {n: lr * g for n, g in zip(params, grads)}

    def labeled_grad(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        params = {n: p.clone().requires_grad_(True) for n, p in self.params.items()}
        grads = torch.autograd.grad(F.cross_entropy(self.logits(params, x), y), list(params.values()))
        return dict(zip(params, grads))

    def moved(self, change: dict, scale: float = 1.0) -> dict:
        return {n: p - scale * change[n] for n, p in self.params.items()}


def _norm(tensors: dict) -> float:
    return float(torch.sqrt(sum(t.double().pow(2).sum() for t in tensors.values())))


def _random_shift(delta: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A random per-image shift of the pseudo labels with the length of `delta`'s rows and, like it,
    summing to zero over the classes (it moves within the simplex's plane)."""
    r = torch.randn(delta.shape, generator=gen, dtype=delta.dtype).to(delta.device)
    r = r - r.mean(dim=1, keepdim=True)
    return r * (delta.norm(dim=1, keepdim=True) / r.norm(dim=1, keepdim=True).clamp_min(1e-30))


def probe(path, *, multipliers: Sequence[float] = (0.1, 0.3, 1.0, 3.0, 10.0), batches: int = 8,
          held_out: int = 512, seed: int = 0, data_root: Optional[str] = None, device: str = "cpu",
          warn=print) -> dict:
    """ΔH of the meta step and of its two controls for one checkpoint, averaged over `batches` draws."""
    from mgssl.tools.runs import restore
    from mgssl.train import run_state as rs
    from mgssl.train import schedule
    from mgssl.train.meta import meta_targets, resolve_estimator
    from mgssl.train.pseudo_labels import pseudo_label_step, update_pseudo_labels

    restored = restore(path, data_root=data_root, device=device, warn=warn)
    cfg, data = restored.cfg, restored.data
    if cfg.data.name == "imagenet":
        raise ValueError("tools.meta_probe reads the data sets held in memory (digits, CIFAR, SVHN), not image folders")
    step = int(restored.state.get(rs.STEP, 0))
    plan = schedule.plan(cfg, data.unlabeled_size)
    lr = schedule.learning_rate(step, cfg.optim, plan.total_steps, plan.warmup_steps)
    batch = cfg.data.batch_size
    estimator = resolve_estimator(cfg.method.estimator, low_precision=False)  # the probe runs in fp32
    gen = torch.Generator().manual_seed(seed)
    x_lab, y_lab = _images(data, "labeled", batches * batch, gen)
    x_unl, y_unl = _images(data, "unlabeled", batches * batch + held_out, gen)
    x_held, y_held = x_unl[batches * batch:], y_unl[batches * batch:]  # never an x_u of a draw
    x_unl = x_unl[:batches * batch]
    x_test, y_test = _images(data, "test", held_out, gen)
    network = Network.of(restored.net)

    def losses(params: dict, x_l, y_l) -> dict:
        return {"g-batch": network.labeled_loss(params, x_l, y_l),
                "held-out": network.labeled_loss(params, x_held, y_held),
                "test": network.labeled_loss(params, x_test, y_test)}

    at_theta = {s: network.labeled_loss(network.params, x, y) for s, (x, y) in
                (("held-out", (x_held, y_held)), ("test", (x_test, y_test)))}
    sums = {m: {"shift": 0.0, "param_change": 0.0, "descents": 0,
                **{f"{v}/{s}": 0.0 for v in VARIANTS for s in SETS}} for m in multipliers}
    for _ in range(batches):
        li = torch.randint(len(y_lab), (batch,), generator=gen).to(y_lab.device)
        ui = torch.randint(len(x_unl), (batch,), generator=gen).to(x_unl.device)
        x_l, y_l, x_u = x_lab[li], y_lab[li], x_unl[ui]
        out = meta_targets(network.net, x_l, y_l, x_u, estimator=estimator, eps=cfg.method.eps)
        run_step = pseudo_label_step(out.jg, lr, cfg.method, batch)  # ỹ − ŷ before projection, as training took it
        g = network.labeled_grad(x_l, y_l)
        before = {"g-batch": network.labeled_loss(network.params, x_l, y_l), **at_theta}
        for m in multipliers:
            y_hat = update_pseudo_labels(out.pseudo_labels, m * run_step)
            meta_change = network.consistency_step(x_u, y_hat, lr)
            y_random = update_pseudo_labels(out.pseudo_labels, _random_shift(m * run_step, gen))
            distance = _norm(meta_change)
            after = {"meta": losses(network.moved(meta_change), x_l, y_l),
                     "random": losses(network.moved(network.consistency_step(x_u, y_random, lr)), x_l, y_l),
                     "labeled": losses(network.moved(g, distance / max(_norm(g), 1e-30)), x_l, y_l)}
            row = sums[m]
            for v in VARIANTS:
                for s in SETS:
                    row[f"{v}/{s}"] += after[v][s] - before[s]
            row["descents"] += int(after["meta"]["g-batch"] < before["g-batch"])
            row["shift"] += float((y_hat - out.pseudo_labels).abs().sum(dim=1).mean())
            row["param_change"] += distance
    rows = [{"multiplier": m, **{k: (v / batches if k != "descents" else v) for k, v in s.items()}}
            for m, s in sums.items()]
    return {"checkpoint": str(restored.checkpoint), "step": step, "total_steps": plan.total_steps, "lr": lr,
            "estimator": estimator, "meta_scale": cfg.method.meta_scale,
            "meta_multiplier": cfg.method.meta_multiplier, "batch": batch, "batches": batches,
            "held_out": len(y_held), "test": len(y_test), "rows": rows}


def plot(results: list[dict], out: Path) -> None:
    """ΔH against the multiplier, one panel per set, one colour per checkpoint; controls dashed and dotted.
    ΔH is drawn in units of the labeled control's descent on the g batch at the same multiplier (which is
    thus −1), so that checkpoints whose learning rates differ by 100x share one scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETS), figsize=(4.2 * len(SETS), 3.6), sharex=True)
    colours = plt.cm.viridis([i / max(1, len(results) - 1) for i in range(len(results))])
    for result, colour in zip(results, colours):
        ms = [r["multiplier"] for r in result["rows"]]
        unit = [abs(r["labeled/g-batch"]) or float("nan") for r in result["rows"]]
        for ax, s in zip(axes, SETS):
            for v, style in zip(VARIANTS, ("-", "--", ":")):
                ax.plot(ms, [r[f"{v}/{s}"] / u for r, u in zip(result["rows"], unit)], style, color=colour, marker="o" if v == "meta" else None,
                        ms=3, label=f"step {result['step']} {v}" if s == SETS[0] else None)
    for ax, s in zip(axes, SETS):
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1.0)  # linear within one labeled step's descent, compressed beyond
        ax.set_title(f"ΔH on {s}")
        ax.set_xlabel("multiplier of the run's pseudo-label step")
    axes[0].set_ylabel("ΔH / |ΔH of the labeled step on the g batch|")
    axes[0].legend(fontsize=6, ncol=1)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of positive numbers (e.g. 0.1,1,10)")
    return values


def _table(result: dict) -> str:
    lines = [f"{result['checkpoint']} (step {result['step']} of {result['total_steps']}, lr {result['lr']:.4g}, "
             f"{result['batches']} draws of {result['batch']}+{result['batch']}, {result['estimator']}): "
             f"ΔH of the labeled loss, meta / random / labeled",
             "| multiplier | g-batch | held-out | test | meta descents | shift (L1) | ‖Δθ‖ |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = [" / ".join(f"{r[f'{v}/{s}']:+.2e}" for v in VARIANTS) for s in SETS]
        lines.append(f"| {r['multiplier']:g} | {' | '.join(cells)} | {r['descents']}/{result['batches']} | "
                     f"{r['shift']:.4f} | {r['param_change']:.3g} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mgssl meta-probe", description=__doc__.split("\n\n", 1)[1],
                                epilog="example:\n  mgssl meta-probe runs/digits-seed0 --plot runs/probe.png",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT_OR_RUN_DIR",
                   help="checkpoints (.pt) or run folders (their checkpoints/last.pt), e.g. along one run")
    p.add_argument("--multipliers", type=_floats, default=[0.1, 0.3, 1.0, 3.0, 10.0],
                   help="factors on the run's pseudo-label step at that checkpoint (default: 0.1,0.3,1,3,10)")
    p.add_argument("--batches", type=int, default=8, help="meta steps to average over (default 8)")
    p.add_argument("--held-out", type=int, default=512, help="held-out and test images to evaluate (default 512)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-root", default=None, help="where the data set lies, if not at the run's data.root")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    p.add_argument("--plot", type=Path, default=None, metavar="PNG", help="also draw ΔH against the multiplier")
    args = p.parse_args(argv)
    if args.batches < 1 or args.held_out < 1:
        p.error("--batches and --held-out must be at least 1")
    results = []
    try:
        for path in args.checkpoints:
            results.append(probe(path, multipliers=args.multipliers, batches=args.batches, held_out=args.held_out,
                                 seed=args.seed, data_root=args.data_root, device=args.device,
                                 warn=lambda text: print(text, file=sys.stderr)))
            print(_table(results[-1]) + "\n", flush=True)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json is not None:
        from mgssl.tools.runs import write_json_output

        error = write_json_output(args.json, results)
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    if args.plot is not None:
        plot(results, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
