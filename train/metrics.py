"""Where a run's numbers go: metrics.jsonl (one JSON object a line), TensorBoard, a progress bar."""
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

from mgssl import runfolder as rf


def read_window(finite: "torch.Tensor", sums: dict, seen: dict) -> tuple[bool, dict]:
    """Whether every loss of the window was finite, and the window's mean of each statistic, read
    from the device in one copy: the only host-device sync of a logging step."""
    import torch

    keys = list(sums)
    values = torch.stack([finite.float().reshape(()), *(sums[k].float().reshape(()) for k in keys)]).tolist()
    return values[0] == 1.0, {k: v / seen[k] for k, v in zip(keys, values[1:])}


class MetricsLog:
    """Appends to metrics.jsonl. A run that starts at `resume_step` first drops the records past it,
    written by the process that died after its last checkpoint: they are about to be recomputed.
    TensorBoard is a second copy: if its files cannot be written (a full disk), it is dropped with a
    warning and the run goes on."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / rf.METRICS
        self.tensorboard_dir = Path(run_dir) / rf.TENSORBOARD
        self.writer = None
        if enabled:
            drop_records_after(self.path, resume_step)
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(self.tensorboard_dir),
                                            purge_step=resume_step if resume_step > 0 else None)
            except ImportError:  # tensorboard is optional at run time
                print("tensorboard is not installed; writing metrics.jsonl only", file=sys.stderr)
            except OSError as e:
                self._drop_tensorboard(e)

    def write(self, kind: str, step: int, values: dict) -> Optional[rf.RunFileError]:
        """Append one record; returns the error that stopped it (the caller stops every rank), else None."""
        if not self.enabled:
            return None
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        try:
            rf.append_text(self.path, json.dumps(record) + "\n")
        except rf.RunFileError as e:
            return e
        if self.writer is not None:
            try:
                for key, value in values.items():
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        self.writer.add_scalar(f"{kind}/{key}", value, step)
            except OSError as e:
                self._drop_tensorboard(e)
        return None

    def _drop_tensorboard(self, error: OSError) -> None:
        print(f"warning: cannot write TensorBoard events to {self.tensorboard_dir} ({error.strerror or error}); "
              f"writing {self.path.name} only", file=sys.stderr)
        writer, self.writer = self.writer, None
        if writer is not None:
            try:
                writer.close()
            except OSError:
                pass

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:
                self._drop_tensorboard(e)


def drop_records_after(path: Path, step: int) -> None:
    """Keep the records of steps up to `step`; lines cut by a kill or holding bad bytes go too."""
    if not path.is_file() and not path.is_symlink():
        return
    lines = rf.read_bytes(path).splitlines()
    kept = [line for line in lines if line.strip() and _step_of(line) <= step]
    if len(kept) != len(lines):
        rf.write_atomic(path, b"".join(line + b"\n" for line in kept))


def _step_of(line: bytes) -> float:
    try:
        return json.loads(line.decode())["step"]
    except (ValueError, KeyError, TypeError):  # a line cut short by a kill (UnicodeDecodeError is a ValueError)
        return math.inf


def read_metrics(run_dir: Path, kind: Optional[str] = None) -> list[dict]:
    path = Path(run_dir) / rf.METRICS
    if not path.is_file():
        return []
    rows = rf.read_records(path, warn=lambda text: print(text, file=sys.stderr))
    return [r for r in rows if kind is None or r.get("kind") == kind]


def summarize_evals(evals: list[dict], keep_last: int) -> dict:
    """Final, best and median-of-last test errors, as SSL papers report them."""
    if not evals:
        return {}
    errors = [e["top1_error"] for e in evals]
    best = min(range(len(evals)), key=lambda i: errors[i])
    out = {"test_error": errors[-1], "best_test_error": errors[best], "best_step": evals[best]["step"],
           "median_last_test_error": statistics.median(errors[-keep_last:]), "median_last_evals": min(keep_last, len(errors))}
    if "top5_error" in evals[-1]:
        out["test_top5_error"] = evals[-1]["top5_error"]
    return out


class Progress:
    """A tqdm bar with ETA on the main process; plain lines with the ETA when stderr is not a terminal."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.total, self.start, self.began = total, start, time.monotonic()
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, smoothing=0.05,
                            disable=not sys.stderr.isatty())

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def eta(self, step: int) -> str:
        done = step - self.start
        if done <= 0:
            return "?"
        seconds = (time.monotonic() - self.began) / done * (self.total - step)
        hours, rest = divmod(int(seconds), 3600)
        return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"

    def report(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(text, refresh=False)
        else:
            print(f"step {step}/{self.total} {text} eta {self.eta(step)}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class LogWindow:
    """The training statistics of the steps since the last log line: per statistic its sum (kept on the
    device, so no sync per step) and how many steps reported it (a ramp's first step has no
    consistency term). The speed counts only the steps this process timed: a window restored from a
    checkpoint carries steps run before the resume, which its timer never saw."""

    def __init__(self, device="cpu"):
        self.device = device  # where the sums live: a restored window moves there
        self.sums: dict = {}
        self.seen: dict[str, int] = {}
        self.count = 0  # steps in the window
        self.timed = 0  # steps in the window run since the timer started
        self.tick = time.perf_counter()

    def add(self, stats: dict) -> None:
        for k, v in stats.items():
            self.sums[k] = self.sums[k] + v.float() if k in self.sums else v.float()
            self.seen[k] = self.seen.get(k, 0) + 1
        self.count += 1
        self.timed += 1

    def read(self, finite: "torch.Tensor") -> tuple[bool, dict]:
        """Whether every loss was finite and the mean of each statistic, in one host-device copy."""
        return read_window(finite, self.sums, self.seen)

    def steps_per_s(self) -> float:
        return self.timed / max(time.perf_counter() - self.tick, 1e-9)

    def reset(self) -> None:
        self.__init__(self.device)

    def restart_timer(self) -> None:
        self.timed, self.tick = 0, time.perf_counter()

    def state_dict(self) -> dict:
        return {"count": self.count, "seen": dict(self.seen), "sums": {k: v.detach().cpu() for k, v in self.sums.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.sums = {k: v.to(self.device) for k, v in state["sums"].items()}
        self.seen = {k: int(state.get("seen", {}).get(k, self.count)) for k in self.sums}
        self.restart_timer()
