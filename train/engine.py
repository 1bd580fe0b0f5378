"""The training loop: data -> step -> logs, evaluations and checkpoints, resumable exactly."""
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import yaml

from pipelines import build_data
from train import checkpoint as ckpt
from train import distributed as D
from train.config import Config, config_diff, to_dict
from train.evaluate import error_counts, errors_from_counts
from train.metrics import MetricsLog, Progress, summarize_evals
from train.schedule import consistency_weight, learning_rate
from train.step import SeparateForwards, autocast_for, train_step

# Keys a resumed run may change: they do not alter what is trained.
RESUMABLE_CHANGES = ("train.steps", "train.epochs", "train.eval_every", "train.log_every",
                     "train.checkpoint_every", "train.keep_last_evals", "train.progress", "train.tensorboard",
                     "data.root", "data.workers", "data.eval_batch_size")


class NonFiniteLossError(RuntimeError):
    pass


def git_commit() -> str:
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_optimizer(net: nn.Module, cfg: Config, device: torch.device) -> torch.optim.Optimizer:
    impl = cfg.optim.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.SGD(net.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                           nesterov=cfg.optim.nesterov, weight_decay=cfg.optim.weight_decay, **kwargs)


def rng_state(device: torch.device) -> dict:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


@dataclass
class RunPlan:
    total_steps: int
    warmup_steps: int
    steps_per_epoch: float


def plan(cfg: Config, unlabeled_size: int) -> RunPlan:
    """Steps from train.steps or train.epochs (an epoch is one pass over the unlabeled set)."""
    per_epoch = unlabeled_size / cfg.data.batch_size
    total = cfg.train.steps if cfg.train.steps is not None else math.ceil(cfg.train.epochs * per_epoch)
    warmup = (round(cfg.optim.warmup_epochs * per_epoch) if cfg.optim.warmup_epochs is not None
              else cfg.optim.warmup_steps)
    return RunPlan(int(total), int(warmup), per_epoch)


def _write_run_files(run_dir: Path, cfg: Config, argv: list[str], d: D.Dist) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    info = {"command": " ".join([Path(sys.executable).name, "-m", "train", *argv]), "git_commit": git_commit(),
            "world_size": d.world_size, "device": str(d.device), "torch": torch.__version__,
            "python": platform.python_version(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(run_dir / "runs.jsonl", "a") as f:  # one line per start or resume
        f.write(json.dumps(info) + "\n")


def _check_resume_config(saved: dict, cfg: Config) -> None:
    changes = [c for c in config_diff(saved, to_dict(cfg)) if not c.startswith(RESUMABLE_CHANGES)]
    if changes:
        raise ValueError("the config differs from the one the run was started with:\n  " + "\n  ".join(changes) +
                         "\nResume with the original settings, or start a new run in another --out folder.")


def run(cfg: Config, run_dir: Path, *, resume: bool = False, argv: Optional[list[str]] = None) -> dict:
    """Train `cfg` into `run_dir`; returns the final summary (also written to final.json)."""
    d = D.setup(cfg.train.device)
    try:
        return _run(cfg, Path(run_dir), resume, argv or [], d)
    finally:
        D.teardown()


def _run(cfg: Config, run_dir: Path, resume: bool, argv: list[str], d: D.Dist) -> dict:
    device = d.device
    last = ckpt.last_checkpoint(run_dir)
    if last is not None and not resume:
        raise FileExistsError(f"{run_dir} already holds a run (checkpoints/{ckpt.LAST}); add --resume to continue "
                              "it, or choose another --out folder")
    state = ckpt.load(last) if (resume and last is not None) else None
    if state is not None:
        _check_resume_config(state["config"], cfg)
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_run_files(run_dir, cfg, argv, d)
        if resume and state is None:
            print(f"no checkpoint in {run_dir}; starting a new run", file=sys.stderr)

    torch.manual_seed(cfg.seed * 1000 + d.rank)  # dropout masks and mixup λ differ per rank
    data = build_data(cfg.data, seed=cfg.seed, device=device, rank=d.rank, world_size=d.world_size, run_dir=run_dir)
    net = cfg.model.build(data.num_classes, data.in_channels).to(device)
    if cfg.train.sync_bn and d.enabled:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    optimizer = build_optimizer(net, cfg, device)
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    forwards: nn.Module = SeparateForwards(torch.compile(net) if cfg.train.compile else net)
    if d.enabled:
        forwards = nn.parallel.DistributedDataParallel(forwards, device_ids=[device.index] if device.type == "cuda" else None)
    reduce_grad = (lambda g: D.average_grads(g, d.world_size)) if (d.enabled and cfg.method.allreduce_grad) else None
    schedule = plan(cfg, data.unlabeled_size)

    start, evals = 0, []
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        data.train.load_state_dict(state["data"])
        start, evals = int(state["step"]), list(state["evals"])
        rngs = state["rng"]
        if len(rngs) == d.world_size:
            set_rng_state(rngs[d.rank], device)
        elif d.is_main:
            print(f"resuming on {d.world_size} processes from a checkpoint of {len(rngs)}: dropout and mixup "
                  "draws will differ from an uninterrupted run", file=sys.stderr)

    log = MetricsLog(run_dir, cfg.train.tensorboard, enabled=d.is_main)
    progress = Progress(schedule.total_steps, start, enabled=d.is_main and cfg.train.progress)
    autocast = autocast_for(device, cfg.train.precision)
    sums: dict[str, torch.Tensor] = {}
    finite = torch.ones((), dtype=torch.bool, device=device)
    count, tick = 0, time.perf_counter()
    global_batch = cfg.data.batch_size

    def track_finite(loss: torch.Tensor) -> None:
        nonlocal finite
        finite = finite & torch.isfinite(loss.detach())  # stays on the device: no sync per step

    def check_finite(step: int) -> None:
        if not D.broadcast_flag(not bool(finite), d):  # a CPU-GPU sync point
            return
        raise NonFiniteLossError(f"the loss became NaN or inf before step {step}; stopping without saving. "
                                 f"The last good checkpoint is {run_dir / 'checkpoints' / ckpt.LAST} (if any). "
                                 "Try a lower optim.lr, train.precision=fp32, or a different seed, then --resume.")

    def save(step: int) -> None:
        check_finite(step)
        rngs = D.gather_objects(rng_state(device), d)
        if not d.is_main:
            return
        payload = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                   "data": data.train.state_dict(), "rng": rngs, "evals": evals, "config": to_dict(cfg),
                   "git_commit": git_commit(), "world_size": d.world_size}
        if scaler is not None:
            payload["scaler"] = scaler.state_dict()
        if not ckpt.all_finite(payload["model"].values()):
            raise NonFiniteLossError(f"the weights hold NaN or inf at step {step}; the last good checkpoint is kept")
        ckpt.save_atomic(payload, run_dir / "checkpoints" / ckpt.LAST)

    def evaluate(step: int) -> dict:
        totals = D.sum_tensor(error_counts(net, data.eval_batches("test"), autocast), d)
        result = {"step": step, **errors_from_counts(totals)}
        if data.num_classes <= 10:
            result.pop("top5_error")
        evals.append(result)
        log.write("eval", step, {k: v for k, v in result.items() if k != "step"})
        return result

    net.train()
    for step in range(start, schedule.total_steps):
        lr = learning_rate(step, cfg.optim, schedule.total_steps, schedule.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        weight = consistency_weight(step, cfg.method.consistency_weight, cfg.method.consistency_rampup)
        stats = train_step(forwards, net, optimizer, next(data.train), method=cfg.method,
                           num_classes=data.num_classes, lr=lr, consistency_weight=weight,
                           precision=cfg.train.precision, scaler=scaler, reduce_grad=reduce_grad,
                           world_size=d.world_size, before_backward=track_finite)
        for k, v in stats.items():
            sums[k] = sums[k] + v.float() if k in sums else v.float()
        count += 1
        progress.update()
        done = step + 1

        if done % cfg.train.log_every == 0 or done == schedule.total_steps:
            check_finite(done)
            values = {k: v.item() / count for k, v in sums.items()}  # a CPU-GPU sync point
            elapsed = time.perf_counter() - tick
            values.update(lr=lr, consistency_weight=weight, pairs_per_s=count * global_batch / elapsed,
                          epoch=data.train.unlabeled_epoch)
            log.write("train", done, values)
            progress.report(done, f"loss {values['loss']:.4f} lr {lr:.4g} {values['pairs_per_s']:.0f} pairs/s")
            sums, count, tick = {}, 0, time.perf_counter()
        if done % cfg.train.eval_every == 0 or done == schedule.total_steps:
            result = evaluate(done)
            progress.report(done, f"test error {result['top1_error']:.4f}")
        if done % cfg.train.checkpoint_every == 0 or done == schedule.total_steps:
            save(done)
    progress.close()
    log.close()

    if not evals or evals[-1]["step"] != schedule.total_steps:
        evaluate(schedule.total_steps)
    summary = {**summarize_evals(evals, cfg.train.keep_last_evals), "steps": schedule.total_steps,
               "world_size": d.world_size, "num_labels": int(len(data.split.labeled)), "dataset": cfg.data.name,
               "model": cfg.model.name, "seed": cfg.seed, "meta": cfg.method.meta, "mixup": cfg.method.mixup,
               "unlabeled": cfg.method.unlabeled, "estimator": cfg.method.estimator, "git_commit": git_commit()}
    if d.is_main:
        (run_dir / "final.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
