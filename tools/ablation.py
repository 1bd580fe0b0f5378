"""python -m mgssl.tools.ablation CONFIG --seeds 0-2 [--rows labeled,none,meta,mixup,both] [--set k=v ...] --out DIR

A Table-4 study as one command: every row x seed is its own run of `python -m mgssl.train`, seed by
seed, in the run folder DIR/<row>-s<seed>, then the report of tools.report (the table, the paired comparisons of the
meta term on and off and of each row against labeled-only, the curves) is written to DIR/report.md.

The rows are the labeled-only baseline and the paper's Table-4 rows 1-4 (tools/runs.py, TABLE4_ROWS):
  labeled  method.unlabeled=false method.meta=false method.mixup=false
  none     method.meta=false method.mixup=false   (row 1: consistency only)
  meta     method.mixup=false                     (row 2)
  mixup    method.meta=false                      (row 3)
  both     (nothing)                              (row 4: Algorithm 2)
Run i is `python -m mgssl.train CONFIG --out DIR/<row>-s<seed> --set seed=<seed> [--set ...] <row overrides>`,
so folders made by hand with that command are the same runs. A finished run (final.json present)
is skipped; an unfinished one is continued with `--resume` only when --resume is given (without it,
it may be one that is still training, and it is left alone). Each run's output goes to DIR/logs/.
On a machine with several GPUs, `--gpus 0,1,2,3` trains one run per GPU at a time: each run sees only
its own GPU (CUDA_VISIBLE_DEVICES) and takes the next GPU that comes free."""
import argparse
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mgssl
from mgssl.tools.runs import (FINAL, METRICS, TABLE4_ROWS, TABLE4_VARIANTS, RunSelectionError, is_run_dir,
                               normalized_config, not_the_experiment, output_error, read_config, read_final)

# The folder that holds the mgssl package: site-packages for an install, the checkout for a source tree.
PACKAGE_ROOT = Path(mgssl.__file__).resolve().parent.parent
LOGS = "logs"
STOP_GRACE_S = 120  # how long a stopped run may take to leave (on a busy machine, tens of seconds)
PROGRESS_EVERY_S = 30


class StudyError(ValueError):
    pass


@dataclass
class Planned:
    """One run of the study: its folder name (<row>-s<seed>), folder, and `python -m mgssl.train` arguments."""
    name: str
    row: str
    seed: int
    path: Path
    argv: list  # the arguments after `python -m mgssl.train`
    config: dict  # the resolved config, nested as config.yaml holds it
    total_steps: Optional[int]

    @property
    def state(self) -> str:
        """finished (final.json), unfinished (a run folder without it) or new."""
        if (self.path / FINAL).is_file():
            return "finished"
        return "unfinished" if self.path.is_dir() and is_run_dir(self.path) else "new"


def parse_seeds(text: str) -> list[int]:
    """'0-2' -> [0, 1, 2]; '0,3,5-6' -> [0, 3, 5, 6]."""
    seeds = []
    try:
        for part in text.split(","):
            first, _, last = part.strip().partition("-")
            seeds += list(range(int(first), int(last) + 1)) if last else [int(first)]
    except ValueError:
        raise StudyError(f"--seeds {text!r}: give seeds as 0-2 or 0,3,5") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise StudyError(f"--seeds {text!r}: give each seed once, as non-negative numbers (e.g. 0-2)")
    return seeds


def parse_rows(text: str) -> list[str]:
    rows = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in rows if r not in TABLE4_ROWS]
    if unknown or not rows or len(set(rows)) != len(rows):
        raise StudyError(f"--rows {text!r}: choose each of {', '.join(TABLE4_ROWS)} at most once, comma-separated")
    return rows


def plan(config: str, seeds: list[int], rows: list[str], sets: list[str], out: Path) -> list[Planned]:
    """The runs of the study, each with its resolved config; the settings are checked before
    anything is trained."""
    from mgssl.train.config import load_config, to_dict

    for text in sets:
        key = text.partition("=")[0].strip()
        if key == "seed":
            raise StudyError("--set seed=...: the study sets the seed of each run; use --seeds instead")
    planned = []
    # Seed by seed, so that a study stopped part-way holds complete seeds to compare row against row.
    for seed in seeds:
        for row in rows:
            # The row's switches come last, so that they win over --set.
            overrides = [f"seed={seed}", *sets, *TABLE4_ROWS[row]]
            try:
                cfg = load_config(config, tuple(overrides))
            except (KeyError, ValueError, FileNotFoundError) as e:
                raise StudyError(e.args[0] if isinstance(e, KeyError) and e.args else str(e)) from None
            got = (cfg.method.unlabeled, cfg.method.meta, cfg.method.mixup)
            if got != TABLE4_VARIANTS[row]:
                raise StudyError(
                    f"row {row} would train method.unlabeled/meta/mixup = {'/'.join(map(str, got)).lower()} "
                    f"instead of {'/'.join(map(str, TABLE4_VARIANTS[row])).lower()}: the rows switch these "
                    "off themselves, so the config and --set must leave method.meta and method.mixup on")
            name = f"{row}-s{seed}"
            path = out / name
            argv = [str(config), "--out", str(path), "--set", *overrides]
            planned.append(Planned(name, row, seed, path, argv, to_dict(cfg), cfg.train.steps))
    return planned


def settings_differ(run: Planned) -> list[str]:
    """How an existing run folder's config.yaml differs from what the study would train there
    (keys that do not change what is learnt, such as paths and logging, aside; for an unfinished
    run also those a resume may change, such as the step count)."""
    import yaml

    saved = read_config(run.path)  # a damaged config.yaml is a RunSelectionError that names it
    if not saved:
        return []
    wanted = normalized_config(yaml.safe_load(yaml.safe_dump(run.config)))  # as the run folder would hold it
    ignore = set(not_the_experiment()) - {"seed"}
    if run.state == "unfinished":
        from mgssl.train.config import keys_marked

        ignore |= set(keys_marked("resumable"))
    return [f"{k}: {saved.get(k, '<absent>')!r} there, {wanted.get(k, '<absent>')!r} here"
            for k in sorted(set(saved) | set(wanted)) if k not in ignore and saved.get(k) != wanted.get(k)]


def check_existing(runs: list[Planned]) -> None:
    for run in runs:
        if run.state == "new":
            continue
        changes = settings_differ(run)
        if changes:
            raise StudyError(f"{run.path} holds a run with other settings ({'; '.join(changes[:3])}); "
                             "remove that folder or choose another --out")


def last_step(run_dir: Path) -> Optional[int]:
    """The step of the last line of metrics.jsonl (read from its end, the file can be long)."""
    import json

    path = run_dir / METRICS
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().decode(errors="replace").splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def parse_gpus(text: str) -> list[str]:
    """'0,1,2,3' -> ['0', '1', '2', '3']: CUDA device indices (or UUIDs), each once."""
    gpus = [g.strip() for g in text.split(",")]
    if not gpus or not all(re.fullmatch(r"[\w-]+", g) for g in gpus) or len(set(gpus)) != len(gpus):
        raise StudyError(f"--gpus {text!r}: give each GPU once, comma-separated, as CUDA numbers them (e.g. 0,1,2,3)")
    return gpus


def child_env(threads: int, gpu: Optional[str] = None) -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    if gpu is not None:  # the run sees its one GPU as cuda:0, so train.device=auto puts it there
        env["CUDA_VISIBLE_DEVICES"] = gpu
    # The runs import this installation's code (a source checkout's too), wherever the study is started from.
    env["PYTHONPATH"] = os.pathsep.join([str(PACKAGE_ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def train_command(run: Planned) -> list[str]:
    """The command that trains `run`: continued with --resume where it is unfinished."""
    return [sys.executable, "-m", "mgssl.train", *run.argv] + (["--resume"] if run.state == "unfinished" else [])


def stop(children: dict, say: Callable[[str], None], grace_s: float = STOP_GRACE_S) -> None:
    """Ask each run to stop as Ctrl-C would (it keeps its last checkpoint), then wait; kill what stays.
    A second Ctrl-C meanwhile is ignored, so that no run is left behind."""
    before = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _stop(children, say, grace_s)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _stop(children: dict, say: Callable[[str], None], grace_s: float) -> None:
    for proc in children:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for proc, (run, _, log, *_) in children.items():
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            say(f"{run.name} did not stop within {grace_s:.0f} s; killing it")
            proc.kill()
            proc.wait()
        log.close()


def _interruptible() -> None:
    """In a run, before it starts: SIGINT back to its default, so that Python turns it into
    KeyboardInterrupt even when the study was started where SIGINT is ignored (`cmd &`, nohup)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if line.startswith("error:") or "Error" in line]
    return (errors or lines or [""])[-1].strip()


def run_all(todo: list[Planned], *, jobs: int, threads: int, out: Path, gpus: Optional[list[str]] = None,
            say: Callable[[str], None] = print, progress_every: float = PROGRESS_EVERY_S) -> list[Planned]:
    """Train `todo`, `jobs` at a time, or with `gpus` one on each GPU (an unfinished one continues from
    its checkpoint); returns the runs that failed. Ctrl-C stops every run cleanly (each keeps its last
    checkpoint) and is raised again."""
    logs = out / LOGS
    logs.mkdir(parents=True, exist_ok=True)
    free_gpus = list(gpus or [])
    jobs = len(free_gpus) or jobs
    pending, failed = list(todo), []
    children: dict = {}  # Popen -> (Planned, start time, log file, GPU or None)
    done, began, last_note = 0, time.monotonic(), time.monotonic()
    try:
        while pending or children:
            while pending and len(children) < jobs:
                run = pending.pop(0)
                gpu = free_gpus.pop(0) if free_gpus else None
                argv = train_command(run)
                log = open(logs / f"{run.name}.log", "a")
                log.write(f"$ {'' if gpu is None else f'CUDA_VISIBLE_DEVICES={gpu} '}{shlex.join(argv)}\n")
                log.flush()
                # Its own session: a Ctrl-C in the terminal reaches the study only, which passes it on once.
                proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=child_env(threads, gpu),
                                        cwd=os.getcwd(), start_new_session=True, preexec_fn=_interruptible)
                children[proc] = (run, time.monotonic(), log, gpu)
                say(f"started {run.name}" + ("" if gpu is None else f" on GPU {gpu}"))
            time.sleep(0.5)
            for proc in [p for p in children if p.poll() is not None]:
                run, started, log, gpu = children.pop(proc)
                log.close()
                if gpu is not None:
                    free_gpus.append(gpu)
                done += 1
                took = _clock(time.monotonic() - started)
                final_error = None
                if proc.returncode == 0 and (run.path / FINAL).is_file():
                    try:
                        final_error = read_final(run.path)["test_error"]
                    except RunSelectionError as e:
                        say(f"failed {run.name}: {e}")
                if final_error is not None:
                    say(f"finished {run.name} in {took}: test error {100 * final_error:.2f}%")
                else:
                    failed.append(run)
                    say(f"failed {run.name} (exit {proc.returncode}) after {took}: {_last_line(logs / f'{run.name}.log')} "
                        f"(log: {logs / f'{run.name}.log'})")
            if children and time.monotonic() - last_note >= progress_every:
                last_note = time.monotonic()
                states = []
                for run, *_ in children.values():
                    step = last_step(run.path)
                    states.append(f"{run.name} " + ("(no step logged yet)" if step is None else f"step {step}"
                                                    + (f"/{run.total_steps}" if run.total_steps else "")))
                say(f"[{_clock(time.monotonic() - began)}] {done}/{len(todo)} done, {len(pending)} waiting; "
                    f"running: {', '.join(states)}")
    except KeyboardInterrupt:
        say(f"stopping {len(children)} running run(s); each keeps its last checkpoint")
        stop(children, say)
        raise
    return failed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mgssl ablation", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  python -m mgssl.tools.ablation digits --seeds 0-9 --out runs/table4 "
                                       "--jobs 2\n")
    p.add_argument("config", help="a YAML file, or the name of one in configs/")
    p.add_argument("--seeds", required=True, help="seeds to train, e.g. 0-2 or 0,3,5")
    p.add_argument("--rows", default=",".join(TABLE4_ROWS),
                   help=f"rows to train, comma-separated (default: {','.join(TABLE4_ROWS)})")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="config overrides for every run, e.g. --set train.steps=1000 data.root=data/c10")
    p.add_argument("--out", type=Path, required=True, help="the study's folder: DIR/<row>-s<seed>, DIR/report.md")
    p.add_argument("--jobs", type=int, default=None, help="runs trained at once (default: 1; with --gpus, one per GPU)")
    p.add_argument("--gpus", default=None, metavar="0,1,2,3",
                   help="train one run per GPU at a time, each seeing only its own GPU (CUDA_VISIBLE_DEVICES)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run (default: 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue unfinished runs from their last checkpoint (without it they are left alone)")
    p.add_argument("--dry-run", action="store_true", help="print the training commands and exit")
    args = p.parse_args(argv)
    say = lambda text: print(text, flush=True)  # noqa: E731
    try:
        gpus = parse_gpus(args.gpus) if args.gpus is not None else None
        if gpus is not None and args.jobs not in (None, len(gpus)):
            raise StudyError(f"--gpus trains one run per GPU ({len(gpus)} at a time); leave out --jobs {args.jobs}")
        jobs = len(gpus) if gpus is not None else (1 if args.jobs is None else args.jobs)
        if jobs < 1 or args.threads < 1:
            raise StudyError("--jobs and --threads must be at least 1")
        runs = plan(args.config, parse_seeds(args.seeds), parse_rows(args.rows), args.overrides, args.out)
        check_existing(runs)
    except (StudyError, RunSelectionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        if gpus:
            print("# one run per GPU; each later run takes the GPU that comes free first (shown: in turn)")
        for i, run in enumerate(runs):
            gpu = f"CUDA_VISIBLE_DEVICES={gpus[i % len(gpus)]} " if gpus else ""
            print(f"{gpu}OMP_NUM_THREADS={args.threads} python -m mgssl.train {shlex.join(run.argv)}")
        return 0
    states = {run.name: run.state for run in runs}
    todo = [r for r in runs if states[r.name] == "new" or (states[r.name] == "unfinished" and args.resume)]
    left = [r for r in runs if states[r.name] == "unfinished" and not args.resume]
    say(f"{len(runs)} runs in {args.out}: {sum(s == 'finished' for s in states.values())} finished already, "
        f"{len(todo)} to train, " + (f"one per GPU on GPUs {','.join(gpus)}" if gpus else f"{jobs} at a time")
        + f" with {args.threads} thread(s) each")
    for run in left:
        say(f"leaving {run.name} alone: unfinished (still training, or stopped); add --resume to continue it")
    # `kill PID` (SIGTERM), and SIGINT where the shell started the study with it ignored, stop it as Ctrl-C does.
    before = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        run_all(todo, jobs=jobs, threads=args.threads, out=args.out, gpus=gpus, say=say)
    except OSError as e:  # the study's own folder (its logs) cannot be written
        print(f"error: {output_error(e, '--out')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; run the same command with --resume to continue", file=sys.stderr)
        return 130
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)

    from mgssl.tools.report import build_report

    existing = [r.path for r in runs if r.path.is_dir()]
    if any((path / FINAL).is_file() for path in existing):
        command = "python -m mgssl.tools.ablation " + " ".join(sys.argv[1:] if argv is None else argv)
        try:
            report = build_report(existing, args.out, command=command, warn=lambda text: None)
        except RunSelectionError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except OSError as e:
            print(f"error: {output_error(e, '--out')}", file=sys.stderr)
            return 2
        say(f"wrote {report.path}")
    unfinished = [r.name for r in runs if r.state != "finished"]
    if unfinished:
        print(f"error: {len(unfinished)} run(s) not finished: {', '.join(unfinished)}; see {args.out / LOGS} "
              "and run the same command with --resume", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
