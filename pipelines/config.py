"""What the data stage needs to know. Filled from the `data:` section of an experiment YAML."""
from dataclasses import dataclass
from typing import Optional, Union

DATASETS = ("digits", "cifar10", "cifar100", "svhn", "imagenet", "folder")
UNLABELED = ("disjoint", "all", "unlabeled_root")


@dataclass
class DataConfig:
    name: str = "digits"  # one of DATASETS
    root: Optional[str] = None  # folder holding the data set files (not needed for digits)
    labels: Union[int, float] = 50  # int: labeled images, equal per class; float <= 1: fraction of each class
    # Training images held out (never trained on) to pick checkpoints/best.pt: a count, equal per class, or a
    # fraction < 1 of each class; 0: no validation set and no best.pt
    validation: Union[int, float] = 0
    split_file: Optional[str] = None  # reuse the labeled split saved by another run
    # "disjoint": labeled images left out of the unlabeled set; "all": kept in; "unlabeled_root": only the
    # images of data.unlabeled_root are unlabeled data
    unlabeled: str = "disjoint"
    unlabeled_root: Optional[str] = None  # folder: extra images without labels (any layout, searched recursively)
    test_share: float = 0.1  # folder without val/ or test/: the share of each class held out as the test set
    batch_size: int = 32  # GLOBAL labeled batch, summed over GPUs; the unlabeled batch is the same size
    eval_batch_size: int = 500  # global
    # ImageNet and folder crops: "paper" (resize 256 + random 224) or "authors" (random area 0.1-1)
    augment: str = "paper"
    # ImageNet and folder files that fail to decode: "skip" warns with the file's name, notes it in
    # corrupt_files.txt in the run folder and uses the next image instead; "error" stops, naming the file
    on_corrupt: str = "skip"
    workers: int = 4  # CPU threads for decoding (ImageNet and folder)
    image_size: int = 224  # ImageNet and folder: crop side
    resize_size: int = 256  # ImageNet and folder: shortest edge before the crop ("paper" training, all evaluation)
    download: bool = False  # CIFAR/SVHN: fetch the files into data.root when missing (never by default)

    def __post_init__(self):
        if self.name not in DATASETS:
            raise ValueError(f"data.name={self.name!r}: choose one of {DATASETS}")
        if self.unlabeled not in UNLABELED:
            raise ValueError(f"data.unlabeled={self.unlabeled!r}: choose one of {', '.join(UNLABELED)}")
        if self.unlabeled_root is not None and self.name != "folder":
            raise ValueError(f"data.unlabeled_root is read only with data.name=folder (not {self.name}); "
                             "set it to null")
        if self.unlabeled == "unlabeled_root" and not self.unlabeled_root:
            raise ValueError("data.unlabeled=unlabeled_root needs data.unlabeled_root: the folder of images "
                             "without labels")
        if isinstance(self.validation, bool) or not (
            (isinstance(self.validation, int) and self.validation >= 0)
            or (isinstance(self.validation, float) and 0 <= self.validation < 1)
        ):
            raise ValueError(f"data.validation={self.validation!r}: give a count (e.g. 100), a fraction per "
                             "class (e.g. 0.1) or 0 for none")
        if not 0 < self.test_share < 1:
            raise ValueError(f"data.test_share={self.test_share}: give the share of each class held out as "
                             "the test set, between 0 and 1 (e.g. 0.1)")
        if self.augment not in ("paper", "authors"):
            raise ValueError(f"data.augment={self.augment!r}: choose 'paper' or 'authors'")
        if isinstance(self.labels, bool) or not (
            (isinstance(self.labels, int) and self.labels > 0)
            or (isinstance(self.labels, float) and 0 < self.labels <= 1)
        ):
            raise ValueError(f"data.labels={self.labels!r}: give a count (e.g. 4000) or a fraction per class "
                             "(e.g. 0.1; 1.0 labels every training image)")
        if self.on_corrupt not in ("skip", "error"):
            raise ValueError(f"data.on_corrupt={self.on_corrupt!r}: choose 'skip' or 'error'")
        if not 0 < self.image_size <= self.resize_size:
            raise ValueError(f"data.image_size={self.image_size} must be positive and at most "
                             f"data.resize_size={self.resize_size}")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be positive")
