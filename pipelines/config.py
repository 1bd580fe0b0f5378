"""What the data stage needs to know. Filled from the `data:` section of an experiment YAML."""
from dataclasses import dataclass, field
from typing import Optional, Union

from mgssl import runfolder as rf

DATASETS = ("digits", "cifar10", "cifar100", "svhn", "imagenet", "folder")
UNLABELED = ("disjoint", "all", "unlabeled_root")


@dataclass
class DataConfig:
    name: str = "digits"  # digits | cifar10 | cifar100 | svhn | imagenet | folder
    # folder holding the data set files (not needed for digits)
    root: Optional[str] = field(default=None, metadata=rf.HOW_RUN)
    labels: Union[int, float] = 50  # int: labeled images, equal per class; float <= 1: fraction of each class
    # Training images held out (never trained on) to pick checkpoints/best.pt: a count, equal per class, or a
    # fraction < 1 of each class; 0: no validation set and no best.pt
    validation: Union[int, float] = 0
    # reuse the labeled split saved by another run
    split_file: Optional[str] = field(default=None, metadata=rf.NOT_EXPERIMENT)
    # "disjoint": labeled images left out of the unlabeled set; "all": kept in; "unlabeled_root": only the
    # images of data.unlabeled_root are unlabeled data
    unlabeled: str = "disjoint"
    unlabeled_root: Optional[str] = None  # folder: extra images without labels (any layout, searched recursively)
    test_share: float = 0.1  # folder without val/ or test/: the share of each class held out as the test set
    batch_size: int = 32  # GLOBAL labeled batch, summed over GPUs; the unlabeled batch is the same size
    eval_batch_size: int = field(default=500, metadata=rf.HOW_RUN)  # global
    # ImageNet and folder crops: "paper" (resize 256 + random 224) or "authors" (random area 0.1-1)
    augment: str = "paper"
    # ImageNet and folder files that fail to decode: "skip" warns with the file's name, notes it in
    # corrupt_files.txt in the run folder and uses the next image instead; "error" stops, naming the file
    on_corrupt: str = "skip"
    workers: int = field(default=4, metadata=rf.HOW_RUN)  # CPU threads for decoding (ImageNet and folder)
    image_size: int = 224  # ImageNet and folder: crop side
    resize_size: int = 256  # ImageNet and folder: shortest edge before the crop ("paper" training, all evaluation)
    # ImageNet and folder: decode each labeled image once and keep it (uint8, shortest edge resize_size) in host
    # memory; about 33 GB per process for 10% of ImageNet (pipelines/cache.py). Needs augment=paper.
    labeled_cache: bool = False
    # DALI's decoder (ImageNet and folder; pipelines/README.md "Decoder settings")
    decode_device: str = "auto"  # auto: the GPU's decoder in a CUDA run, else the CPU | gpu | cpu
    hw_decoder_load: float = 0.65  # share of the JPEGs given to the hardware decoder (A100/H100), the rest to CUDA
    preallocate_width_hint: int = 5980  # GPU decoder buffers sized for ImageNet's largest image
    preallocate_height_hint: int = 6430  # (with preallocate_width_hint)
    device_memory_padding: int = 211_025_920  # bytes of headroom in the GPU decoder's device buffers
    host_memory_padding: int = 140_544_512  # bytes of headroom in its pinned host buffers
    use_mmap: bool = False  # let DALI's file reader (evaluation) mmap files; off, as on network file systems
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
        if self.workers < 1:
            raise ValueError(f"data.workers={self.workers}: the decoding pipeline needs at least 1 CPU thread")
        if self.labeled_cache and self.augment != "paper":
            raise ValueError(f"data.labeled_cache=true keeps images resized before the crop, which is the 'paper' "
                             f"augmentation; set data.augment=paper or data.labeled_cache=false")
        if self.decode_device not in ("auto", "gpu", "cpu"):
            raise ValueError(f"data.decode_device={self.decode_device!r}: choose auto, gpu or cpu")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"data.hw_decoder_load={self.hw_decoder_load}: give a share between 0 and 1")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be positive")
