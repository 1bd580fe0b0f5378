"""The training loop: data -> step -> logs, evaluations and checkpoints, resumable exactly."""
import gc
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn as nn

import mgssl
from mgssl import runfolder as rf
from mgssl.pipelines import build_data, check_global_batch
from mgssl.train import checkpoint as ckpt
from mgssl.train.backends import BackendFlags, backend_flags
from mgssl.train.compiling import compiled
from mgssl.train import distributed as D
from mgssl.train import rundir
from mgssl.train import run_state as rs
from mgssl.train.config import Config, OptimConfig, to_dict
from mgssl.train.ema import WeightsEMA
from mgssl.train.evaluate import error_counts, errors_from_counts
from mgssl.train.metrics import LogWindow, MetricsLog, Progress, summarize_evals
from mgssl.train.schedule import RunPlan, consistency_weight, learning_rate, plan
from mgssl.train.pseudo_labels import method_at
from mgssl.train.step import SeparateForwards, StepParts, autocast_for, train_step




class NonFiniteLossError(RuntimeError):
    pass


class RanksDivergedError(RuntimeError):
    pass


def source_checkout() -> Optional[Path]:
    """The source tree this code runs from (a checkout, or an editable install of one), or None for an
    install of a built package (`pip install .`, a wheel) in site-packages."""
    root = Path(mgssl.__file__).resolve().parent.parent
    return root if (root / "setup.cfg").is_file() else None


def git_commit(length: Optional[int] = None, root: Optional[Path] = None) -> Optional[str]:
    """The commit of the git checkout at `root` (default: the source tree this code runs from), its first
    `length` characters if given, with "-dirty" when tracked files have changed since; None where the
    code is not a git checkout of its own (an installed package, even inside another repository)."""
    root = root if root is not None else source_checkout()
    if root is None:
        return None
    short = [f"--short={length}"] if length else []
    try:
        top = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        if top.returncode != 0 or Path(top.stdout.strip()).resolve() != Path(root).resolve():
            return None
        out = subprocess.run(["git", "rev-parse", *short, "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def build_optimizer(net: nn.Module, optim: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch's SGD with one kernel for all tensors: fused on GPUs, foreach elsewhere."""
    impl = optim.implementation
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.SGD(net.parameters(), lr=optim.lr, momentum=optim.momentum,
                           nesterov=optim.nesterov, weight_decay=optim.weight_decay, **kwargs)


@dataclass
class Training:
    """What the loop works on: built once per start (or resume) of a run."""
    cfg: Config
    d: D.Dist
    data: object
    net: nn.Module
    forwards: nn.Module  # the network's forwards, wrapped by DDP on several ranks
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    reduce_grad: Optional[Callable]
    checkpoint_path: Path
    commit: Optional[str]  # None where the code is not a git checkout (an installed package)
    log: Optional[MetricsLog] = None
    evals: rs.EvalHistory = field(default_factory=rs.EvalHistory)
    finite: Optional[torch.Tensor] = None
    ema: Optional[WeightsEMA] = None  # train.ema: the average of the weights, evaluated and saved beside them
    window: LogWindow = field(init=False)
    rng: rs.RandomState = field(init=False)
    rank_buffers: rs.RankBuffers = field(init=False)
    step_parts: StepParts = field(init=False)  # what every step works with

    def __post_init__(self):
        self.window = LogWindow(self.d.device)
        self.rng = rs.RandomState(self.d)
        self.rank_buffers = rs.RankBuffers(self.net, self.d)
        self.step_parts = StepParts(self.forwards, self.net, self.optimizer, self.data.num_classes,
                                    precision=self.cfg.train.precision, scaler=self.scaler,
                                    reduce_grad=self.reduce_grad, world_size=self.d.world_size,
                                    before_backward=self.track_finite, compile_meta=self.cfg.train.compile)

    @property
    def best_checkpoint_path(self) -> Path:
        return self.checkpoint_path.with_name(rf.BEST)

    def track_finite(self, loss: torch.Tensor) -> None:
        self.finite = self.finite & torch.isfinite(loss.detach())  # stays on the device: no sync per step


def run(cfg: Config, run_dir: Path, *, resume: bool = False, argv: Optional[list[str]] = None,
        allow_schedule_change: bool = False) -> dict:
    """Train `cfg` into `run_dir`; returns the final summary (also written to final.json). Raises
    rundir.RunStopped after a stop signal, once the checkpoint is written."""
    # The switches first: cuBLAS reads its deterministic workspace setting when first used.
    with backend_flags(BackendFlags.of(cfg.train)) as flags:
        d = D.setup(cfg.train.device)
        try:
            check_global_batch(cfg.data, d.world_size)  # before the run folder is touched
            if cfg.train.sync_bn and d.enabled and d.device.type != "cuda":
                raise ValueError("train.sync_bn=true needs GPUs (torch's SyncBatchNorm does not run on CPUs); "
                                 "set train.sync_bn=false for CPU runs")
            run_dir = Path(run_dir)
            with rundir.held(run_dir, d):
                return _run(cfg, run_dir, resume, argv or [], d, allow_schedule_change, flags)
        finally:
            D.teardown()


def _run(cfg: Config, run_dir: Path, resume: bool, argv: list[str], d: D.Dist, allow_schedule_change: bool,
         flags: dict) -> dict:
    state = rundir.resume_state(run_dir, resume, cfg, d)
    start = int(state[rs.STEP]) if state is not None else 0
    rs.seed_everything(cfg.seed * 1000 + d.rank)  # dropout masks and mixup λ differ per rank
    data = build_data(rundir.data_config(cfg.data, run_dir, state), seed=cfg.seed, device=d.device, rank=d.rank,
                      world_size=d.world_size, run_dir=run_dir)
    if state is not None:
        rundir.check_resume_schedule(state[rs.CONFIG], cfg, start, data.unlabeled_size, allow_schedule_change)
        rundir.check_same_train_set(state, data.split, run_dir)
    t = build_training(cfg, d, data, run_dir)
    if state is not None:
        restore(t, state)
    state = None  # free the host copy of the weights before training
    schedule = plan(cfg, data.unlabeled_size)
    rundir.write_start_files(run_dir, cfg, argv, d, start, data.split, t.commit, flags)  # the run really starts here
    with rundir.StopSignals(d) as stop, setup_out_of_collector():
        train_loop(t, schedule, start, stop, MetricsLog(run_dir, cfg.train.tensorboard, enabled=d.is_main,
                                                        resume_step=start))
        if not t.evals or t.evals[-1]["step"] != schedule.total_steps:
            evaluate(t, schedule.total_steps)
        summary = summarize(t, schedule)
        rundir.write_final(run_dir, summary, d)
    return summary


@contextmanager
def setup_out_of_collector():
    """Python's cyclic garbage collector leaves the objects made so far (file lists, modules) alone inside."""
    gc.collect()
    gc.freeze()  # a full collection over them stalled batches 0.2 s on CIFAR-10's 50,000 files (docs/PERF.md)
    try:
        yield
    finally:
        gc.unfreeze()


def train_loop(t: Training, schedule: RunPlan, start: int, stop: rundir.StopSignals, log: MetricsLog) -> None:
    cfg, total = t.cfg, schedule.total_steps
    progress = Progress(total, start, enabled=t.d.is_main and cfg.train.progress)
    t.log = log
    t.window.restart_timer()  # the speed is that of the steps below, not of the set-up before them
    try:
        t.net.train()
        for step in range(start, total):
            lr = learning_rate(step, cfg.optim, total, schedule.warmup_steps)
            weight = consistency_weight(step, cfg.method.consistency_weight, cfg.method.consistency_rampup)
            t.window.add(one_step(t, lr, weight, step))
            progress.update()
            done = step + 1
            if done % cfg.train.log_every == 0 or done == total:
                log_window(t, done, lr, weight, progress)
            if done % cfg.train.eval_every == 0 or done == total:
                progress.report(done, f"test error {evaluate(t, done)['top1_error']:.4f}")
            saved = done % cfg.train.checkpoint_every == 0 or done == total
            if saved:
                save(t, done)
            signal_name = stop.agreed()  # every rank gets the same answer at the same step
            if signal_name and done < total:
                if not saved:
                    save(t, done, off_schedule=True)
                raise rundir.RunStopped(signal_name, done, total, t.checkpoint_path)
    finally:
        progress.close()
        log.close()


def build_training(cfg: Config, d: D.Dist, data, run_dir: Path) -> Training:
    net = cfg.model.build(data.num_classes, data.in_channels).to(d.device)
    if cfg.train.sync_bn and d.enabled:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    optimizer = build_optimizer(net, cfg.optim, d.device)
    scaler = torch.amp.GradScaler(d.device.type) if cfg.train.precision == "fp16" else None
    forwards = training_forwards(net, cfg, d)
    wire = torch.bfloat16 if cfg.method.grad_reduce_dtype == "bf16" else None
    reduce_grad = ((lambda g: D.start_average_grads(g, d.world_size, wire)) if (d.enabled and cfg.method.allreduce_grad)
                   else None)
    ema = WeightsEMA(net, cfg.train.ema) if cfg.train.ema is not None else None
    return Training(cfg, d, data, net, forwards, optimizer, scaler, reduce_grad,
                    checkpoint_path=run_dir / rf.CHECKPOINT, commit=git_commit(),
                    finite=torch.ones((), dtype=torch.bool, device=d.device), ema=ema)


def training_forwards(net: nn.Module, cfg: Config, d: D.Dist) -> nn.Module:
    """The network's train-mode forwards as the step calls them: SeparateForwards, wrapped by DDP on
    several ranks, then compiled. DDP goes inside torch.compile, as torch documents: its graph is then
    split at the gradient buckets' boundaries (DDPOptimizer), so each bucket's all-reduce starts while
    the rest of the backward runs; a compiled module inside DDP would make the backward one op."""
    forwards: nn.Module = SeparateForwards(net)
    if d.enabled:
        # DDP copies rank 0's weights to every rank here and averages the gradients of each backward.
        forwards = nn.parallel.DistributedDataParallel(
            forwards, device_ids=[d.device.index] if d.device.type == "cuda" else None, **ddp_options(cfg))
    return compiled(forwards, cfg.train.compile)


def ddp_options(cfg: Config) -> dict:
    """DDP's switches. Gradients live in the all-reduce buckets (no copy in or out). Under SyncBatchNorm
    every rank computes the same running statistics, so DDP's broadcast of rank 0's buffers before each
    forward is redundant and is left out; without it, ranks' statistics differ and the meta part (eval
    mode) reads them, so the broadcast stays.

    static_graph: every step makes one DDP forward of the same inputs (their number is fixed by the
    config, not the step: the ramp's zero weight still multiplies the consistency loss) through which
    every parameter gets a gradient; the fp32 meta window and the meta passes use the plain network,
    outside DDP. DDP then fixes its bucket order after the first step and skips the per-step search."""
    return {"gradient_as_bucket_view": True, "broadcast_buffers": not cfg.train.sync_bn, "static_graph": True}


def restore(t: Training, state: dict) -> None:
    try:
        rs.load(t, state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ckpt.CheckpointError(f"{t.checkpoint_path} does not fit this run ({first[:200]}); it is damaged or was "
                                   "saved by other code: restore it from a copy, or start a new run in another "
                                   "--out folder") from None


def one_step(t: Training, lr: float, weight: float, step: int) -> dict:
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    batch = next(t.data.train)
    if t.cfg.model.channels_last:  # a no-op for the pipelines that already deliver NHWC memory
        batch = tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in batch)
    stats = train_step(t.step_parts, batch, method=method_at(t.cfg.method, step), lr=lr, consistency_weight=weight)
    if t.ema is not None:
        t.ema.update(t.net)
    if hasattr(t.data.train, "prefetch"):  # GPU pipelines: the next batch is made while this step runs
        t.data.train.prefetch()
    return stats


def log_window(t: Training, done: int, lr: float, weight: float, progress: Progress) -> None:
    all_finite, values = t.window.read(t.finite)  # the one host-device sync
    stop_if_not_finite(t, done, all_finite)
    pairs_per_s = t.window.steps_per_s() * t.cfg.data.batch_size
    values.update(lr=lr, consistency_weight=weight, pairs_per_s=pairs_per_s, images_per_s=2 * pairs_per_s,
                  epoch=t.data.train.unlabeled_epoch)
    if t.scaler is not None:
        values["loss_scale"] = t.scaler.get_scale()
    write_log(t, "train", done, values)
    progress.report(done, f"loss {values['loss']:.4f} lr {lr:.4g} {values['images_per_s']:.0f} img/s")
    t.window.reset()


def write_log(t: Training, kind: str, step: int, values: dict) -> None:
    """A record of metrics.jsonl (rank 0 writes it); a failed write stops every rank together."""
    error = t.log.write(kind, step, values)
    stop_all_ranks_on(error, t.d, rf.RunFileError(f"rank 0 could not write {rf.METRICS}; see its message"))


def stop_all_ranks_on(error: Optional[Exception], d: D.Dist, elsewhere: Exception) -> None:
    """Raise on every rank if rank 0's write failed: `error` there, `elsewhere` on the other ranks."""
    if D.any_rank(error is not None, d):  # every rank stops together, not just the one that failed
        raise error if error is not None else elsewhere


def stop_if_not_finite(t: Training, step: int, all_finite: Optional[bool] = None) -> None:
    bad = not (bool(t.finite) if all_finite is None else all_finite)  # bool(t.finite): a host-device sync
    if not D.any_rank(bad, t.d):
        return
    kept = (f"The last good checkpoint, {t.checkpoint_path}, is kept" if t.checkpoint_path.is_file()
            else "No checkpoint had been written yet")
    raise NonFiniteLossError(f"the training loss became NaN or inf at or before step {step}; stopping without "
                             f"saving. {kept}. Try a lower optim.lr, train.precision=fp32 or another seed; "
                             "--resume continues from the checkpoint.")


def align_buffers(t: Training) -> None:
    # Each rank updates BatchNorm statistics from its own shard; evaluate and save rank 0's.
    if t.d.enabled and not t.cfg.train.sync_bn:
        D.broadcast_buffers(t.net)


def save(t: Training, step: int, off_schedule: bool = False) -> None:
    """A checkpoint at `step`. One the schedule does not hold (a stop signal's) leaves every rank's
    BatchNorm statistics as they are and saves them all: aligning them here, where an uninterrupted
    run does not, would change the rest of the run."""
    stop_if_not_finite(t, step)
    keep_rank_buffers = off_schedule and t.d.enabled and not t.cfg.train.sync_bn
    if not keep_rank_buffers:
        align_buffers(t)
    payload = {**rs.collect(t, leave_out=() if keep_rank_buffers else (rs.RANK_BUFFERS,)), **rs.facts(t, step)}
    error: Optional[Exception] = None
    if t.d.is_main:
        try:
            if not ckpt.all_finite(ckpt.tensors_of(payload[rs.MODEL], payload[rs.OPTIMIZER])):
                raise NonFiniteLossError(f"the weights or optimiser state hold NaN or inf at step {step}; "
                                         f"not saving over the last good checkpoint {t.checkpoint_path}")
            ckpt.save_atomic(payload, t.checkpoint_path)
        except (ckpt.CheckpointError, NonFiniteLossError) as e:
            error = e
    stop_all_ranks_on(error, t.d, ckpt.CheckpointError(f"rank 0 could not write {t.checkpoint_path}; see its message"))


def _errors(t: Training, net: nn.Module, subset: str, autocast) -> dict:
    return errors_from_counts(D.sum_tensor(error_counts(net, t.data.eval_batches(subset), autocast), t.d))


def evaluate(t: Training, step: int) -> dict:
    """The test error (and top-5, loss); with a validation set its error, which picks best.pt; with
    train.ema the same errors of the averaged weights (ema_*)."""
    stop_if_not_finite(t, step)
    align_buffers(t)
    autocast = autocast_for(t.d.device, t.cfg.train.precision)
    has_validation = len(t.data.split.validation) > 0
    result = {"step": step, **_errors(t, t.net, "test", autocast)}
    if has_validation:
        val = _errors(t, t.net, "validation", autocast)
        result.update(val_error=val["top1_error"], val_loss=val["test_loss"])
    if t.ema is not None:
        if t.d.enabled and not t.cfg.train.sync_bn:
            D.broadcast_buffers(t.ema.module)  # each rank averaged its own BatchNorm statistics
        ema = _errors(t, t.ema.module, "test", autocast)
        result.update(ema_top1_error=ema["top1_error"], ema_test_loss=ema["test_loss"])
        if has_validation:
            result["ema_val_error"] = _errors(t, t.ema.module, "validation", autocast)["top1_error"]
    if t.data.num_classes <= 10:
        result.pop("top5_error")
    best_so_far = min((e["val_error"] for e in t.evals if "val_error" in e), default=float("inf"))
    t.evals.append(result)
    if t.log is not None:
        write_log(t, "eval", step, {k: v for k, v in result.items() if k != "step"})
    if has_validation and result["val_error"] < best_so_far:
        save_best(t, result)
    return result


def save_best(t: Training, result: dict) -> None:
    """checkpoints/best.pt: the weights of the evaluation with the lowest validation error so far
    (the first of equal ones), with what predicting and exporting need."""
    error: Optional[Exception] = None
    if t.d.is_main:
        payload = {rs.MODEL: t.net.state_dict(), rs.STEP: result["step"], rs.CONFIG: to_dict(t.cfg),
                   rs.CLASSES: rs.class_names(t.data), rs.VAL_ERROR: result["val_error"],
                   rs.TEST_ERROR: result["top1_error"], rs.GIT_COMMIT: t.commit}
        try:
            ckpt.save_atomic(payload, t.best_checkpoint_path)
        except ckpt.CheckpointError as e:
            error = e
    stop_all_ranks_on(error, t.d,
                      ckpt.CheckpointError(f"rank 0 could not write {t.best_checkpoint_path}; see its message"))


def summarize(t: Training, schedule: RunPlan) -> dict:
    align_buffers(t)
    fingerprints = D.gather_objects(ckpt.fingerprint(t.net.state_dict()), t.d)
    if len(set(fingerprints)) != 1:
        raise RanksDivergedError(f"the ranks ended with different weights ({fingerprints}); "
                                 "this is a bug in the distributed set-up")
    cfg, data = t.cfg, t.data
    return {**summarize_evals(t.evals, cfg.train.keep_last_evals), "steps": schedule.total_steps,
            "world_size": t.d.world_size, "num_labels": int(len(data.split.labeled)), "dataset": cfg.data.name,
            "model": cfg.model.name, "seed": cfg.seed, "meta": cfg.method.meta, "mixup": cfg.method.mixup,
            "unlabeled": cfg.method.unlabeled, "estimator": cfg.method.estimator,
            "mgssl_version": mgssl.__version__, "git_commit": t.commit,
            "precision": cfg.train.precision, "global_batch": cfg.data.batch_size,
            "epochs": round(data.train.unlabeled_epoch, 4), "weights_sha256": fingerprints[0],
            "weights_sha256_per_rank": fingerprints, "classes": rs.class_names(data),
            **kept_model_summary(t.evals, t.ema is not None)}


def kept_model_summary(evals: list[dict], ema: bool) -> dict:
    """final.json's numbers of best.pt (picked on the validation set) and of the averaged weights."""
    out: dict = {}
    with_val = [e for e in evals if "val_error" in e]
    if with_val:
        best = min(with_val, key=lambda e: e["val_error"])  # the first of equal errors, as best.pt keeps
        out.update(val_error=with_val[-1]["val_error"], best_val_error=best["val_error"], best_val_step=best["step"],
                   best_val_test_error=best["top1_error"], best_checkpoint=rf.BEST_CHECKPOINT)
    if ema and evals and "ema_top1_error" in evals[-1]:
        out["ema_test_error"] = evals[-1]["ema_top1_error"]
        if "ema_val_error" in evals[-1]:
            out["ema_val_error"] = evals[-1]["ema_val_error"]
    return out
