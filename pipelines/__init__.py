"""Data on disk -> paired labeled/unlabeled batches on the training device.

`pipelines` never imports `model` or `train`."""
import dataclasses
import os
import sys
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from mgssl.pipelines.config import DATASETS, DataConfig
from mgssl.pipelines.splits import (LabelSplit, balanced_split, load_split, per_class_counts, train_set_sha256,
                                   validation_counts)
from mgssl.runfolder import SPLIT as SPLIT_FILE


def resolve_split(cfg: DataConfig, labels, num_classes: int, seed: int, classes=None, names=()) -> LabelSplit:
    """The labeled split of a run: the file named by data.split_file (a resume names the one its run
    saved), else a new one drawn from the seed. Every rank computes the same split. The split keeps
    the class names and a fingerprint of the training set, and a saved one is refused for another."""
    source = cfg.split_file
    sha = train_set_sha256(labels, names)
    if source is None:
        return balanced_split(labels, num_classes, cfg.labels, seed, cfg.name, classes, sha, cfg.validation)
    split = load_split(source, cfg.name, labels, classes, sha)
    labels = np.asarray(labels, dtype=np.int64)
    held = int(validation_counts(labels, num_classes, cfg.validation).sum())
    if len(split.validation) != held:
        raise ValueError(f"{source} holds {len(split.validation)} validation images but data.validation="
                         f"{cfg.validation} asks for {held}; set data.validation to match the file, or drop "
                         "data.split_file to draw a new split")
    rest = np.setdiff1d(np.arange(len(labels)), split.validation)
    wanted = int(per_class_counts(labels[rest], num_classes, cfg.labels).sum())
    if len(split.labeled) != wanted:
        raise ValueError(f"{source} holds {len(split.labeled)} labeled images but data.labels={cfg.labels} asks for "
                         f"{wanted}; set data.labels to match the file, or drop data.split_file to draw a new split")
    return split


# A labeled batch this many times the labeled set is refused: it repeats every image in every batch.
BATCH_OVER_LABELED_LIMIT = 10


def check_fit(cfg: DataConfig, split: LabelSplit, labels, num_classes: int, unlabeled_size: int,
              warn: Callable[[str], None]) -> None:
    """Before anything is built or written: refuse a batch or a split that cannot fit the data, and
    warn, in one line each, about one that fits badly."""
    labeled = len(split.labeled)
    per_class = np.bincount(np.asarray(labels, dtype=np.int64)[split.labeled], minlength=num_classes)
    if (per_class == 0).any():
        raise ValueError(f"class {int(np.flatnonzero(per_class == 0)[0])} has no labeled image in the split; "
                         f"ask for at least {num_classes} labels (data.labels) so that every class has one")
    if unlabeled_size == 0:
        raise ValueError("the unlabeled set is empty; lower data.labels, set data.unlabeled=all, or add "
                         "data.unlabeled_root (folder data sets)")
    batch = cfg.batch_size
    if batch > BATCH_OVER_LABELED_LIMIT * labeled:
        raise ValueError(f"data.batch_size={batch} is {batch / labeled:.0f} times the {labeled} labeled images, so "
                         f"every batch repeats each of them; set data.batch_size to at most {labeled} (or label more "
                         "images with data.labels)")
    if batch > labeled:
        warn(f"warning: data.batch_size={batch} exceeds the {labeled} labeled images, so each labeled batch "
             f"repeats some of them; a batch of at most {labeled} does not")
    if batch > unlabeled_size:
        warn(f"warning: data.batch_size={batch} (also the unlabeled batch) exceeds the {unlabeled_size} unlabeled "
             f"images, so each unlabeled batch repeats some of them")


def check_global_batch(cfg: DataConfig, world_size: int) -> None:
    """The training batch is global: a process count that does not divide it would change the experiment.
    The evaluation batch need not divide: each process takes its share rounded down, which changes
    only the speed of evaluation, since every process evaluates all of its own images."""
    if cfg.batch_size % world_size:
        raise ValueError(f"data.batch_size={cfg.batch_size} is the GLOBAL batch, summed over all {world_size} "
                         f"processes, and must be divisible by {world_size}; change the process count, or set "
                         f"data.batch_size to a multiple of {world_size} (which changes the experiment)")


def _say(rank: int) -> Callable[[str], None]:
    return (lambda text: print(text, file=sys.stderr, flush=True)) if rank == 0 else (lambda text: None)


def build_data(cfg: DataConfig, *, seed: int, device, rank: int = 0, world_size: int = 1,
               run_dir: Optional[Path] = None):
    """The data of one run on one rank; `run_dir` receives the logs of corrupt and skipped files (the
    run saves the split itself, once it starts).

    The result has `.train` (endless (x_l, y_l, x_u) with state_dict/load_state_dict and
    unlabeled_epoch), `.eval_batches(subset)`, `.num_classes`, `.in_channels`, `.unlabeled_size`
    and `.split`, whichever pipeline serves the data set."""
    check_global_batch(cfg, world_size)
    if cfg.name == "folder":
        return _build_folder_data(cfg, seed=seed, device=device, rank=rank, world_size=world_size, run_dir=run_dir)
    if cfg.name == "imagenet":
        from mgssl.pipelines.dali import require_dali
        from mgssl.pipelines.folders import load_image_folders

        require_dali(gpu=str(device).startswith("cuda"))  # before any file is read: one line naming the extra
        from mgssl.pipelines.imagenet import ImageFolderData

        folders = load_image_folders(cfg.root, cfg.name)
        root = str(Path(cfg.root).expanduser())
        names = [os.path.relpath(f, root) for f in folders.train_files]
        split = _split_for_run(cfg, folders.train_labels, folders.num_classes, seed, folders.classes, names)
        check_fit(cfg, split, folders.train_labels, folders.num_classes,
                  len(split.unlabeled(cfg.unlabeled == "all")), _say(rank))
        return ImageFolderData(folders, split, include_labeled=cfg.unlabeled == "all", global_batch=cfg.batch_size,
                               eval_batch=cfg.eval_batch_size, seed=seed, device=device, augment=cfg.augment,
                               image_size=cfg.image_size, resize_size=cfg.resize_size, on_corrupt=cfg.on_corrupt,
                               num_threads=cfg.workers, rank=rank, world_size=world_size, run_dir=run_dir,
                               decoder=decoder_settings(cfg), labeled_cache=cfg.labeled_cache)
    from mgssl.pipelines.memory import InMemoryData
    from mgssl.pipelines.sources import ARRAY_READERS, DataMissingError

    if cfg.name not in ARRAY_READERS:
        raise NotImplementedError(f"data.name={cfg.name!r} has no pipeline yet")
    if cfg.download:
        from mgssl.pipelines.download import download

        download(cfg.name, cfg.root)
    try:
        arrays = ARRAY_READERS[cfg.name](cfg.root)
    except DataMissingError as e:
        if cfg.name == "digits":
            raise
        raise DataMissingError(f"{e}. With network access, data.download=true fetches it into data.root.") from None
    split = _split_for_run(cfg, arrays.train_labels, arrays.num_classes, seed)
    check_fit(cfg, split, arrays.train_labels, arrays.num_classes, len(split.unlabeled(cfg.unlabeled == "all")),
              _say(rank))
    return InMemoryData(arrays, split, include_labeled=cfg.unlabeled == "all", global_batch=cfg.batch_size,
                        eval_batch=cfg.eval_batch_size, seed=seed, device=device, rank=rank, world_size=world_size)


def decoder_settings(cfg: DataConfig):
    """The data.decode_* and decoder keys as the DALI pipeline's settings."""
    from mgssl.pipelines.dali import DecoderSettings

    return DecoderSettings(cfg.decode_device, cfg.hw_decoder_load, cfg.preallocate_width_hint,
                           cfg.preallocate_height_hint, cfg.device_memory_padding, cfg.host_memory_padding,
                           cfg.use_mmap)


def _build_folder_data(cfg: DataConfig, *, seed: int, device, rank: int, world_size: int,
                       run_dir: Optional[Path]):
    from mgssl.pipelines.class_folders import load_class_folders, skipped_summary, write_skipped
    from mgssl.pipelines.dali import require_dali

    require_dali(gpu=str(device).startswith("cuda"))  # before any file is read: one line naming the extra
    from mgssl.pipelines.imagenet import ImageFolderData

    say = _say(rank)
    folders = load_class_folders(cfg.root, cfg.unlabeled_root, cfg.test_share)
    root = Path(folders.root)
    names = [os.path.relpath(f, root) for f in folders.train_files]
    split = _split_for_run(cfg, folders.train_labels, folders.num_classes, seed, folders.classes, names)
    test_files = sorted(str(Path(f).relative_to(root)) for f in folders.test_files) if folders.held_out_test else []
    saved = split.extra.get("held_out_test")
    if saved is not None and saved != test_files:
        raise ValueError(f"the held-out test images under {root} differ from those saved with the split "
                         f"({cfg.split_file}): files were added or removed; start a new run in another --out folder")
    split = dataclasses.replace(split, extra={"held_out_test": test_files})
    only_extra = cfg.unlabeled == "unlabeled_root"
    unlabeled = (0 if only_extra else len(split.unlabeled(cfg.unlabeled == "all"))) + len(folders.unlabeled_files)
    check_fit(cfg, split, folders.train_labels, folders.num_classes, unlabeled, say)
    if folders.skipped:
        where = ""
        if run_dir is not None and rank == 0:
            where = f"; all of them are listed in {write_skipped(folders.skipped, run_dir)}"
        say(f"warning: {skipped_summary(folders.skipped, folders.files_seen)}{where}")
    return ImageFolderData(folders, split, include_labeled=cfg.unlabeled == "all", global_batch=cfg.batch_size,
                           eval_batch=cfg.eval_batch_size, seed=seed, device=device, augment=cfg.augment,
                           image_size=cfg.image_size, resize_size=cfg.resize_size, on_corrupt=cfg.on_corrupt,
                           num_threads=cfg.workers, rank=rank, world_size=world_size, run_dir=run_dir,
                           decoder=decoder_settings(cfg), labeled_cache=cfg.labeled_cache,
                           unlabeled_files=folders.unlabeled_files, only_unlabeled_files=only_extra)


def _split_for_run(cfg: DataConfig, labels, num_classes: int, seed: int, classes=None, names=()) -> LabelSplit:
    if num_classes < 2:
        found = f" ({', '.join(classes)})" if classes else ""
        raise ValueError(f"data.root={cfg.root!r} holds one class{found}; a classifier needs at least two classes "
                         "of training images: add the other class folders")
    split = resolve_split(cfg, labels, num_classes, seed, classes, names)
    if cfg.unlabeled == "disjoint" and len(split.labeled) + len(split.validation) == split.train_size \
            and not cfg.unlabeled_root:
        raise ValueError(f"data.labels={cfg.labels} labels all {split.train_size} training images, so the disjoint "
                         "unlabeled set is empty; ask for fewer labels, or set data.unlabeled=all")
    return split


__all__ = ["DATASETS", "DataConfig", "LabelSplit", "build_data", "check_fit", "check_global_batch", "resolve_split",
           "SPLIT_FILE"]
