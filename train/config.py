"""One typed config per stage, filled from YAML and `--set key=value` overrides.

Precedence: command line > YAML (and the YAML files it names under `base:`) > the defaults below.
A key that no dataclass declares is an error that names the closest valid key.
"""
import dataclasses
import difflib
import re
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from mgssl import runfolder as rf
from mgssl.model import MODELS, ModelConfig
from mgssl.pipelines.config import DataConfig
from mgssl.train.compiling import compile_mode
from mgssl.train.estimators import ESTIMATORS, resolve_estimator

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class MethodConfig:
    unlabeled: bool = True  # false: the labeled-only baseline (CE on the labeled batch, nothing else)
    meta: bool = True  # move pseudo labels by the meta-gradient (Table 4 "Meta")
    mixup: bool = True  # cross-domain mixup of labeled and unlabeled pairs (Table 4 "Mix-Up")
    estimator: str = "auto"  # how J·g is computed: auto (jvp under bf16/fp16, fd in fp32) | fd | jvp | exact
    eps: float = 0.01  # fd: the parameters move by eps in L2 norm (ε = eps / ||g||)
    fd_full_precision: bool = True  # fd's ±εg passes in fp32 without TF32 under autocast too (bf16 rounds the move away)
    # "run": the meta part in the run's precision (under bf16/fp16 jvp in it, fd's passes per
    # fd_full_precision); "fp32": all of it, g included, in fp32 without TF32 (docs/PERF.md "Fidelity")
    meta_precision: str = "run"
    # the meta part in fp32 (as meta_precision=fp32) for the first this many steps only, while the network is
    # near its initialisation, where bf16 misses the fidelity bound (docs/PERF.md "Fidelity"); 0: never
    fp32_meta_steps: int = 0
    fd_midpoint: bool = False  # fd: take ỹ as (p(θ+εg) + p(θ-εg))/2, one forward fewer, O(ε²) off p(θ)
    meta_mode: str = "eval"  # the mode of the meta part: "eval" (the authors' code) or "train"
    meta_scale: str = "authors"  # ŷ = ỹ - lr·2·J·g ("authors") or ŷ = ỹ - β·∇ỹ of Eq. 5 ("literal")
    meta_multiplier: float = 1.0  # extra factor on the pseudo-label step, for scale sweeps
    consistency_weight: float = 1.0  # w of the MSE consistency term
    consistency_rampup: int = 4000  # steps over which w grows linearly from 0
    mixup_gamma: float = 1.0  # λ ~ Beta(γ, γ)
    allreduce_grad: bool = True  # average g over ranks before ε is taken, so every rank moves θ alike
    grad_reduce_dtype: str = "fp32"  # g's all-reduce in fp32, or in bf16 (half the bytes, g rounded to bf16)

    def __post_init__(self):
        _choice("method.estimator", self.estimator, ESTIMATORS)
        _choice("method.meta_mode", self.meta_mode, ("eval", "train"))
        _choice("method.meta_precision", self.meta_precision, ("run", "fp32"))
        _choice("method.meta_scale", self.meta_scale, ("authors", "literal"))
        _choice("method.grad_reduce_dtype", self.grad_reduce_dtype, ("fp32", "bf16"))
        if not self.unlabeled and (self.meta or self.mixup):
            raise ValueError("method.unlabeled=false is the labeled-only baseline: also set method.meta=false "
                             "and method.mixup=false")
        if self.eps <= 0 or self.mixup_gamma <= 0:
            raise ValueError("method.eps and method.mixup_gamma must be positive")
        _at_least("method.consistency_rampup", self.consistency_rampup, 0, "steps (0: full weight from the start)")
        _at_least("method.consistency_weight", self.consistency_weight, 0, "(0: no consistency term)")
        _at_least("method.fp32_meta_steps", self.fp32_meta_steps, 0, "steps (0: no fp32 window)")


@dataclass
class OptimConfig:
    lr: float = 0.1  # peak learning rate α; the meta learning rate β equals it
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False  # Nesterov momentum
    weight_decay: float = 1e-4  # L2 penalty of SGD, on every parameter
    schedule: str = "step"  # "step": ×gamma at each milestone; "cosine": cosine decay to 0 after warm-up
    # step schedule: the steps at which the learning rate is multiplied by gamma
    milestones: list[int] = field(default_factory=lambda: [300_000, 350_000])
    gamma: float = 0.1  # step schedule: the factor applied at each milestone
    warmup_steps: int = 4000  # linear warm-up from 0
    warmup_epochs: Optional[float] = None  # if set, replaces warmup_steps (epochs of the unlabeled set)
    implementation: str = "auto"  # torch SGD kernel: auto (fused on GPU, foreach on CPU) | fused | foreach | loop

    def __post_init__(self):
        _choice("optim.schedule", self.schedule, ("step", "cosine"))
        _choice("optim.implementation", self.implementation, ("auto", "fused", "foreach", "loop"))
        if not self.lr > 0:  # `not >` also catches NaN
            raise ValueError(f"optim.lr={self.lr}: the learning rate must be positive (e.g. 0.1)")
        if not self.gamma > 0:  # a factor of 0 or less would stop the run or turn the learning rate negative
            raise ValueError(f"optim.gamma={self.gamma}: the factor applied at each milestone must be positive "
                             "(e.g. 0.1)")
        if any(b <= a for a, b in zip(self.milestones, self.milestones[1:])) or any(m < 0 for m in self.milestones):
            raise ValueError(f"optim.milestones={self.milestones}: give steps in increasing order, each once "
                             "(e.g. [300000, 350000])")
        _at_least("optim.warmup_steps", self.warmup_steps, 0, "steps (0: no warm-up)")
        if self.warmup_epochs is not None:
            _at_least("optim.warmup_epochs", self.warmup_epochs, 0, "epochs (0: no warm-up)")


@dataclass
class TrainConfig:
    # training steps (one labeled + one unlabeled batch each)
    steps: Optional[int] = field(default=400_000, metadata=rf.RESUMABLE)
    # if set, replaces steps: passes over the unlabeled set
    epochs: Optional[float] = field(default=None, metadata=rf.RESUMABLE)
    eval_every: int = field(default=400, metadata=rf.HOW_RUN)  # steps between test evaluations
    # steps between reads of the training statistics (a host-device sync)
    log_every: int = field(default=100, metadata=rf.HOW_RUN)
    checkpoint_every: int = field(default=2000, metadata=rf.HOW_RUN)  # steps between checkpoints (and one at the end)
    # final.json's median_last_test_error is the median of this many last evaluations
    keep_last_evals: int = field(default=10, metadata=rf.HOW_RUN)
    # decay of an average of the weights kept beside them (e.g. 0.999); null: none
    ema: Optional[float] = field(default=None, metadata=rf.NOT_EXPERIMENT)
    precision: str = "fp32"  # fp32 | bf16 (autocast) | fp16 (autocast + loss scaling)
    # off | default | reduce-overhead (CUDA graphs) | max-autotune (train/compiling.py)
    compile: Union[bool, str] = field(default="off", metadata=rf.HOW_RUN)
    # let cuDNN time and pick its convolution algorithms (off under deterministic)
    cudnn_benchmark: bool = field(default=True, metadata=rf.HOW_RUN)
    # deterministic kernels only: bit-identical resume on GPUs (train/backends.py)
    deterministic: bool = field(default=False, metadata=rf.HOW_RUN)
    # fp32 matmuls and convolutions on TF32 tensor cores (GPUs from Ampere on)
    tf32: bool = field(default=True, metadata=rf.HOW_RUN)
    device: str = field(default="auto", metadata=rf.HOW_RUN)  # auto (cuda if available) | cpu | cuda
    sync_bn: bool = False  # SyncBatchNorm across GPUs
    tensorboard: bool = field(default=True, metadata=rf.HOW_RUN)  # also write TensorBoard event files
    progress: bool = field(default=True, metadata=rf.HOW_RUN)  # live progress bar

    def __post_init__(self):
        _choice("train.precision", self.precision, ("fp32", "bf16", "fp16"))
        _choice("train.device", self.device, ("auto", "cpu", "cuda"))
        self.compile = compile_mode(self.compile)
        for name in ("eval_every", "log_every", "checkpoint_every", "keep_last_evals"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be at least 1")
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("set exactly one of train.steps and train.epochs (the other to null)")
        if self.ema is not None and not 0 < self.ema < 1:
            raise ValueError(f"train.ema={self.ema}: give the decay of the weight average, between 0 and 1 "
                             "(e.g. 0.999), or null for none")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"train.steps={self.steps}: a run needs at least 1 step")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"train.epochs={self.epochs}: give a positive number of passes over the unlabeled set")


@dataclass
class Config:
    # the labeled split, initial weights, data order and augmentation all follow from it
    seed: int = field(default=0, metadata=rf.NOT_EXPERIMENT)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        _choice("model.name", self.model.name, tuple(MODELS))
        if not 0 <= self.seed < 2**32:  # the range NumPy's global generator takes
            raise ValueError(f"seed={self.seed}: give a whole number from 0 to {2**32 - 1}")
        if self.method.mixup and self.method.unlabeled is False:
            raise ValueError("method.mixup needs unlabeled data")
        # `auto` resolved here, once: every reader of the config names the estimator that runs.
        self.method.estimator = resolve_estimator(self.method.estimator, self.train.precision != "fp32")


def keys_marked(flag: str, cls=None, prefix: str = "") -> tuple[str, ...]:
    """The dotted config keys whose field metadata sets `flag` (runfolder.RESUMABLE, NOT_EXPERIMENT)."""
    cls = cls or Config
    hints, keys = typing.get_type_hints(cls), []
    for f in dataclasses.fields(cls):
        full = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(hints[f.name]):
            keys += keys_marked(flag, hints[f.name], full)
        elif f.metadata.get(flag):
            keys.append(full)
    return tuple(keys)


def _at_least(key, value, low, unit):
    if not value >= low:
        raise ValueError(f"{key}={value}: must be at least {low} {unit}")


def _choice(key, value, choices):
    if value not in choices:
        raise ValueError(f"{key}={value!r}: choose one of {', '.join(map(str, choices))}")


# ---------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


# PyYAML (YAML 1.1) reads `1e-3` as a string; where the config expects a number it is still one
_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _as_number(value: Any) -> Any:
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        return float(value)
    return value


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Union:
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        # Prefer an exact type match (an int stays an int in Union[int, float]).
        for arg in args:
            if arg is not type(None) and isinstance(arg, type) and type(value) is arg:
                return value
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError as e:
                errors.append(str(e))
        raise ValueError(errors[0] if errors else f"{key}: bad value {_short(value)}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {_short(value)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, key)
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        value = _as_number(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif hint is float:
        value = _as_number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ValueError(f"{key}: expected {getattr(hint, '__name__', hint)}, got {_short(value)}")


def from_dict(cls, data: Optional[dict], prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys are errors with a suggestion."""
    data = data or {}
    if not isinstance(data, dict):
        raise ValueError(f"{prefix or 'config'}: expected a mapping, got {_short(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else key
        if key not in names:
            valid = [f"{prefix}.{n}" if prefix else n for n in names]
            close = difflib.get_close_matches(full, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys here: {', '.join(valid)}"
            raise KeyError(f"unknown config key {full!r}{hint}")
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


# ---------------------------------------------------------------------------------------------
# YAML files and overrides


def resolve_config_path(name_or_path: str) -> Path:
    """A path to a YAML file, or the name of one in configs/ (`digits`, `convlarge_cifar10_4k`)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") and path.exists():
        return path
    for candidate in (CONFIG_DIR / f"{name_or_path}.yaml", CONFIG_DIR / name_or_path):
        if candidate.is_file():
            return candidate
    known = sorted(p.relative_to(CONFIG_DIR).with_suffix("").as_posix() for p in CONFIG_DIR.rglob("*.yaml"))
    close = difflib.get_close_matches(name_or_path, known, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else f" Known configs: {', '.join(known)}"
    raise FileNotFoundError(f"no config file {name_or_path!r}.{hint}")


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# a config is a few dozen keys: refuse /dev/zero or an alias bomb at once instead of filling the memory
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000
_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxdict, _SHORT.maxlist, _SHORT.maxstring, _SHORT.maxother = 2, 4, 4, 60, 60


def _short(value: Any) -> str:
    """A value for an error message, cut short (a huge or nested one would flood the terminal)."""
    return _SHORT.repr(value)


class DuplicateKeyError(yaml.YAMLError):
    pass


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                if key_node.value in seen:
                    error = DuplicateKeyError(f"the key {key_node.value!r} is given twice")
                    error.problem, error.problem_mark = error.args[0], key_node.start_mark
                    raise error
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str, where: str):
    loader = _ConfigLoader(text)  # a SafeLoader: builds plain data only
    try:
        data = loader.get_single_data()
    finally:
        loader.dispose()
    stack, count = [data], 0
    while stack:  # a bounded walk: aliases can make a small file expand without end
        item = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ValueError(f"{where} expands to more than {MAX_CONFIG_VALUES:,} values (aliases that repeat "
                             "aliases?); a config is a short list of keys: write it out plainly")
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return data


def _yaml_problem(error: yaml.YAMLError) -> tuple[object, str]:
    """(line, what is wrong there) of a YAML error, on one line; PyYAML's own text spans several."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return "?", problem
    return mark.line + 1, f"{problem} (column {mark.column + 1})"


def read_yaml(path: Path, _seen: tuple = ()) -> dict:
    """Load a YAML experiment file, merging the files it names under `base:` beneath it."""
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"config files include each other in a loop: {' -> '.join(map(str, _seen + (path,)))}")
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror or e}); name a YAML file") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB, so not a config (a YAML file of a few "
                         "keys); check the file name, or the `base:` that names it")
    try:
        data = _load_yaml(raw.decode(), str(path)) or {}
    except yaml.YAMLError as e:
        line, problem = _yaml_problem(e)
        raise ValueError(f"{path}:{line}: not valid YAML: {problem}; fix that line of the file") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text file; a config is a YAML file of keys and values") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys at the top level")
    bases = data.pop("base", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _deep_merge(merged, read_yaml(path.parent / base, _seen + (path,)))
    return _deep_merge(merged, data)


def parse_override(text: str) -> dict:
    """'a.b=c' -> {'a': {'b': c}} with c parsed as YAML (numbers, booleans, null, lists)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is not of the form key=value (e.g. train.steps=1000)")
    key, raw = text.split("=", 1)
    try:
        value = _load_yaml(raw, f"--set {key}") if raw.strip() else None
    except yaml.YAMLError as e:
        _, problem = _yaml_problem(e)
        raise ValueError(f"--set {text}: the value is not valid YAML ({problem}); quote it if it is text, "
                         "e.g. --set 'data.root=\"a: b\"'") from None
    out: dict = {}
    node = out
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(name_or_path: Optional[str] = "digits", overrides: tuple[str, ...] = ()) -> Config:
    data = read_yaml(resolve_config_path(name_or_path)) if name_or_path else {}
    for text in overrides:
        data = _deep_merge(data, parse_override(text))
    return from_dict(Config, data)


def normalized(config: dict) -> dict:
    """A saved config dict as today's code reads it: keys added since take their defaults and `auto`
    is resolved; a config today's code cannot read is returned as it was saved."""
    try:
        return to_dict(from_dict(Config, config))
    except (KeyError, ValueError, TypeError):
        return config


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two config dicts, as 'key: a -> b'."""
    out = []
    for key in sorted(set(a) | set(b)):
        full = f"{prefix}.{key}" if prefix else key
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, full)
        elif va != vb:
            out.append(f"{full}: {va!r} -> {vb!r}")
    return out
