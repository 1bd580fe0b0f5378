"""What a checkpoint of a run holds: the name of each entry, the part of the run that saves and loads it,
and what a resume needs. Saving and restoring both walk ENTRIES; readers name entries by these constants.

The entries are tensors and plain values, so a checkpoint loads with torch.load(weights_only=True)."""
import random
import sys
from dataclasses import dataclass
from operator import attrgetter
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

import mgssl
from mgssl.train import distributed as D
from mgssl.train.config import to_dict

# Entries that a part of the run saves and loads.
MODEL = "model"
RANK_BUFFERS = "rank_buffers"
OPTIMIZER = "optimizer"
SCALER = "scaler"
DATA = "data"
EMA = "ema"
EVALS = "evals"
RNG = "rng"
LOG_WINDOW = "log_window"
# Facts of the run, for the resume's checks and the tools.
STEP = "step"
CONFIG = "config"
VERSION = "mgssl_version"
GIT_COMMIT = "git_commit"
WORLD_SIZE = "world_size"
CLASSES = "classes"
TRAIN_SET = "train_set"
# best.pt keeps MODEL, STEP, CONFIG, CLASSES and GIT_COMMIT, and its evaluation's errors.
VAL_ERROR = "val_error"
TEST_ERROR = "test_error"


@dataclass(frozen=True)
class Entry:
    kind: type  # what the checkpoint holds there
    part: str = ""  # the attribute of the run (engine.Training) that saves and loads it; "" for a fact
    resume: bool = False  # a resume cannot go on without it
    optional: bool = False  # loaded where present: saved only sometimes, or missing from older checkpoints


# In the order a restore loads them: each rank's statistics over rank 0's, the random state after the data.
ENTRIES = {
    MODEL: Entry(dict, "net", resume=True),
    RANK_BUFFERS: Entry(list, "rank_buffers", optional=True),
    OPTIMIZER: Entry(dict, "optimizer", resume=True),
    SCALER: Entry(dict, "scaler", optional=True),
    DATA: Entry(dict, "data.train", resume=True),
    EMA: Entry(dict, "ema"),
    EVALS: Entry(list, "evals", resume=True),
    RNG: Entry(list, "rng", resume=True),
    LOG_WINDOW: Entry(dict, "window", optional=True),
    STEP: Entry(int, resume=True),
    CONFIG: Entry(dict, resume=True),
    VERSION: Entry(str),
    GIT_COMMIT: Entry(str),  # None where the code was not a git checkout
    WORLD_SIZE: Entry(int),
    CLASSES: Entry(list),
    TRAIN_SET: Entry(dict),
}
# What a resume reads, and the type of each.
RESUME_ENTRIES = {name: entry.kind for name, entry in ENTRIES.items() if entry.resume}


def parts(run) -> dict:
    """Each entry's part in `run` (an engine.Training), for the parts it has (no EMA without train.ema)."""
    found = {name: attrgetter(entry.part)(run) for name, entry in ENTRIES.items() if entry.part}
    return {name: part for name, part in found.items() if part is not None}


def collect(run, leave_out: tuple = ()) -> dict:
    """Every part's state. Call it on every rank: the random states and BatchNorm statistics are gathered."""
    return {name: part.state_dict() for name, part in parts(run).items() if name not in leave_out}


def load(run, state: dict) -> None:
    """Give each part of `run` its entry of `state`; a missing entry that is not optional is a KeyError."""
    for name, part in parts(run).items():
        if name in state or not ENTRIES[name].optional:
            part.load_state_dict(state[name])


def facts(run, step: int) -> dict:
    """The facts a checkpoint at `step` records beside the parts' states."""
    split = run.data.split
    return {STEP: step, CONFIG: to_dict(run.cfg), VERSION: mgssl.__version__, GIT_COMMIT: run.commit,
            WORLD_SIZE: run.d.world_size, CLASSES: class_names(run.data),
            TRAIN_SET: {"classes": split.classes, "sha256": split.train_sha256}}


def saved_train_set(state: dict) -> tuple[Optional[list], Optional[str]]:
    """The class names and the training files' fingerprint a checkpoint trained on (None where not recorded)."""
    saved = state.get(TRAIN_SET) or {}
    return saved.get("classes"), saved.get("sha256")


def class_names(data) -> list[str]:
    """The data set's class names (folder names for image folders), else the class numbers."""
    return list(getattr(data, "classes", None) or [str(c) for c in range(data.num_classes)])


# ---------------------------------------------------------------------------------------------
# The parts that exist only to be saved.


class RandomState:
    """The random state of each rank: torch (CPU and CUDA), numpy and Python."""

    def __init__(self, d: D.Dist):
        self.d = d

    def state_dict(self) -> list:
        return D.gather_objects(rng_state(self.d.device), self.d)

    def load_state_dict(self, states: list) -> None:
        if len(states) == self.d.world_size:
            set_rng_state(states[self.d.rank], self.d.device)
        elif self.d.is_main:
            print(f"resuming on {self.d.world_size} processes from a checkpoint of {len(states)}: dropout and mixup "
                  "draws will differ from an uninterrupted run", file=sys.stderr)


class RankBuffers:
    """Every rank's BatchNorm statistics, which a checkpoint off the schedule (a stop signal's) keeps:
    aligning them there, where an uninterrupted run does not, would change the rest of the run."""

    def __init__(self, net: nn.Module, d: D.Dist):
        self.net, self.d = net, d

    def state_dict(self) -> list:
        return D.gather_objects({k: v.detach().cpu() for k, v in self.net.named_buffers()}, self.d)

    def load_state_dict(self, states: list) -> None:
        if len(states) == self.d.world_size:  # on another world size rank 0's statistics stay
            self.net.load_state_dict(states[self.d.rank], strict=False)


class EvalHistory(list):
    """The evaluations so far, one dict each."""

    def state_dict(self) -> list:
        return list(self)

    def load_state_dict(self, state: list) -> None:
        self[:] = list(state)


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

