"""Where a run's numbers go: metrics.jsonl (one JSON object a line), TensorBoard, a progress bar."""
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional


class MetricsLog:
    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                print("tensorboard is not installed; writing metrics.jsonl only", file=sys.stderr)

    def write(self, kind: str, step: int, values: dict) -> None:
        if not self.enabled:
            return
        record = {"kind": kind, "step": step, "time": round(time.time(), 3), **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.writer.add_scalar(f"{kind}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path, kind: Optional[str] = None) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if kind is None or r["kind"] == kind]


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
    """A tqdm bar with ETA on the main process; plain lines when stdout is not a terminal."""

    def __init__(self, total: int, start: int, enabled: bool):
        self.bar = None
        self.enabled = enabled
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, smoothing=0.05,
                            disable=not sys.stderr.isatty())
        self.total = total

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def report(self, step: int, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None and not self.bar.disable:
            self.bar.set_postfix_str(text, refresh=False)
        else:
            print(f"step {step}/{self.total} {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
