"""A trained network out of a run folder, for predicting and exporting: which weights (best.pt, the
last checkpoint, or the weight average), the class names and the run's evaluation preprocessing."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CHECKPOINTS = ("best", "last", "ema")
IMAGE_DATASETS = ("folder", "imagenet")  # runs whose inputs are image files, preprocessed by the DALI pipeline


@dataclass
class Preprocess:
    """The run's evaluation preprocessing of an image file (pipelines/dali.py, Transform "eval")."""
    image_size: int
    resize_size: int
    mean: tuple  # RGB, fractions of 255
    std: tuple

    def describe(self) -> str:
        return (f"decode to RGB; resize the shorter edge to {self.resize_size} px; centre crop "
                f"{self.image_size}x{self.image_size}; x / 255; (x - mean) / std per channel; float32 NCHW")


@dataclass
class LoadedModel:
    net: object  # torch.nn.Module in eval mode, on the chosen device
    classes: list
    preprocess: Preprocess
    cfg: object  # train.config.Config
    checkpoint: Path
    which: str  # best | last | ema
    step: int

    def metadata(self) -> dict:
        """What an exported file carries beside the network, as JSON values."""
        from dataclasses import asdict

        return {"classes": self.classes, "image_size": self.preprocess.image_size,
                "resize_size": self.preprocess.resize_size, "mean": list(self.preprocess.mean),
                "std": list(self.preprocess.std), "preprocess": self.preprocess.describe(),
                "input": "image", "output": "logits", "model": asdict(self.cfg.model), "weights": self.which,
                "step": self.step, "dataset": self.cfg.data.name}


def metadata_json(model: LoadedModel) -> str:
    return json.dumps(model.metadata(), sort_keys=True)


def _state_of(run_dir: Path, which: str) -> tuple[Path, dict, dict]:
    """(checkpoint file, its contents, the network's weights) of `which`."""
    from mgssl import runfolder as rf
    from mgssl.train import checkpoint as ckpt
    from mgssl.train import run_state as rs
    from mgssl.train.ema import WeightsEMA

    folder = run_dir / rf.CHECKPOINTS
    if which == "best":
        path = folder / rf.BEST
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir} has no {rf.BEST_CHECKPOINT}: the run held out no validation images "
                                    "(data.validation=0) or has not evaluated yet; use --checkpoint last")
        state = ckpt.load(path)
        return path, state, state[rs.MODEL]
    path = folder / rf.LAST
    state = ckpt.load(path) if path.is_file() else None
    if state is None:
        raise FileNotFoundError(f"{run_dir} has no {rf.CHECKPOINT}; pass the folder of a run of "
                                "`python -m mgssl.train`")
    if which == "last":
        return path, state, state[rs.MODEL]
    if rs.EMA not in state:
        raise ValueError(f"{path} holds no weight average: the run had train.ema off; use --checkpoint best or last")
    return path, state, WeightsEMA.weights_in(state[rs.EMA])


def load_model(run_dir, which: str = "best", device: str = "cpu") -> LoadedModel:
    """The network of `run_dir` with the weights `which`; runs of the in-memory data sets are refused
    (their inputs are arrays, not image files, and their normalisation is not saved)."""
    import torch

    from mgssl.pipelines.dali import MEAN, STD
    from mgssl.train import run_state as rs
    from mgssl.train.config import Config, from_dict

    if which not in CHECKPOINTS:
        raise ValueError(f"--checkpoint {which}: choose one of {', '.join(CHECKPOINTS)}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a run folder; pass the --out folder of `python -m mgssl.train`")
    path, state, weights = _state_of(run_dir, which)
    try:
        cfg = from_dict(Config, state[rs.CONFIG])
    except (KeyError, ValueError) as e:
        raise ValueError(f"the config saved in {path} does not load with this version of the code ({e}); use the "
                         f"version that trained it (git commit {state.get(rs.GIT_COMMIT, 'unknown')})") from None
    if cfg.data.name not in IMAGE_DATASETS:
        raise ValueError(f"{run_dir} trained on {cfg.data.name}, held in memory as arrays; predicting and exporting "
                         f"work on runs of image files (data.name={' or '.join(IMAGE_DATASETS)})")
    in_channels = next(v.shape[1] for v in weights.values() if v.dim() == 4)  # the first convolution's input
    classes = state.get(rs.CLASSES)
    if not classes:  # a checkpoint from before class names were saved: the classifier's outputs, by number
        classes = [str(c) for c in range(next(v.shape[0] for v in reversed(weights.values()) if v.dim() == 2))]
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                       ("cpu" if device == "auto" else device))
    net = cfg.model.build(len(classes), in_channels)
    net.load_state_dict(weights)
    net.to(dev).eval()
    preprocess = Preprocess(cfg.data.image_size, cfg.data.resize_size, tuple(MEAN), tuple(STD))
    return LoadedModel(net, classes, preprocess, cfg, path, which, int(state.get(rs.STEP, -1)))


def default_checkpoint(run_dir) -> str:
    """best when the run kept a best.pt, else last."""
    return "best" if (Path(run_dir) / "checkpoints" / "best.pt").is_file() else "last"


def image_batches(files: list[str], preprocess: Preprocess, *, batch_size: int, device,
                  num_threads: int = 2, undecodable: Optional[set] = None):
    """(files, x) batches of the decodable `files` in order, preprocessed as the run evaluated; the
    files the decoder rejects are added to `undecodable` and left out."""
    import numpy as np
    import torch

    from mgssl.pipelines.dali import CorruptFiles, CorruptImageError, Transform, eval_batches

    class Collected(CorruptFiles):
        def report(self, found, candidates, error):
            if not found:
                raise CorruptImageError(f"the decoder failed on a batch of {', '.join(list(candidates)[:4])} ... "
                                        f"though each decodes alone ({error})") from error
            self.known.update(found)

    noted = Collected("skip")
    transform = Transform("eval", preprocess.image_size, preprocess.resize_size)
    labels = np.arange(len(files), dtype=np.int64)  # the label carries each image's position in `files`
    for x, index in eval_batches(files, labels, transform, batch_size=batch_size, device=torch.device(device),
                                 num_threads=num_threads, corrupt=noted):
        yield [files[i] for i in index.tolist()], x
    if undecodable is not None:
        undecodable.update(noted.known)
