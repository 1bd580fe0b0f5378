"""Reading the folders that `python -m mgssl.train` writes, and restoring a saved network with its data.

The folder's files and how each is opened and read are defined in mgssl/runfolder.py; a damaged one is
an error that names it."""
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

from mgssl import runfolder as rf
from mgssl.runfolder import CONFIG, FINAL, METRICS, SPLIT

CHECKPOINT = Path(rf.CHECKPOINT)


def not_the_experiment() -> tuple[str, ...]:
    """Config keys that do not change what a run learns (logging, paths, the evaluation batch) and the
    seed: runs that differ only in these are repeats of one experiment (field metadata NOT_EXPERIMENT)."""
    from mgssl.train.config import keys_marked

    return keys_marked("not_experiment")
# The switches that Table 4 varies, and the baseline switch.
VARIANT_KEYS = ("method.unlabeled", "method.meta", "method.mixup")
# the labeled-only baseline and Table 4's rows 1-4 as `--set` overrides of a config with meta and mixup on
TABLE4_ROWS = {
    "labeled": ("method.unlabeled=false", "method.meta=false", "method.mixup=false"),
    "none": ("method.meta=false", "method.mixup=false"),  # row 1: consistency only
    "meta": ("method.mixup=false",),  # row 2
    "mixup": ("method.meta=false",),  # row 3
    "both": (),  # row 4: Algorithm 2
}
# What each row switches on: (method.unlabeled, method.meta, method.mixup).
TABLE4_VARIANTS = {"labeled": (False, False, False), "none": (True, False, False), "meta": (True, True, False),
                   "mixup": (True, False, True), "both": (True, True, True)}


# The keys of final.json that name an experiment, and the config keys they come from.
FINAL_TO_CONFIG = {"dataset": "data.name", "model": "model.name", "num_labels": "data.labels",
                   "steps": "train.steps", "estimator": "method.estimator", "unlabeled": "method.unlabeled",
                   "meta": "method.meta", "mixup": "method.mixup"}


class RunSelectionError(ValueError):
    pass


def output_error(e: OSError, option: str) -> str:
    """One line for an output path a tool cannot write (read-only, too long, a file in the way)."""
    where = e.filename or "the output"
    return f"cannot write {where} ({e.strerror or e}); choose another {option}"


def write_json_output(path: Path, payload, option: str = "--json") -> Optional[str]:
    """Write `payload` as indented JSON at a tool's output `path`; the one-line error if it cannot."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")
    except OSError as e:
        return output_error(e, option)
    return None


@dataclass
class Run:
    path: Path
    final: dict
    config: dict = field(default_factory=dict)  # flattened: {"data.labels": 50, ...}; empty if config.yaml is absent
    evals: list = field(default_factory=list)  # metrics.jsonl rows of kind "eval", one per step, in step order
    commands: list = field(default_factory=list)  # the command of each start or resume, from runs.jsonl
    name: str = ""  # a short name for legends and tables

    def get(self, key: str, default=None):
        """A value of final.json, else of the config (e.g. `meta` or `method.meta`)."""
        if key in self.final:
            return self.final[key]
        return self.config.get(key, default)

    @property
    def unlabeled(self) -> bool:
        return bool(self.get("unlabeled", self.config.get("method.unlabeled", True)))

    @property
    def meta(self) -> bool:
        return bool(self.get("meta", self.config.get("method.meta", False)))

    @property
    def mixup(self) -> bool:
        return bool(self.get("mixup", self.config.get("method.mixup", False)))

    @property
    def method(self) -> str:
        return method_name(self.unlabeled, self.meta, self.mixup)


def method_name(unlabeled: bool, meta: bool, mixup: bool) -> str:
    if not unlabeled:
        return "labeled-only"
    if meta and mixup:
        return "meta + mixup"
    return "meta" if meta else ("mixup" if mixup else "consistency only")


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, full))
        else:
            out[full] = value
    return out


def is_run_dir(path: Path) -> bool:
    return any((path / marker).exists() for marker in rf.MARKERS)


def find_runs(paths: Iterable) -> tuple[list[Path], list[Path]]:
    """(finished, unfinished) run folders at or below each path, each once, in a stable order."""
    finished, unfinished, seen = [], [], set()
    for arg in paths:
        root = Path(arg)
        if not root.exists():
            raise RunSelectionError(f"{root} does not exist; pass run folders (holding {FINAL}) or folders above them")
        if root.is_file():
            raise RunSelectionError(f"{root} is a file; pass the run folder that holds it (e.g. {root.parent})")
        candidates = [root] if is_run_dir(root) or (root / FINAL).is_file() else []
        candidates += sorted(p for p in root.rglob("*") if p.is_dir() and ((p / FINAL).is_file() or is_run_dir(p))
                             and p.name != rf.CHECKPOINTS)
        for path in candidates:
            if path.resolve() in seen:
                continue
            seen.add(path.resolve())
            (finished if (path / FINAL).is_file() else unfinished).append(path)
    return finished, unfinished


def _warn(text: str) -> None:
    print(text, file=sys.stderr)


def read_evals(run_dir: Path, warn: Callable[[str], None] = _warn) -> list[dict]:
    """Test evaluations from metrics.jsonl; a resumed run may repeat a step, and its later row wins."""
    return [row for row in read_metric_rows(run_dir, "eval", warn) if isinstance(row.get("top1_error"), (int, float))]


def read_metric_rows(run_dir: Path, kind: str, warn: Callable[[str], None] = _warn) -> list[dict]:
    """The rows of one kind ("eval", "train") from metrics.jsonl, one per step, in step order. A line cut
    by a crash mid-write, or damaged, is skipped with a warning that names it."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    by_step = {}
    for row in rf.read_records(path, warn):
        if row.get("kind") == kind and isinstance(row.get("step"), int):
            by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def at_common_steps(seeds: list[list[dict]], key: str) -> tuple[list[int], list[list[float]]]:
    """The steps at which every seed's evaluation rows hold `key`, and each seed's values there
    (one list per seed, in step order)."""
    by_seed = [{r["step"]: r[key] for r in rows if key in r} for rows in seeds]
    steps = sorted(set.intersection(*(set(d) for d in by_seed))) if by_seed else []
    return steps, [[d[s] for s in steps] for d in by_seed]


def normalized_config(tree: dict) -> dict:
    """A saved config as today's code reads it, flattened: keys added since the run was made take
    their defaults, and method.estimator names the estimator that runs (`auto` resolved), so that
    an older run and a new one of the same experiment compare equal."""
    from mgssl.train.config import normalized

    return flatten(normalized(tree))


DAMAGED = "restore it from a copy, or remove the run folder and train it again"


def read_config(run_dir: Path) -> dict:
    """The run's config.yaml, flattened and normalised; {} if it has none."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        return {}
    import yaml

    try:
        tree = yaml.safe_load(rf.read_text(path, DAMAGED))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise RunSelectionError(f"{path} is damaged (not YAML{where}); {DAMAGED}") from None
    except rf.RunFileError as e:
        raise RunSelectionError(str(e)) from None
    if tree is not None and not isinstance(tree, dict):
        raise RunSelectionError(f"{path} is damaged (not a mapping of config keys); {DAMAGED}")
    return normalized_config(tree or {})


def read_final(run_dir: Path) -> dict:
    """final.json of a finished run, with a numeric test_error; else one line naming the file."""
    path = Path(run_dir) / FINAL
    try:
        final = rf.read_json(path, DAMAGED)
    except rf.RunFileError as e:
        raise RunSelectionError(str(e)) from None
    if not isinstance(final.get("test_error"), (int, float)) or isinstance(final.get("test_error"), bool):
        raise RunSelectionError(f"{path} has no numeric test_error; it is damaged or was not written by "
                                f"`python -m mgssl.train`: {DAMAGED}")
    return final


def load_run(run_dir: Path) -> Run:
    run_dir = Path(run_dir)
    return Run(run_dir, read_final(run_dir), read_config(run_dir), read_evals(run_dir), read_commands(run_dir))


def read_commands(run_dir: Path) -> list[str]:
    path = Path(run_dir) / rf.RUNS
    if not path.is_file():
        return []
    return [r["command"] for r in rf.read_records(path, warn=lambda text: None) if isinstance(r.get("command"), str)]


def name_runs(runs: list[Run]) -> None:
    """Name each run by its path below the folder all of them share (the folder name for one run)."""
    if not runs:
        return
    paths = [r.path.resolve() for r in runs]
    parts = [p.parts for p in paths]
    common = 0
    while all(len(p) > common + 1 for p in parts) and len({p[common] for p in parts}) == 1:
        common += 1
    for run, p in zip(runs, parts):
        run.name = "/".join(p[common:]) if len(runs) > 1 else p[-1]


def select_runs(paths: Iterable, warn=print) -> tuple[list[Run], list[Path]]:
    """Loaded finished runs below `paths` and the unfinished folders skipped; an error if none finished."""
    paths = list(paths)
    finished, unfinished = find_runs(paths)
    for path in unfinished:
        warn(f"skipping {path}: no {FINAL} yet (still running, or stopped; finish it with "
             f"`python -m mgssl.train CONFIG --out {path} --resume`)")
    if not finished:
        where = ", ".join(map(str, paths))
        raise RunSelectionError(f"no finished run (a folder holding {FINAL}) in or below {where}; "
                                "train one with `python -m mgssl.train digits --out runs/digits`")
    runs = [load_run(p) for p in finished]
    name_runs(runs)
    runs.sort(key=lambda run: natural_key(run.name))
    return runs, unfinished


def natural_key(text: str) -> list:
    """Sorts labels20 before labels100 and seed2 before seed10."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text)]


def experiment_key(run: Run, also_ignore: tuple = ()) -> tuple:
    """What makes runs repeats of one experiment: the config less seeds, logging and paths (and
    `also_ignore`); from final.json where config.yaml is missing."""
    ignore = not_the_experiment() + tuple(also_ignore)
    if run.config:
        return tuple(sorted((k, repr(v)) for k, v in run.config.items() if k not in ignore))
    return tuple((key, repr(run.final.get(name))) for name, key in FINAL_TO_CONFIG.items() if key not in ignore)


def differing_keys(keys: list[tuple]) -> list[str]:
    """The config keys whose values are not the same in every one of `keys` (from experiment_key)."""
    dicts = [dict(k) for k in keys]
    names = sorted(set().union(*dicts)) if dicts else []
    return [n for n in names if len({d.get(n, "<absent>") for d in dicts}) > 1]


# ---------------------------------------------------------------------------------------------
# Restoring a saved network with the data it was trained on


@dataclass
class Restored:
    checkpoint: Path
    run_dir: Optional[Path]
    state: dict
    cfg: object  # train.config.Config
    net: object  # torch.nn.Module, in eval mode
    data: object  # what pipelines.build_data returns
    device: object


def checkpoint_path(path) -> Path:
    """A checkpoint file, or the run folder whose checkpoints/last.pt is meant."""
    path = Path(path)
    if path.is_dir():
        if (path / CHECKPOINT).is_file():
            return path / CHECKPOINT
        raise FileNotFoundError(f"{path} holds no {CHECKPOINT}; pass a checkpoint file or a run folder that "
                                "has one (runs save it every train.checkpoint_every steps and at the end)")
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; pass a checkpoint (.pt) or a run folder")
    return path


def run_dir_of(checkpoint: Path) -> Optional[Path]:
    """The run folder of <run>/checkpoints/<file>.pt, if that is where the checkpoint lies."""
    parent = checkpoint.resolve().parent
    if parent.name == rf.CHECKPOINTS and ((parent.parent / CONFIG).is_file() or (parent.parent / SPLIT).is_file()):
        return parent.parent
    return None


def restore(path, *, data_root: Optional[str] = None, device: str = "cpu", warn=print) -> Restored:
    """The network of a checkpoint with its weights, on the data of its run: the saved config, and
    the labeled split saved beside it (without one the split is drawn again from the run's seed)."""
    import torch

    from mgssl.pipelines import build_data
    from mgssl.train import checkpoint as ckpt
    from mgssl.train import run_state as rs
    from mgssl.train.config import Config, from_dict

    checkpoint = checkpoint_path(path)
    state = ckpt.load(checkpoint)
    if not isinstance(state.get(rs.MODEL), dict) or not isinstance(state.get(rs.CONFIG), dict):
        raise ValueError(f"{checkpoint} has no {rs.MODEL!r} and {rs.CONFIG!r} entries; it is not a checkpoint of "
                         "`python -m mgssl.train` (checkpoints/last.pt in a run folder is)")
    config = dict(state[rs.CONFIG])
    config["data"] = dict(config.get("data", {}))
    if data_root is not None:
        config["data"]["root"] = str(data_root)
    run_dir = run_dir_of(checkpoint)
    split = run_dir / SPLIT if run_dir is not None else None
    if split is not None and split.is_file():
        config["data"]["split_file"] = str(split)
    elif not config["data"].get("split_file"):
        warn(f"warning: no {SPLIT} beside {checkpoint}; drawing the labeled split again from seed "
             f"{config.get('seed')} (the same split unless the data or the split code changed)")
    try:
        cfg = from_dict(Config, config)
    except (KeyError, ValueError) as e:
        raise ValueError(f"the config saved in {checkpoint} does not load with this version of the code "
                         f"({e.args[0] if isinstance(e, KeyError) else e}); evaluate it with the version that "
                         f"trained it (mgssl {state.get(rs.VERSION) or 'version not recorded'}, "
                         f"git commit {state.get(rs.GIT_COMMIT) or 'not recorded'})") from e
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    data = build_data(cfg.data, seed=cfg.seed, device=dev)
    net = cfg.model.build(data.num_classes, data.in_channels).to(dev)
    try:
        net.load_state_dict(state[rs.MODEL])
    except (RuntimeError, KeyError, TypeError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"the weights in {checkpoint} do not fit its own config's {cfg.model.name} ({first[:200]}); "
                         "the checkpoint is damaged: restore it from a copy") from None
    net.eval()
    return Restored(checkpoint, run_dir, state, cfg, net, data, dev)


if __name__ == "__main__":  # a library: `python -m` on it would otherwise print nothing and exit 0
    sys.exit("mgssl.tools.runs is a library, not a command; `mgssl --help` lists the commands")
