"""One command for the first GPU: does every CUDA path run, and how fast is it?

    python -m mgssl.tools.gpu_check --out runs/gpu-check --cifar data/cifar10
    python -m mgssl.tools.gpu_check --dry-run --out /tmp/gpu-check     # the same checks on the CPU, tiny sizes

Prints one table and writes it to OUT/gpu_check.md (with OUT/gpu_check.json):

1. the CUDA test subset (`pytest -m cuda`);
2. host syncs per training step of every Table-4 row, under torch.cuda.set_sync_debug_mode("warn"),
   and through the engine's own step (data, prefetch, DDP on one process, g's all-reduce);
3. fidelity of ∇ỹ under bf16 and fp16 (cosine to float64) for the three paper networks, and
   tools.fidelity's own report where that module exists;
4. tools.bench: Conv-Large 128+128 bf16 channels_last eager, ResNet-18 at 224 px (also with its
   meta part in fp32, method.meta_precision=fp32), and Conv-Large with train.compile=reduce-overhead
   (CUDA graphs), with steps/s, ratio to supervised, MFU and peak memory against the goals;
5. a short real CIFAR-10 run (--cifar: a folder holding cifar-10-batches-py/) with its steps/s, and
   a deterministic run stopped half way and resumed, compared bit for bit with one that was not;
6. one-process NCCL collectives (the calls a torchrun job makes).

Sized for at most 8 minutes on one H100/H200 with torch and torchvision; DALI (the ImageNet reader)
is not checked here. A check that would not finish inside --budget-s is skipped and says so. With
--dry-run every check runs on the CPU at tiny sizes (digits network, gloo), in about a minute."""
import argparse
import importlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import asdict, dataclass
from io import StringIO
from pathlib import Path
from typing import Callable, Optional

import torch

import mgssl
from mgssl import runfolder as rf
from mgssl.train.distributed import Dist

# The folder that holds the mgssl package: the source checkout (with tests/), or site-packages for an install.
REPO = Path(mgssl.__file__).resolve().parent.parent
# Goals on one H100/H200 (docs/PERF.md); the benchmark's, not the tests'.
GOAL_STEPS_PER_S = 111.0  # Conv-Large 128+128 bf16: the paper's 400k-step CIFAR run in under an hour
GOAL_RATIO = 4.2
GOAL_FIDELITY = 0.999


# What a --dry-run does not exercise, said in its table's header.
DRY_RUN_GAPS = ("; and, in this --dry-run, every CUDA path: the CUDA tests (skipped), CUDA's own sync counter (host "
                "syncs counted by train.host_syncs instead), autocast on a GPU, cuDNN, NCCL (gloo instead), "
                "torch.compile and CUDA graphs; in the engine step's sync count, the prefetch of the next batch "
                "on its side stream (CPU runs have none), NCCL's all-reduce of g and of DDP's buckets, "
                "and the bf16 meta part")


@dataclass
class Row:
    check: str
    setting: str
    result: str
    goal: str = ""
    status: str = "ok"  # ok | FAIL | missed | skipped | report (a measurement with no pass mark)
    seconds: float = 0.0


@dataclass
class Plan:
    """What each check runs: the GPU sizes, or tiny CPU ones under --dry-run."""
    device: torch.device
    dry_run: bool
    bench_model: str
    bench_batch: int
    bench_steps: int
    resnet_batch: int
    resnet_size: int
    fidelity_models: tuple
    sync_model: str
    sync_batch: int
    run_config: str
    run_steps: int

    @classmethod
    def of(cls, dry_run: bool) -> "Plan":
        if dry_run:
            return cls(torch.device("cpu"), True, "digits_cnn", 4, 2, 2, 32, (("digits_cnn", 4, 8),), "digits_cnn",
                       8, "digits", 8)
        return cls(torch.device("cuda"), False, "convlarge", 128, 100, 128, 224,
                   (("convlarge", 32, 32), ("shakeshake26", 16, 32), ("resnet18", 8, 224)), "convlarge", 128,
                   "convlarge_cifar10_4k", 400)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mgssl gpu-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="folder for gpu_check.md/.json and runs")
    p.add_argument("--dry-run", action="store_true", help="the same checks on the CPU at tiny sizes")
    p.add_argument("--cifar", type=Path, default=None,
                   help="data.root of CIFAR-10 (holding cifar-10-batches-py/) for the real run; without it "
                        "that check is skipped (--dry-run uses scikit-learn's digits instead)")
    p.add_argument("--budget-s", type=float, default=480.0, help="stop starting checks after this many seconds")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA device is visible to torch; run on a GPU machine, or pass --dry-run for the CPU rehearsal")
    return args


# ---------------------------------------------------------------------------------------------
# Running a tool: in its own process on the GPU (a crash or a leak stays there), in this one under
# --dry-run (a second Python start costs more than the tiny check itself).


def run_module(module: str, argv: list[str], *, isolate: bool, timeout: float, env: Optional[dict] = None) -> tuple[int, str]:
    if isolate:
        full_env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                    **(env or {})}
        try:
            done = subprocess.run([sys.executable, "-m", module, *argv], cwd=REPO, env=full_env, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            return 124, f"timed out after {timeout:.0f} s\n{(e.stdout or '')[-2000:]}"
        return done.returncode, done.stdout + done.stderr[-3000:]
    out, err = StringIO(), StringIO()
    main = importlib.import_module(module).main
    try:
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(argv)
        return (rc if isinstance(rc, int) else 0), out.getvalue() + err.getvalue()[-3000:]
    except SystemExit as e:
        return int(e.code or 0), out.getvalue() + err.getvalue()[-3000:]


def last_json(text: str) -> Optional[dict]:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


# ---------------------------------------------------------------------------------------------
# 1. The CUDA test subset


def check_cuda_tests(plan: Plan, timeout: float) -> list[Row]:
    # The rehearsal collects one file only: without a GPU every test in it is skipped anyway.
    if not (REPO / "tests").is_dir():
        return [Row("CUDA tests", "pytest -m cuda", "skipped: the tests ship with the source checkout, not with an "
                    "install; run this check from a checkout", status="skipped")]
    targets = ["tests/test_cuda.py"] if plan.dry_run else ["tests"]
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", *targets]
    try:
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        text, rc = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired:
        return [Row("CUDA tests", "pytest -m cuda", f"timed out after {timeout:.0f} s", status="FAIL")]
    summary = next((line for line in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed|skipped|error)", line)),
                   text.strip().splitlines()[-1] if text.strip() else "no output")
    failed = [line for line in text.splitlines() if line.startswith(("FAILED", "ERROR"))]
    status = "ok" if rc == 0 else "FAIL"
    if plan.dry_run and rc == 0:
        status = "skipped" if "skipped" in summary and "passed" not in summary else "ok"
    result = summary.strip("= ") + ("; " + "; ".join(f[:160] for f in failed[:6]) if failed else "")
    return [Row("CUDA tests", "pytest -m cuda" + (" (dry run: no GPU, all skip)" if plan.dry_run else ""), result,
                status=status)]


# ---------------------------------------------------------------------------------------------
# 2. Host syncs per step


TABLE4 = {"labeled only": dict(unlabeled=False, meta=False, mixup=False), "row 1": dict(meta=False, mixup=False),
          "row 2 (meta)": dict(mixup=False), "row 3 (mixup)": dict(meta=False), "row 4 (both)": dict()}


def count_syncs(step: Callable[[], None], device: torch.device, steps: int) -> int:
    """Host syncs made by `steps` calls of `step`: CUDA's own report on a GPU, train.host_syncs elsewhere."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for _ in range(steps):
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in seen)
    from mgssl.train.host_syncs import count_host_syncs

    with count_host_syncs() as counts:
        for _ in range(steps):
            step()
    return sum(v for k, v in counts.items() if k != "Tensor.item")  # .item() is also its aten read


def check_host_syncs(plan: Plan) -> list[Row]:
    from mgssl.model import build_model
    from mgssl.tools.bench import SHAPES, synthetic_batch
    from mgssl.train.config import MethodConfig, OptimConfig
    from mgssl.train.engine import build_optimizer
    from mgssl.train.step import StepParts, train_step

    classes, channels, side = SHAPES[plan.sync_model]
    precision = "fp32" if plan.dry_run else "bf16"
    rows, steps = [], 2 if plan.dry_run else 3
    for name, overrides in TABLE4.items():
        for estimator in ("fd", "jvp") if overrides.get("meta", True) else ("fd",):
            torch.manual_seed(0)
            net = build_model(plan.sync_model, classes, channels, channels_last=not plan.dry_run).to(plan.device).train()
            optimizer = build_optimizer(net, OptimConfig(lr=0.01), plan.device)
            batch = synthetic_batch(classes, channels, side, plan.sync_batch, plan.device, not plan.dry_run,
                                    torch.Generator().manual_seed(0))
            method = MethodConfig(estimator=estimator, **overrides)
            parts = StepParts.of(net, optimizer, classes, precision=precision)

            def step():
                train_step(parts, batch, method=method, lr=0.01, consistency_weight=1.0)

            step()  # first-call set-up is not a step
            syncs = count_syncs(step, plan.device, steps)
            label = name + ("" if "meta" not in name and "both" not in name else f", {estimator}")
            rows.append(Row("host syncs / step", f"{plan.sync_model} {plan.sync_batch}+{plan.sync_batch} {precision}, "
                            f"{label}", f"{syncs / steps:g}", "0", "ok" if syncs == 0 else "FAIL"))
    return rows


def engine_config(plan: Plan, root: Optional[Path]):
    """The config the engine-step count runs: the real run's on the GPU (CIFAR-10 where --cifar is
    given, else the digits), the digits in the dry run."""
    from mgssl.train.config import load_config

    settings = [f"train.device={plan.device.type}", "train.progress=false", "train.tensorboard=false"]
    if plan.dry_run or root is None:
        return load_config("digits", tuple(settings + ([] if plan.dry_run else ["train.precision=bf16"])))
    return load_config(plan.run_config, tuple(settings + [f"data.root={root}", "train.precision=bf16"]))


def check_engine_syncs(plan: Plan, root: Optional[Path], work: Path) -> list[Row]:
    """Host syncs per step of engine.one_step, the step training runs: the next batch (and on a GPU
    its prefetch), DDP around the forwards on a process group of one rank, g's all-reduce started and
    waited for, the optimiser; the same code a torchrun job runs, less the other ranks."""
    import torch.distributed as dist

    from mgssl.pipelines import build_data
    from mgssl.train import engine, run_state
    from mgssl.train.schedule import consistency_weight, learning_rate

    backend = "gloo" if plan.dry_run else "nccl"
    if dist.is_initialized():
        return [Row("host syncs / engine step", backend, "skipped: a process group already exists",
                    status="skipped")]
    cfg = engine_config(plan, root)
    setting = (f"engine.one_step, {cfg.data.name} {cfg.model.name} {cfg.train.precision}, DDP on 1 process "
               f"({backend}), g all-reduced{' in bf16' if cfg.method.grad_reduce_dtype == 'bf16' else ''}"
               f"{', prefetch' if plan.device.type == 'cuda' else ''}")
    device_id = torch.device("cuda", torch.cuda.current_device()) if plan.device.type == "cuda" else None
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
    try:
        d = OneRankAsMany(0, 1, 0, plan.device)
        run_dir = work / "engine-step"
        run_dir.mkdir(parents=True, exist_ok=True)
        run_state.seed_everything(cfg.seed)
        try:
            data = build_data(cfg.data, seed=cfg.seed, device=d.device, rank=0, world_size=1, run_dir=run_dir)
        except ImportError as e:  # the digits need scikit-learn
            return [Row("host syncs / engine step", setting, f"skipped: {e}; pass --cifar DIR", status="skipped")]
        t = engine.build_training(cfg, d, data, run_dir)
        t.net.train()
        done = [0]

        def step():
            i = done[0]
            engine.one_step(t, learning_rate(i, cfg.optim, cfg.train.steps, cfg.optim.warmup_steps),
                            consistency_weight(i, cfg.method.consistency_weight, cfg.method.consistency_rampup), i)
            done[0] += 1

        for _ in range(2):  # first-call set-up (and DDP's static-graph bucket rebuild) is not a step
            step()
        steps = 2 if plan.dry_run else 3
        syncs = count_syncs(step, plan.device, steps)
        if not any(isinstance(m, torch.nn.parallel.DistributedDataParallel) for m in t.forwards.modules()):
            return [Row("host syncs / engine step", setting, "the step ran without DDP", "0", "FAIL")]
        result = f"{syncs / steps:g}"
        if plan.device.type != "cuda":
            # DDP reads its host-side used-parameter map per parameter: not a sync, but counted as one here
            bookkeeping = ddp_bookkeeping_reads(t, cfg, plan.device, steps)
            syncs -= bookkeeping
            result = f"{syncs / steps:g} (besides {bookkeeping / steps:g} reads of DDP's host-side bookkeeping)"
        return [Row("host syncs / engine step", setting, result, "0", "ok" if syncs == 0 else "FAIL")]
    except Exception as e:  # a failing engine path is a finding, not the end of the check
        return [Row("host syncs / engine step", setting, f"error: {str(e).splitlines()[0][:200]}", "0", "FAIL")]
    finally:
        dist.destroy_process_group()


def ddp_bookkeeping_reads(t, cfg, device: torch.device, steps: int) -> int:
    """The reads a bare forward and backward of DDP (the engine's switches, `t`'s network) makes in `steps`
    steps, as train.host_syncs counts them."""
    import copy

    from mgssl.train.engine import ddp_options
    from mgssl.train.step import SeparateForwards

    net = copy.deepcopy(t.net)
    bare = torch.nn.parallel.DistributedDataParallel(SeparateForwards(net), **ddp_options(cfg))
    x = next(iter(t.data.eval_batches("test")))[0][:2].to(device)

    def step():
        sum(out.sum() for out in bare(x, x)).backward()

    for _ in range(2):
        step()
    return count_syncs(step, device, steps)


@dataclass
class OneRankAsMany(Dist):
    """One process that the engine treats as one of several: DDP and g's all-reduce on a group of one."""

    @property
    def enabled(self) -> bool:
        return True


# ---------------------------------------------------------------------------------------------
# 3. Fidelity


def check_fidelity(plan: Plan, timeout: float) -> list[Row]:
    from mgssl.model import build_model
    from mgssl.tools.bench import SHAPES, fidelity, synthetic_batch

    rows = []
    for model_name, batch_size, side in plan.fidelity_models:
        classes, channels, _ = SHAPES[model_name]
        torch.manual_seed(0)
        net = build_model(model_name, classes, channels, channels_last=not plan.dry_run).to(plan.device).train()
        batch = synthetic_batch(classes, channels, side, batch_size, plan.device, not plan.dry_run,
                                torch.Generator().manual_seed(0))
        for precision in ("bf16", "fp16"):
            try:
                cos = fidelity(net, batch, precision, plan.device, "eval")
            except Exception as e:  # a failing precision path is a finding, not the end of the check
                rows.append(Row("fidelity ∇ỹ", f"{model_name} {batch_size}+{batch_size} {side}px {precision}",
                                f"error: {str(e).splitlines()[0][:160]}", f"≥ {GOAL_FIDELITY}", "FAIL"))
                continue
            worst = min(cos.values())
            rows.append(Row("fidelity ∇ỹ", f"{model_name} {batch_size}+{batch_size} {side}px {precision}",
                            f"fd {cos['fd']:.6f}, jvp {cos['jvp']:.6f}", f"≥ {GOAL_FIDELITY}",
                            "ok" if worst >= GOAL_FIDELITY else "missed"))
    # fidelity is a property of the arithmetic, so tools.fidelity computes it on the CPU
    argv = ["--network", "convlarge", "--precision", "bf16"] + (["--batch", "2", "--threads", "1"] if plan.dry_run else [])
    rc, text = run_module("mgssl.tools.fidelity", argv, isolate=True, timeout=timeout)
    tail = " / ".join(text.strip().splitlines()[-3:])[:400]
    rows.append(Row("tools.fidelity", " ".join(argv), tail, status="ok" if rc == 0 else "FAIL"))
    return rows


# ---------------------------------------------------------------------------------------------
# 4. Throughput


def bench_rows(label: str, argv: list[str], plan: Plan, timeout: float, goals: bool, summaries: dict,
               flops_of: Optional[dict] = None) -> list[Row]:
    """One tools.bench run as a row; its summary is kept in `summaries` under `label`.
    `flops_of`: an earlier summary whose FLOP counts this run shares
    (a compiled run is timed with --no-flops: the counter is a dispatch mode, which compiled graphs
    would have to be traced again under)."""
    rc, text = run_module("mgssl.tools.bench", argv + ["--json"], isolate=not plan.dry_run, timeout=timeout)
    s = last_json(text) if rc == 0 else None
    setting = f"{label}: python -m mgssl.tools.bench {' '.join(argv)}"
    if s is None:
        return [Row("bench", setting, f"failed (rc {rc}): {text.strip()[-300:]}", status="FAIL")]
    summaries[label] = s
    meta = f"meta+mixup {s['estimator']}"
    memory = s["peak_memory_mb"]
    memory_mb = memory.get(meta, memory.get("process"))
    mfu = s.get("mfu_meta")
    if mfu is None and flops_of and s.get("peak_tflops") and meta in flops_of.get("gflop_per_step", {}):
        mfu = flops_of["gflop_per_step"][meta] * 1e9 * s["steps_per_s"] / (s["peak_tflops"] * 1e12)
    result = (f"{s['steps_per_s']:.1f} steps/s ({s['pairs_per_s']:.0f} pairs/s), ratio {s['ratio']:.2f} "
              f"(fd {s['ratio_fd']:.2f}, jvp {s['ratio_jvp']:.2f}), MFU "
              f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, peak {memory_mb} MB, "
              f"fidelity {s['fidelity_cosine_meta']:.6f}")
    if s["fidelity_cosine_meta"] != s["fidelity_cosine_meta"]:  # NaN: ∇ỹ was zero, the fidelity measured nothing
        if plan.dry_run:
            return [Row("bench", setting, result + " (undefined: ∇ỹ is zero at this tiny size)", "report", "report")]
        return [Row("bench", setting, result + ": ∇ỹ was zero, so its fidelity measured nothing", "a defined fidelity",
                    "FAIL")]
    if not goals:
        return [Row("bench", setting, result, "report", "report")]
    met = (s["steps_per_s"] >= GOAL_STEPS_PER_S and s["ratio"] <= GOAL_RATIO
           and s["fidelity_cosine_meta"] >= GOAL_FIDELITY)
    return [Row("bench", setting, result, f"≥ {GOAL_STEPS_PER_S:g} steps/s, ratio ≤ {GOAL_RATIO}, "
                f"fidelity ≥ {GOAL_FIDELITY}", "ok" if met else "missed")]


def bench_argv(plan: Plan, model: str, batch: int, steps: int, warmup: int, extra=()) -> list[str]:
    argv = ["--model", model, "--device", plan.device.type, "--batch-size", str(batch), "--steps", str(steps),
            "--warmup", str(warmup)]
    if plan.dry_run:
        return argv + ["--threads", "1", *extra]
    return argv + ["--precision", "bf16", "--channels-last", *extra]


# ---------------------------------------------------------------------------------------------
# 5. A short real run with a resume


def train_run(plan: Plan, root: Path, out: Path, steps: int, extra: tuple, resume: bool, timeout: float) -> dict:
    settings = [f"train.steps={steps}", f"train.eval_every={plan.run_steps}", f"train.log_every={max(1, steps // 4)}",
                f"train.checkpoint_every={max(1, steps // 2)}", "train.progress=false", "train.tensorboard=false",
                f"train.device={plan.device.type}", *extra]
    if not plan.dry_run:
        settings += [f"data.root={root}", "train.precision=bf16"]
    argv = [plan.run_config, "--out", str(out), *(["--resume"] if resume else []), "--set", *settings]
    rc, text = run_module("mgssl.train.cli", argv, isolate=not plan.dry_run, timeout=timeout)
    if rc != 0:
        raise RuntimeError(f"python -m mgssl.train {' '.join(argv)} failed (rc {rc}): {text.strip()[-300:]}")
    return rf.read_json(out / rf.FINAL, "rerun the check")


def check_real_run(plan: Plan, root: Optional[Path], work: Path, timeout: float) -> list[Row]:
    from mgssl.train.metrics import read_metrics

    if root is None and not plan.dry_run:
        return [Row("CIFAR-10 run", "-", "skipped: pass --cifar DIR (a folder holding cifar-10-batches-py/)", status="skipped")]
    data = "scikit-learn's digits" if plan.dry_run else f"CIFAR-10 at {root}"
    n, rows = plan.run_steps, []
    try:
        speed = work / "speed"
        train_run(plan, root, speed, n, (), False, timeout)
        # Throughput of the last logging window (the first holds the warm-up).
        last = read_metrics(speed, "train")[-1]
        batch = rf.read_records(speed / rf.RUNS, warn=print)[0]["global_batch"]
        final = rf.read_json(speed / rf.FINAL, "rerun the check")
        rows.append(Row("real run", f"{plan.run_config}, {data}, {n} steps",
                        f"{last['pairs_per_s'] / batch:.1f} steps/s in the last window, test error "
                        f"{final['test_error']:.4f}", "report", "report"))
        deterministic = ("train.deterministic=true",)
        straight = train_run(plan, root, work / "straight", n, deterministic, False, timeout)
        train_run(plan, root, work / "resumed", n // 2, deterministic, False, timeout)
        resumed = train_run(plan, root, work / "resumed", n, deterministic, True, timeout)
        same = straight["weights_sha256"] == resumed["weights_sha256"]
        rows.append(Row("resume", f"{n // 2} steps, then --resume to {n}, train.deterministic=true",
                        "weights bit-identical to an uninterrupted run" if same else
                        f"weights differ ({straight['weights_sha256'][:12]} vs {resumed['weights_sha256'][:12]})",
                        "identical", "ok" if same else "FAIL"))
    except (RuntimeError, OSError, ValueError, KeyError, IndexError) as e:
        rows.append(Row("real run", f"{plan.run_config}, {data}", str(e)[:400], status="FAIL"))
    return rows


# ---------------------------------------------------------------------------------------------
# 6. Collectives


def check_collectives(plan: Plan) -> list[Row]:
    import torch.distributed as dist

    from mgssl.train import distributed as D

    backend = "gloo" if plan.dry_run else "nccl"
    if dist.is_initialized():
        return [Row("collectives", backend, "skipped: a process group already exists", status="skipped")]
    try:
        device_id = torch.device("cuda", torch.cuda.current_device()) if plan.device.type == "cuda" else None
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, device_id=device_id)
        d = D.Dist(0, 1, 0, plan.device)
        size = 1 << (16 if plan.dry_run else 24)
        x = torch.ones(size, device=plan.device)
        dist.all_reduce(x)
        dist.broadcast(x, 0)
        grads = D.average_grads([torch.full((3, 4), 2.0, device=plan.device), torch.ones(5, device=plan.device)], 1)
        objects = [None]
        dist.all_gather_object(objects, {"rank": 0})
        t0 = time.perf_counter()
        for _ in range(10):
            dist.all_reduce(x)
        if plan.device.type == "cuda":
            torch.cuda.synchronize()
        ms = (time.perf_counter() - t0) / 10 * 1e3
        correct = (bool((x == 1).all()) and float(grads[0].mean()) == 2.0 and objects == [{"rank": 0}]
                   and D.any_rank(True, d) is True)
        # any_rank is the engine's stop-together vote; with one rank it answers without a collective.
        dist.all_reduce(torch.ones(1, device=plan.device), op=dist.ReduceOp.MAX)
        result = (f"all_reduce, broadcast, all_gather_object, average_grads: {'correct' if correct else 'WRONG'}; "
                  f"all_reduce of {size * 4 / 2 ** 20:g} MB {ms:.2f} ms")
        return [Row("collectives", f"{backend}, 1 process", result, status="ok" if correct else "FAIL")]
    except Exception as e:  # the backend itself may be missing or broken: that is what this checks
        return [Row("collectives", f"{backend}, 1 process", f"error: {str(e).splitlines()[0][:200]}", status="FAIL")]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The report


def device_name(device: torch.device) -> str:
    from mgssl.tools.bench import device_name as name

    return name(device)


def markdown(rows: list[Row], header: dict) -> str:
    lines = [f"# GPU check, {header['date']}", "",
             f"Device {header['device']}, torch {header['torch']}, commit {header['commit']}, command "
             f"`{header['command']}`, {header['seconds']:.0f} s in all.", ""]
    if header.get("skipped"):
        lines += [f"Not checked here: {header['skipped']}.", ""]
    lines += ["| check | setting | result | goal | status | s |", "|---|---|---|---|---|---:|"]
    for r in rows:
        cells = [r.check, r.setting, r.result, r.goal, r.status, f"{r.seconds:.0f}"]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def run_checks(argv=None) -> list[Row]:
    """Every check, its table written to --out; returns the rows."""
    args = parse_args(argv)
    plan = Plan.of(args.dry_run)
    from mgssl.train.engine import git_commit

    began = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="runs-", dir=args.out.resolve()))  # the runs start in the checkout
    cifar = args.cifar.resolve() if args.cifar is not None else None
    rows: list[Row] = []
    summaries: dict = {}  # tools.bench summaries by row label: the compiled row takes the eager one's FLOPs

    def left() -> float:
        return args.budget_s - (time.monotonic() - began)

    # (name, seconds it needs on the GPU, the check): the most telling first, the slowest compile last.
    resnet = bench_argv(plan, "resnet18", plan.resnet_batch, 1 if plan.dry_run else 30, 1 if plan.dry_run else 5,
                        ["--image-size", str(plan.resnet_size)]
                        + (["--no-flops", "--fidelity-batch", "2"] if plan.dry_run else []))
    checks = [
        ("host syncs", 30, lambda t: check_host_syncs(plan)),
        ("host syncs engine", 30, lambda t: check_engine_syncs(plan, cifar, work)),
        ("fidelity", 60, lambda t: check_fidelity(plan, t)),
        ("bench eager", 60, lambda t: bench_rows(f"{plan.bench_model} eager", bench_argv(
            plan, plan.bench_model, plan.bench_batch, plan.bench_steps, 1 if plan.dry_run else 10), plan, t,
            goals=not plan.dry_run, summaries=summaries)),
        ("bench resnet18", 60, lambda t: bench_rows(f"ResNet-18 {plan.resnet_size}px", resnet, plan, t, False,
                                                    summaries)),
        ("bench resnet18 fp32 meta", 60, lambda t: bench_rows(
            f"ResNet-18 {plan.resnet_size}px, method.meta_precision=fp32", resnet + ["--meta-precision", "fp32"],
            plan, t, False, summaries)),
        ("collectives", 10, lambda t: check_collectives(plan)),
        ("real run", 90, lambda t: check_real_run(plan, cifar, work, t)),
        ("CUDA tests", 150, lambda t: check_cuda_tests(plan, t)),
    ]
    if not plan.dry_run:
        checks.append(("bench compiled", 150, lambda t: bench_rows("convlarge compiled, CUDA graphs", bench_argv(
            plan, plan.bench_model, plan.bench_batch, plan.bench_steps, 3, ["--compile", "reduce-overhead", "--no-flops"]),
            plan, t, True, summaries, flops_of=summaries.get(f"{plan.bench_model} eager"))))
    for name, needs, check in checks:
        t0 = time.monotonic()
        if not plan.dry_run and left() < needs:
            rows.append(Row(name, "-", f"skipped: {left():.0f} s of the budget left, needs about {needs} s",
                            status="skipped"))
            continue
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        found = check(max(30.0, left()))
        for r in found:
            r.seconds = time.monotonic() - t0
        rows.extend(found)
        for r in found:
            print(f"[gpu_check] {r.check} | {r.setting} | {r.result} | {r.status}", file=sys.stderr, flush=True)

    if plan.dry_run:
        rows.append(Row("bench", "Conv-Large compiled (reduce-overhead)",
                        "skipped in --dry-run: inductor's compile takes minutes on a CPU", status="skipped"))
    header = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "device": device_name(plan.device),
              "torch": torch.__version__, "commit": git_commit(length=12), "python": platform.python_version(),
              "command": "python -m mgssl.tools.gpu_check " + " ".join(sys.argv[1:] if argv is None else argv),
              "seconds": time.monotonic() - began,
              "skipped": "the DALI ImageNet reader (not installed on the GPU machine this check is sized for)"
              + (DRY_RUN_GAPS if plan.dry_run else "")}
    text = markdown(rows, header)
    (args.out / "gpu_check.md").write_text(text)
    (args.out / "gpu_check.json").write_text(json.dumps({"header": header, "rows": [asdict(r) for r in rows]},
                                                        indent=1) + "\n")
    print(text)
    return rows


def main(argv=None) -> int:
    rows = run_checks(argv)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
