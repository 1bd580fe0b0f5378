"""The training loop: data -> step -> logs, evaluations and checkpoints, resumable exactly."""
import json
import math
import os
import platform
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import yaml

from pipelines import build_data, check_global_batch
from train import checkpoint as ckpt
from train import distributed as D
from train.config import Config, OptimConfig, config_diff, to_dict
from train.evaluate import error_counts, errors_from_counts
from train.meta import resolve_estimator
from train.metrics import MetricsLog, Progress, summarize_evals
from train.schedule import consistency_weight, learning_rate
from train.step import SeparateForwards, autocast_for, train_step

# Keys a resumed run may change: they do not alter what is trained.
RESUMABLE_CHANGES = ("train.steps", "train.epochs", "train.eval_every", "train.log_every",
                     "train.checkpoint_every", "train.keep_last_evals", "train.progress", "train.tensorboard",
                     "train.compile", "data.root", "data.workers", "data.eval_batch_size")


class NonFiniteLossError(RuntimeError):
    pass


class RanksDivergedError(RuntimeError):
    pass


def git_commit(length: Optional[int] = None) -> str:
    """The checkout's commit hash (its first `length` characters if given), "-dirty" when tracked files
    have changed since, or "unknown" outside a git checkout."""
    here = Path(__file__).resolve().parent.parent
    short = [f"--short={length}"] if length else []
    try:
        out = subprocess.run(["git", "rev-parse", *short, "HEAD"], cwd=here, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def build_optimizer(net: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch's SGD with one kernel for all tensors: fused on GPUs, foreach elsewhere."""
    impl = optim.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.SGD(net.parameters(), lr=optim.lr, momentum=optim.momentum,
                           nesterov=optim.nesterov, weight_decay=optim.weight_decay, **kwargs)


# ---------------------------------------------------------------------------------------------
# Random state: torch (CPU and CUDA), numpy and Python, as tensors and plain values so that the
# checkpoint still loads with torch.load(weights_only=True).


def rng_state(device: torch.device) -> dict:
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {"cpu": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [np_kind, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                       float(np_gauss)]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in state:
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


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


def _launch_command(argv: list[str]) -> str:
    """The command as typed, as near as the process can tell (torchrun shows up in its environment)."""
    cmd = [Path(sys.executable).name, "-m", "train", *argv]
    if "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_WORLD_SIZE" in os.environ:
        cmd = ["torchrun", f"--nnodes={os.environ.get('GROUP_WORLD_SIZE', '?')}",
               f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', '?')}",
               f"--max-restarts={os.environ.get('TORCHELASTIC_MAX_RESTARTS', '0')}", "-m", "train", *argv]
    return " ".join(cmd)


def run_estimator(cfg: Config) -> str:
    """The estimator the run's meta steps use (`method.estimator=auto` resolved by train.precision)."""
    return resolve_estimator(cfg.method.estimator, cfg.train.precision != "fp32")


def _write_run_files(run_dir: Path, cfg: Config, argv: list[str], d: D.Dist, resumed_from: int) -> None:
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    info = {"command": _launch_command(argv), "argv": argv, "git_commit": git_commit(),
            "estimator": run_estimator(cfg),
            "world_size": d.world_size, "global_batch": cfg.data.batch_size,
            "batch_per_process": cfg.data.batch_size // d.world_size, "device": str(d.device), "torch": torch.__version__,
            "python": platform.python_version(), "host": socket.gethostname(), "pid": os.getpid(),
            "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), "resumed_from_step": resumed_from,
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    with open(run_dir / "runs.jsonl", "a") as f:  # one line per start, resume or restart
        f.write(json.dumps(info) + "\n")


def _with_resolved_estimator(config: dict) -> dict:
    """A config dict whose method.estimator names what runs, so that `auto` and the estimator it
    resolves to count as the same setting on resume."""
    method, train = config.get("method", {}), config.get("train", {})
    estimator = resolve_estimator(method.get("estimator", "auto"), train.get("precision", "fp32") != "fp32")
    return {**config, "method": {**method, "estimator": estimator}}


def _check_resume_config(saved: dict, cfg: Config) -> None:
    changes = [c for c in config_diff(_with_resolved_estimator(saved), _with_resolved_estimator(to_dict(cfg)))
               if not c.startswith(RESUMABLE_CHANGES)]
    if changes:
        raise ValueError("the config differs from the one the run was started with:\n  " + "\n  ".join(changes) +
                         "\nResume with the original settings, or start a new run in another --out folder.")


def run(cfg: Config, run_dir: Path, *, resume: bool = False, argv: Optional[list[str]] = None) -> dict:
    """Train `cfg` into `run_dir`; returns the final summary (also written to final.json)."""
    d = D.setup(cfg.train.device)
    try:
        check_global_batch(cfg.data, d.world_size)  # before the run folder is touched
        if cfg.train.sync_bn and d.enabled and d.device.type != "cuda":
            raise ValueError("train.sync_bn=true needs GPUs (torch's SyncBatchNorm does not run on CPUs); "
                             "set train.sync_bn=false for CPU runs")
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
    start = int(state["step"]) if state is not None else 0
    starts = D.gather_objects(start, d)
    if len(set(starts)) != 1:
        raise ValueError(f"the ranks found different checkpoints in {run_dir} (steps {starts}): --out must be a "
                         "folder on a file system that every node shares")
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_run_files(run_dir, cfg, argv, d, start)
        if resume and state is None:
            print(f"no checkpoint in {run_dir}; starting a new run", file=sys.stderr)

    seed_everything(cfg.seed * 1000 + d.rank)  # dropout masks and mixup λ differ per rank
    data = build_data(cfg.data, seed=cfg.seed, device=device, rank=d.rank, world_size=d.world_size, run_dir=run_dir)
    net = cfg.model.build(data.num_classes, data.in_channels).to(device)
    if cfg.train.sync_bn and d.enabled:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    optimizer = build_optimizer(net, cfg.optim, device)
    scaler = torch.amp.GradScaler(device.type) if cfg.train.precision == "fp16" else None
    forwards: nn.Module = SeparateForwards(torch.compile(net) if cfg.train.compile else net)
    if d.enabled:
        # DDP copies rank 0's weights to every rank here and averages the gradients of each backward.
        forwards = nn.parallel.DistributedDataParallel(forwards, device_ids=[device.index] if device.type == "cuda" else None)
    reduce_grad = (lambda g: D.average_grads(g, d.world_size)) if (d.enabled and cfg.method.allreduce_grad) else None
    schedule = plan(cfg, data.unlabeled_size)
    channels_last = cfg.model.channels_last

    evals: list[dict] = []
    if state is not None:
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        data.train.load_state_dict(state["data"])
        evals = list(state["evals"])
        rngs = state["rng"]
        if len(rngs) == d.world_size:
            set_rng_state(rngs[d.rank], device)
        elif d.is_main:
            print(f"resuming on {d.world_size} processes from a checkpoint of {len(rngs)}: dropout and mixup "
                  "draws will differ from an uninterrupted run", file=sys.stderr)

    sums: dict[str, torch.Tensor] = {}  # per statistic: its sum over the steps of the logging window
    seen: dict[str, int] = {}  # per statistic: how many of those steps reported it (a ramp's first has no consistency)
    count = 0
    if state is not None and "log_window" in state:
        count = int(state["log_window"]["count"])
        sums = {k: v.to(device) for k, v in state["log_window"]["sums"].items()}
        seen = {k: int(state["log_window"].get("seen", {}).get(k, count)) for k in sums}
    state = None  # free the host copy of the weights before training
    log = MetricsLog(run_dir, cfg.train.tensorboard, enabled=d.is_main, resume_step=start)
    progress = Progress(schedule.total_steps, start, enabled=d.is_main and cfg.train.progress)
    autocast = autocast_for(device, cfg.train.precision)
    finite = torch.ones((), dtype=torch.bool, device=device)
    tick = time.perf_counter()
    global_batch = cfg.data.batch_size
    checkpoint_path = run_dir / "checkpoints" / ckpt.LAST
    commit = git_commit()

    def track_finite(loss: torch.Tensor) -> None:
        nonlocal finite
        finite = finite & torch.isfinite(loss.detach())  # stays on the device: no sync per step

    def stop_if_not_finite(step: int) -> None:
        bad = not bool(finite)  # a CPU-GPU sync point
        if not D.any_rank(bad, d):
            return
        kept = (f"The last good checkpoint, {checkpoint_path}, is kept" if checkpoint_path.is_file()
                else "No checkpoint had been written yet")
        raise NonFiniteLossError(f"the training loss became NaN or inf at or before step {step}; stopping without "
                                 f"saving. {kept}. Try a lower optim.lr, train.precision=fp32 or another seed; "
                                 "--resume continues from the checkpoint.")

    def align_buffers() -> None:
        # Each rank updates BatchNorm statistics from its own shard; evaluate and save rank 0's.
        if d.enabled and not cfg.train.sync_bn:
            D.broadcast_buffers(net)

    def save(step: int) -> None:
        stop_if_not_finite(step)
        align_buffers()
        rngs = D.gather_objects(rng_state(device), d)
        error: Optional[Exception] = None
        if d.is_main:
            payload = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                       "data": data.train.state_dict(), "rng": rngs, "evals": evals, "config": to_dict(cfg),
                       "git_commit": commit, "world_size": d.world_size}
            if scaler is not None:
                payload["scaler"] = scaler.state_dict()
            # The partial logging window, so the first line logged after a resume averages the same steps.
            payload["log_window"] = {"count": count, "seen": seen,
                                     "sums": {k: v.detach().cpu() for k, v in sums.items()}}
            try:
                if not ckpt.all_finite(ckpt.tensors_of(payload["model"], payload["optimizer"])):
                    raise NonFiniteLossError(f"the weights or optimiser state hold NaN or inf at step {step}; "
                                             f"not saving over the last good checkpoint {checkpoint_path}")
                ckpt.save_atomic(payload, checkpoint_path)
            except (ckpt.CheckpointError, NonFiniteLossError) as e:
                error = e
        if D.any_rank(error is not None, d):  # every rank stops together, not just the one that failed
            raise error if error is not None else ckpt.CheckpointError(
                f"rank 0 could not write {checkpoint_path}; see its message")

    def evaluate(step: int) -> dict:
        stop_if_not_finite(step)
        align_buffers()
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
        batch = next(data.train)
        if channels_last:  # a no-op for the pipelines that already deliver NHWC memory
            batch = tuple(t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t for t in batch)
        stats = train_step(forwards, net, optimizer, batch, method=cfg.method,
                           num_classes=data.num_classes, lr=lr, consistency_weight=weight,
                           precision=cfg.train.precision, scaler=scaler, reduce_grad=reduce_grad,
                           world_size=d.world_size, before_backward=track_finite,
                           compile_meta=cfg.train.compile)
        for k, v in stats.items():
            sums[k] = sums[k] + v.float() if k in sums else v.float()
            seen[k] = seen.get(k, 0) + 1
        count += 1
        progress.update()
        done = step + 1

        if done % cfg.train.log_every == 0 or done == schedule.total_steps:
            stop_if_not_finite(done)
            values = {k: v.item() / seen[k] for k, v in sums.items()}  # a CPU-GPU sync point
            elapsed = time.perf_counter() - tick
            pairs_per_s = count * global_batch / elapsed
            values.update(lr=lr, consistency_weight=weight, pairs_per_s=pairs_per_s, images_per_s=2 * pairs_per_s,
                          epoch=data.train.unlabeled_epoch)
            if scaler is not None:
                values["loss_scale"] = scaler.get_scale()
            log.write("train", done, values)
            progress.report(done, f"loss {values['loss']:.4f} lr {lr:.4g} {values['images_per_s']:.0f} img/s")
            sums, seen, count, tick = {}, {}, 0, time.perf_counter()
        if done % cfg.train.eval_every == 0 or done == schedule.total_steps:
            result = evaluate(done)
            progress.report(done, f"test error {result['top1_error']:.4f}")
        if done % cfg.train.checkpoint_every == 0 or done == schedule.total_steps:
            save(done)
    progress.close()
    log.close()

    if not evals or evals[-1]["step"] != schedule.total_steps:
        evaluate(schedule.total_steps)
    align_buffers()
    fingerprints = D.gather_objects(ckpt.fingerprint(net.state_dict()), d)
    if len(set(fingerprints)) != 1:
        raise RanksDivergedError(f"the ranks ended with different weights ({fingerprints}); "
                                 "this is a bug in the distributed set-up")
    summary = {**summarize_evals(evals, cfg.train.keep_last_evals), "steps": schedule.total_steps,
               "world_size": d.world_size, "num_labels": int(len(data.split.labeled)), "dataset": cfg.data.name,
               "model": cfg.model.name, "seed": cfg.seed, "meta": cfg.method.meta, "mixup": cfg.method.mixup,
               "unlabeled": cfg.method.unlabeled, "estimator": run_estimator(cfg), "git_commit": commit,
               "precision": cfg.train.precision, "global_batch": global_batch,
               "epochs": round(data.train.unlabeled_epoch, 4), "weights_sha256": fingerprints[0],
               "weights_sha256_per_rank": fingerprints}
    if d.is_main:
        (run_dir / "final.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
