"""ImageNet-style folders through NVIDIA DALI: read, decode (on the GPU when there is one), crop,
flip and normalise, straight into torch tensors in channels_last.

One pipeline per stream for the whole run. A training stream's pipeline is built once and fed by
`external_source` with the encoded bytes of this rank's files, batch after batch, in `IndexStream`
order; a pool of threads reads the files a few batches ahead, so neither the reading nor a pipeline
build sits on the training thread as the run goes on (only a resume or a corrupt file builds anew).

Exact resume. DALI's own shuffling and random operators keep state inside the pipeline, so instead
the order comes from `IndexStream` (a pure function of the seed and the position) and every random
number of the augmentation comes from a NumPy generator seeded by (seed, stream, rank, batch number)
and fed in beside the bytes. A resumed run starts its pipeline at the saved batch and gets the same
images with the same crops as a run that never stopped.

Sharding. Each rank computes only its own slice of every global batch and reads only those files.

Corrupt files. DALI's decode errors do not name the file. When a batch fails, the files it may have
come from are decoded one by one on the CPU to find the culprit. With `on_corrupt="skip"` (default)
the file is named in a warning, written to `corrupt_files.txt` in the run folder, and replaced by the
next good image of the same set from then on (the replacement is part of the saved state, so resumes
stay exact); with `on_corrupt="error"` the run stops with an error naming the file."""
import math
import sys
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from mgssl import runfolder as rf
from mgssl.pipelines.streams import IndexStream

MEAN = (0.485, 0.456, 0.406)  # ImageNet RGB statistics, as fractions of 255
STD = (0.229, 0.224, 0.225)
# batches DALI prepares ahead so that pipe.run() finds one ready (a failure may surface this many late)
PREFETCH = 2


class CorruptImageError(RuntimeError):
    pass


class DaliUnavailableError(RuntimeError):
    """DALI is not installed, or its build does not fit this machine: one line naming the extra to install."""


# The DALI wheels, one per CUDA major version, and the extra of setup.cfg that installs each.
DALI_WHEELS = {12: "nvidia-dali-cuda120", 13: "nvidia-dali-cuda130"}
INSTALL_HINT = ('pip install "mgssl[cuda12]" (NVIDIA driver 525.60 or newer, or no GPU) or '
                'pip install "mgssl[cuda13]" (driver 580 or newer)')


def installed_dali_wheels() -> dict[int, str]:
    """CUDA major -> the DALI wheel of it that is installed."""
    from importlib import metadata

    found = {}
    for major, name in DALI_WHEELS.items():
        try:
            metadata.version(name)
            found[major] = name
        except metadata.PackageNotFoundError:
            pass
    return found


def dali_problem(importable: bool, wheels: dict[int, str], driver_cuda: Optional[int]) -> Optional[str]:
    """What keeps DALI from running here, in one line, or None. `driver_cuda`: the CUDA major version the
    GPU driver supports (None: no GPU is used, and DALI's CPU operators run with any of its wheels)."""
    if len(wheels) > 1:
        names = " and ".join(wheels.values())
        keep = wheels.get(driver_cuda) if driver_cuda is not None else None
        which = f"keep {keep}" if keep else "keep the one of the machine's CUDA"
        return (f"{names} are both installed and share one import name (nvidia.dali); {which} and "
                f"pip uninstall the other")
    if not importable:
        return f"the ImageNet-folder pipeline needs NVIDIA DALI, which is not installed: {INSTALL_HINT}"
    if driver_cuda is not None and wheels:
        (major, name), = wheels.items()
        if major > driver_cuda:
            return (f"{name} is built for CUDA {major}, but this machine's NVIDIA driver supports CUDA {driver_cuda}: "
                    f'pip uninstall {name} && pip install "mgssl[cuda{driver_cuda}]"'
                    if driver_cuda in DALI_WHEELS else f"{name} needs a driver for CUDA {major}; update the driver")
    return None


def driver_cuda_major() -> Optional[int]:
    """The CUDA major version that the GPU driver supports (cuDriverGetVersion), or None without one."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
        version = ctypes.c_int()
        if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return version.value // 1000


def require_dali(gpu: bool) -> None:
    """Raise DaliUnavailableError, naming the extra to install, where DALI cannot run the pipeline (on a
    GPU where `gpu`, else on the CPU)."""
    try:
        import nvidia.dali  # noqa: F401
        importable = True
    except ImportError:
        importable = False
    problem = dali_problem(importable, installed_dali_wheels(), driver_cuda_major() if gpu else None)
    if problem:
        raise DaliUnavailableError(problem)


@dataclass(frozen=True)
class Transform:
    """What happens to a decoded image.
    paper: shortest edge to `resize_size`, random `image_size` square crop, flip.
    authors: random crop of 10-100% of the area with aspect 0.8-1.25, resized to `image_size`, flip.
    eval: shortest edge to `resize_size`, centre `image_size` crop."""
    kind: str
    image_size: int = 224
    resize_size: int = 256
    flip: bool = True

    def __post_init__(self):
        if self.kind not in ("paper", "authors", "eval"):
            raise ValueError(f"unknown transform {self.kind!r}; choose paper, authors or eval")
        if self.resize_size < self.image_size:
            raise ValueError(f"resize size {self.resize_size} is smaller than the crop {self.image_size}")

    @property
    def random_numbers(self) -> int:
        """Uniforms per sample: flip, x, y, and for `authors` an area and an aspect per candidate crop."""
        return {"eval": 0, "paper": 3, "authors": 3 + 2 * CROP_TRIES}[self.kind]


CROP_TRIES = 10  # candidate crops per image for `authors`, as torchvision's RandomResizedCrop tries


@dataclass(frozen=True)
class DecoderSettings:
    """Where DALI decodes and how its GPU ("mixed") decoder is tuned; filled from the data.decode_* keys.
    The padding and preallocation defaults are those of NVIDIA's ResNet-50 DALI example for ImageNet
    (sized for its largest images, so the decoder does not reallocate mid-run)."""
    device: str = "auto"  # auto: the GPU when the run has one, else the CPU | gpu | cpu
    hw_decoder_load: float = 0.65  # share of the images sent to the hardware JPEG decoder (DALI's default)
    preallocate_width_hint: int = 5980
    preallocate_height_hint: int = 6430
    device_memory_padding: int = 211_025_920  # bytes
    host_memory_padding: int = 140_544_512  # bytes
    use_mmap: bool = False  # file reader (evaluation): mmap is slow or unsafe on network file systems

    def __post_init__(self):
        if self.device not in ("auto", "gpu", "cpu"):
            raise ValueError(f"data.decode_device={self.device!r}: choose auto, gpu or cpu")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ValueError(f"data.hw_decoder_load={self.hw_decoder_load}: give a share between 0 and 1")

    def backend(self, device_id: Optional[int]) -> str:
        """DALI's decoder backend: "mixed" (GPU) or "cpu"."""
        if self.device == "gpu" and device_id is None:
            raise ValueError("data.decode_device=gpu needs a CUDA run; set data.decode_device=cpu or auto")
        return "mixed" if device_id is not None and self.device != "cpu" else "cpu"

    def decoder_arguments(self, backend: str) -> dict:
        if backend != "mixed":
            return {}
        return {"hw_decoder_load": self.hw_decoder_load, "preallocate_width_hint": self.preallocate_width_hint,
                "preallocate_height_hint": self.preallocate_height_hint,
                "device_memory_padding": self.device_memory_padding,
                "host_memory_padding": self.host_memory_padding}


def augmentation_numbers(seed: int, stream_id: int, rank: int, batch: int, size: int, count: int) -> np.ndarray:
    """Uniform [0, 1) numbers for one batch of one rank, float32 (size, count): a pure function of its key."""
    return np.random.default_rng([seed, stream_id, rank, batch]).random((size, count), dtype=np.float32)


def random_area_window(numbers, height, width):
    """DALI graph: the crop of `authors` as (anchor, shape), fractions of the image, (x, y) order.

    Candidate k covers 10-100% of the area with aspect (width/height) 0.8-1.25 drawn log-uniformly;
    the first candidate that fits inside the image is taken, else the whole image. All candidates are
    computed at once as vectors, and the first fit is picked with a score, a max and a one-hot sum."""
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    k = CROP_TRIES
    area = 0.1 + 0.9 * numbers[3:3 + k]  # (K,)
    aspect = dmath.exp(math.log(0.8) + (math.log(1.25) - math.log(0.8)) * numbers[3 + k:3 + 2 * k])
    # (wf W)(hf H) = area W H and (wf W)/(hf H) = aspect
    wf = dmath.sqrt(area * aspect * height / width)
    hf = dmath.sqrt(area * width / (aspect * height))
    fits = fn.cast((wf <= 1.0) & (hf <= 1.0), dtype=types.FLOAT)
    score = fits * types.Constant(np.arange(k, 0, -1, dtype=np.float32))  # earlier candidates score higher
    best = fn.reductions.max(score)
    first = fn.cast((score == best) & (best > 0), dtype=types.FLOAT)  # one-hot of the first fit, or zeros
    none = 1.0 - fn.cast(best > 0, dtype=types.FLOAT)
    w_frac = fn.reductions.sum(first * wf) + none
    h_frac = fn.reductions.sum(first * hf) + none
    return fn.stack((1.0 - w_frac) * numbers[1], (1.0 - h_frac) * numbers[2]), fn.stack(w_frac, h_frac)


def _graph(jpegs, labels, transform: Transform, decoder: DecoderSettings, device_id: Optional[int], numbers):
    """The DALI operators after the reader; `numbers` is a DataNode of per-sample uniforms or None."""
    from nvidia.dali import fn, types

    backend = decoder.backend(device_id)
    decode = dict(device=backend, output_type=types.RGB, **decoder.decoder_arguments(backend))
    on_gpu = device_id is not None and backend == "cpu"  # CPU decode for a GPU run: the rest runs on the GPU
    if transform.kind == "authors":
        shape = fn.peek_image_shape(jpegs, dtype=types.FLOAT)  # (H, W, C), read from the header
        anchor, window = random_area_window(numbers, shape[0], shape[1])
        images = fn.decoders.image_slice(jpegs, anchor, window, normalized_anchor=True, normalized_shape=True,
                                         **decode)
        images = images.gpu() if on_gpu else images
        images = fn.resize(images, resize_x=transform.image_size, resize_y=transform.image_size)
    else:
        images = fn.decoders.image(jpegs, **decode)
        images = images.gpu() if on_gpu else images
        images = fn.resize(images, resize_shorter=transform.resize_size)
    return crop_normalise(images, transform, numbers), labels


def crop_normalise(images, transform: Transform, numbers):
    """DALI graph: the crop (paper, eval), flip and normalisation of uint8 HWC images already resized
    (shortest edge `resize_size`, or for `authors` already cropped and resized)."""
    from nvidia.dali import fn, types

    mean = [255.0 * m for m in MEAN]
    std = [255.0 * s for s in STD]
    size = transform.image_size
    crop = {} if transform.kind == "authors" else {"crop": (size, size)}
    if transform.kind == "paper":
        crop.update(crop_pos_x=numbers[1], crop_pos_y=numbers[2])
    if transform.kind != "eval" and transform.flip:
        crop["mirror"] = fn.cast(numbers[0] < 0.5, dtype=types.INT32)
    return fn.crop_mirror_normalize(images, dtype=types.FLOAT, output_layout="HWC", mean=mean, std=std, **crop)


def build_pipeline(files: Sequence[str], labels: Sequence[int], transform: Transform, *, batch_size: int,
                   shard_id: int = 0, num_shards: int = 1, device_id: Optional[int] = None, num_threads: int = 2,
                   numbers: Optional[Callable[[int], np.ndarray]] = None, decoder: DecoderSettings = DecoderSettings()):
    """A built DALI pipeline reading `files` in order (this shard's contiguous slice), giving
    (float HWC normalised images, int32 labels): one pass, for evaluation. `numbers(iteration)`
    supplies the augmentation's uniforms; the decode runs on GPU `device_id`, or on the CPU when it
    is None."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def pipe():
        jpegs, lab = fn.readers.file(files=list(files), labels=[int(v) for v in labels], random_shuffle=False,
                                     shard_id=shard_id, num_shards=num_shards, stick_to_shard=True,
                                     pad_last_batch=True, dont_use_mmap=not decoder.use_mmap, name="reader")
        uniforms = None
        if transform.random_numbers:
            uniforms = fn.external_source(source=lambda info: list(numbers(info.iteration)), batch_info=True,
                                          batch=True, dtype=types.FLOAT, ndim=1)
        return _graph(jpegs, lab, transform, decoder, device_id, uniforms)

    p = pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
             prefetch_queue_depth=PREFETCH, exec_async=True, exec_pipelined=True)
    p.build()
    return p


def build_stream_pipeline(source: Callable, transform: Transform, *, batch_size: int, device_id: Optional[int],
                          num_threads: int, decoder: DecoderSettings = DecoderSettings()):
    """A built DALI pipeline fed by `source(info)` -> (encoded images, int32 labels, float32 uniforms),
    one batch per call with `info.iteration` counting from 0: the long-lived pipeline of a stream."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def pipe():
        jpegs, lab, uniforms = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                                  dtype=[types.UINT8, types.INT32, types.FLOAT], ndim=[1, 1, 1])
        return _graph(jpegs, lab, transform, decoder, device_id, uniforms if transform.random_numbers else None)

    p = pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
             prefetch_queue_depth=PREFETCH, exec_async=True, exec_pipelined=True)
    p.build()
    return p


def build_decode_pipeline(files: Sequence[str], *, batch_size: int, device_id: Optional[int] = None,
                          num_threads: int = 1):
    """A built DALI pipeline that reads `files` in order and only decodes them (RGB uint8 HWC, each
    at its own size), with the reader and decoder of `build_pipeline`: for checking the decode
    itself. It runs synchronously, so the time of `run()` is the time of the work."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def pipe():
        jpegs, _ = fn.readers.file(files=list(files), random_shuffle=False, pad_last_batch=True, name="reader")
        return fn.decoders.image(jpegs, device="cpu" if device_id is None else "mixed", output_type=types.RGB)

    p = pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0, prefetch_queue_depth=1,
             exec_async=False, exec_pipelined=False)
    p.build()
    return p


def to_torch(images, labels, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """DALI outputs -> float32 (B, C, H, W) channels_last and int64 (B,) on `device`."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    dense = images.as_tensor()
    x = torch.empty(dense.shape(), dtype=torch.float32, device=device)  # (B, H, W, C)
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    feed_ndarray(dense, x, cuda_stream=stream)
    y = torch.from_numpy(np.array(labels.as_tensor()).reshape(-1).astype(np.int64))
    if device.type == "cuda":
        y = y.pin_memory()  # so that the copy below is queued, not staged while the host waits
    y = y.to(device, non_blocking=True)
    return x.permute(0, 3, 1, 2), y  # NCHW shape, NHWC memory


def find_undecodable(files: Sequence[str]) -> list[str]:
    """The files among `files` that DALI's CPU decoder rejects (each tried alone)."""
    from nvidia.dali import fn, pipeline_def, types

    bad = []
    for path in dict.fromkeys(files):  # unique, in order
        try:
            data = np.fromfile(path, dtype=np.uint8)
        except OSError:
            bad.append(path)
            continue

        @pipeline_def
        def check():
            raw = fn.external_source(source=lambda: [data], batch=True, dtype=types.UINT8, ndim=1)
            return fn.peek_image_shape(raw), fn.decoders.image(raw, device="cpu", output_type=types.RGB)

        try:
            p = check(batch_size=1, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_async=False,
                      exec_pipelined=False)
            p.build()
            p.run()
        except Exception:
            bad.append(path)
    return bad


class CorruptFiles:
    """The files of one run found undecodable: what to do with them and where they are noted."""

    def __init__(self, policy: str, run_dir: Optional[Path] = None):
        if policy not in ("skip", "error"):
            raise ValueError(f"data.on_corrupt={policy!r}: choose 'skip' or 'error'")
        self.policy, self.run_dir = policy, run_dir
        self.known: set[str] = set()

    def report(self, found: list[str], candidates: Sequence[str], error: Exception) -> None:
        if not found:
            names = ", ".join(list(dict.fromkeys(candidates))[:8])
            raise CorruptImageError(f"the data pipeline failed on a batch from these files: {names} ... but each "
                                    f"decodes alone on the CPU; the GPU decoder may reject one of them "
                                    f"(re-encode it, or remove it). DALI said: {error}") from error
        if self.policy == "error":
            raise CorruptImageError(f"cannot decode {found[0]}" + (f" (and {len(found) - 1} more)" if found[1:] else "")
                                    + "; delete or re-encode it, or set data.on_corrupt=skip to train without it")
        for path in found:
            if path in self.known:
                continue
            self.known.add(path)
            warnings.warn(f"skipping undecodable image {path}; it is replaced by the next image of the same set "
                          f"(data.on_corrupt=skip)", RuntimeWarning, stacklevel=3)
            print(f"[data] skipping undecodable image {path}", file=sys.stderr, flush=True)
            if self.run_dir is not None:
                rf.append_text(Path(self.run_dir) / rf.CORRUPT, path + "\n")  # never through a planted link


def read_encoded(path: str) -> np.ndarray:
    """A file's bytes as uint8, or no bytes when it cannot be read (the decoder then fails on it, and
    the failure is traced to the file like any undecodable image)."""
    try:
        return np.fromfile(path, dtype=np.uint8)
    except OSError:
        return np.zeros(0, dtype=np.uint8)


def read_all(paths: Sequence[str]) -> list[np.ndarray]:
    return [read_encoded(path) for path in paths]


class ReadAhead:
    """The encoded bytes of a stream's batches, read by a pool of threads `ahead` batches before they are
    asked for (file reads release the GIL, so they overlap both the decoder and the training step)."""

    def __init__(self, files_of_batch: Callable[[int], list[str]], threads: int, ahead: int):
        self.files_of_batch, self.ahead = files_of_batch, ahead
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="mgssl-read")
        self.pending: dict[int, Future] = {}

    def batch(self, batch: int) -> list[np.ndarray]:
        for b in range(batch, batch + self.ahead + 1):
            if b not in self.pending:  # one task per batch: batches read in parallel, little overhead per file
                self.pending[b] = self.pool.submit(read_all, self.files_of_batch(b))
        for b in [b for b in self.pending if b < batch]:  # asked out of order: never needed again
            del self.pending[b]
        return self.pending.pop(batch).result()

    def close(self) -> None:
        self.pending = {}
        self.pool.shutdown(wait=True, cancel_futures=True)  # a closed stream has no thread still reading its files


class FileStream:
    """Endless augmented batches of one set of files (labeled or unlabeled) for one rank, from one
    DALI pipeline built at the first batch (and again only after a resume or a corrupt file)."""

    def __init__(self, files: Sequence[str], labels: np.ndarray, members: np.ndarray, transform: Transform, *,
                 global_batch: int, seed: int, stream_id: int, device: torch.device, rank: int = 0,
                 world_size: int = 1, num_threads: int = 2, corrupt: Optional[CorruptFiles] = None,
                 decoder: DecoderSettings = DecoderSettings(), read_ahead: int = 2 * PREFETCH, cache=None):
        self.files, self.labels, self.members = files, labels, np.asarray(members, dtype=np.int64)
        self.transform, self.seed, self.stream_id, self.device = transform, seed, stream_id, device
        self.rank, self.world_size, self.num_threads = rank, world_size, num_threads
        self.decoder, self.read_ahead = decoder, read_ahead
        self.cache = cache  # pipelines.cache.DecodedImages: the set decoded once (`paper` only), or None
        self.local = global_batch // world_size
        self.index = IndexStream(len(self.members), seed * 1000 + stream_id, global_batch, rank, world_size)
        # The feeder's own copy: it runs ahead of `index`, and each keeps its epoch's permutation cached.
        self.feed_index = IndexStream(len(self.members), seed * 1000 + stream_id, global_batch, rank, world_size)
        self.corrupt = corrupt or CorruptFiles("error")
        self.skipped: set[int] = set()  # positions in `members` whose file is undecodable
        self.builds = 0  # pipelines built so far: one per run start, plus one per resume or corrupt file
        self._pipe, self._reader, self._start, self._table = None, None, 0, None

    def _stand_ins(self) -> np.ndarray:
        """Position -> the position actually read: itself, or for an undecodable file the next good one."""
        if self._table is not None:
            return self._table
        n = len(self.members)
        table = np.arange(n, dtype=np.int64)
        if len(self.skipped) == n:
            raise CorruptImageError("every image of this set is undecodable; check data.root")
        for pos in self.skipped:
            step = 1
            while (pos + step) % n in self.skipped:
                step += 1
            table[pos] = (pos + step) % n
        self._table = table
        return table

    def batch_members(self, batch: int) -> np.ndarray:
        """Indices into `files` of this rank's share of global batch `batch`, stand-ins applied."""
        return self.members[self._stand_ins()[self.feed_index.batch_indices(batch, self.rank).numpy()]]

    def batch_files(self, batch: int) -> list[str]:
        return [self.files[i] for i in self.batch_members(batch)]

    def _feed(self, info):
        """external_source's callback: everything the pipeline needs for its next batch."""
        batch = self._start + info.iteration
        chosen = self.batch_members(batch)
        numbers = augmentation_numbers(self.seed, self.stream_id, self.rank, batch, self.local,
                                       max(1, self.transform.random_numbers))
        labels = self.labels[chosen].astype(np.int32).reshape(-1, 1)
        images = [self.cache.images[i] for i in chosen] if self.cache is not None else self._reader.batch(batch)
        return images, labels, numbers  # dense arrays for the rest: DALI takes them whole

    def _build(self) -> None:
        self._close()  # free the old pipeline's threads and buffers first
        self._start = self.index.batches_done
        if self.cache is not None:
            self._build_cached()
        else:
            self._reader = ReadAhead(self.batch_files, self.num_threads, self.read_ahead)
            self._pipe = build_stream_pipeline(self._feed, self.transform, batch_size=self.local,
                                               device_id=_device_id(self.device), num_threads=self.num_threads,
                                               decoder=self.decoder)
        self.builds += 1

    def _build_cached(self) -> None:
        from mgssl.pipelines.cache import build_cached_pipeline

        bad = self.cache.fill(self.files, self.members, self.transform, batch_size=self.local,
                              device_id=_device_id(self.device), num_threads=self.num_threads, decoder=self.decoder,
                              corrupt=self.corrupt)
        if bad:
            self.skipped |= {int(p) for p, m in enumerate(self.members) if int(m) in bad}
            self._table = None
        self._pipe = build_cached_pipeline(self._feed, self.transform, batch_size=self.local,
                                           device_id=_device_id(self.device), num_threads=self.num_threads)

    def _close(self) -> None:
        self._pipe = None
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._pipe is None:
                self._build()
            try:
                images, labels = self._pipe.run()
            except Exception as e:  # a decode failure makes the whole pipeline unusable
                self._close()
                done = self.index.batches_done
                candidates = [f for b in range(done, done + PREFETCH + 1) for f in self.batch_files(b)]
                found = find_undecodable(candidates)
                self.corrupt.report(found, candidates, e)
                bad = set(found)
                self.skipped |= {int(p) for p, m in enumerate(self.members) if self.files[m] in bad}
                self._table = None
                continue  # a new pipeline from this batch, without the file
            self.index.position += self.index.global_batch
            return to_torch(images, labels, self.device)

    @property
    def epoch(self) -> float:
        return self.index.epoch

    def state_dict(self) -> dict:
        return {"position": self.index.position, "skipped": sorted(self.skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.index.load_state_dict(state)
        self.skipped = {int(p) for p in state.get("skipped", [])}
        self._table = None
        self._close()


def _device_id(device: torch.device) -> Optional[int]:
    if device.type == "cuda":
        return device.index if device.index is not None else torch.cuda.current_device()
    return None


class PairedFileBatches:
    """Endless (x_l, y_l, x_u): two independent file streams, labeled and unlabeled."""

    def __init__(self, labeled: FileStream, unlabeled: FileStream):
        self.labeled, self.unlabeled = labeled, unlabeled

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x_l, y_l = self.labeled.next_batch()
        x_u, _ = self.unlabeled.next_batch()
        return x_l, y_l, x_u

    @property
    def unlabeled_epoch(self) -> float:
        return self.unlabeled.epoch

    def state_dict(self) -> dict:
        return {"labeled": self.labeled.state_dict(), "unlabeled": self.unlabeled.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.labeled.load_state_dict(state["labeled"])
        self.unlabeled.load_state_dict(state["unlabeled"])


class EvalBatches:
    """The evaluation batches of one file list, from one DALI pipeline built at the first evaluation
    and kept for the later ones: each evaluation reads one epoch of its reader, which pads the last
    batch, so every epoch starts at the first file. A file found undecodable, or an evaluation left
    before its end, makes the next evaluation build a new pipeline (without the files known bad)."""

    def __init__(self, files: Sequence[str], labels: np.ndarray, transform: Transform, *, batch_size: int,
                 device: torch.device, num_threads: int = 2, corrupt: Optional[CorruptFiles] = None,
                 decoder: DecoderSettings = DecoderSettings()):
        self.files, self.labels = list(files), np.asarray(labels, dtype=np.int64)
        self.transform, self.batch_size, self.device = transform, batch_size, device
        self.num_threads, self.decoder = num_threads, decoder
        self.corrupt = corrupt or CorruptFiles("error")
        self.builds = 0  # pipelines built so far
        self._kept: Optional[tuple[list[int], object]] = None  # (the files it reads, the pipeline)

    def _pipeline(self, todo: list[int]):
        if self._kept is not None and self._kept[0] == todo:
            return self._kept[1]
        self._kept = None
        self.builds += 1
        return build_pipeline([self.files[i] for i in todo], self.labels[todo], self.transform,
                              batch_size=self.batch_size, device_id=_device_id(self.device),
                              num_threads=self.num_threads, decoder=self.decoder)

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(x, y) batches of the files in order, each file once; undecodable files are dropped (skip)
        or stop the evaluation with their name (error)."""
        files, batch_size = self.files, self.batch_size
        keep = [i for i, f in enumerate(files) if f not in self.corrupt.known]
        done = 0  # images of `keep` already yielded
        while done < len(keep):
            todo = keep[done:]
            pipe = self._pipeline(todo)
            self._kept = None  # given back below only once its epoch is read to the end
            try:
                for start in range(0, len(todo), batch_size):
                    images, y = pipe.run()
                    x, y = to_torch(images, y, device=self.device)
                    n = min(batch_size, len(todo) - start)  # the reader pads the last batch by repetition
                    done += n
                    yield x[:n], y[:n]
            except Exception as e:
                if isinstance(e, CorruptImageError):
                    raise
                del pipe
                candidates = [files[i] for i in keep[done:done + (1 + PREFETCH) * batch_size]]
                found = find_undecodable(candidates)
                self.corrupt.report(found, candidates, e)
                bad = set(found)
                keep = keep[:done] + [i for i in keep[done:] if files[i] not in bad]
                continue
            if len(todo) == len(keep):  # it read the whole list: the next evaluation starts it again
                self._kept = (todo, pipe)


def eval_batches(files: Sequence[str], labels: np.ndarray, transform: Transform, *, batch_size: int,
                 device: torch.device, num_threads: int = 2, corrupt: Optional[CorruptFiles] = None,
                 decoder: DecoderSettings = DecoderSettings()) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass of (x, y) batches of `files` in order, from a pipeline of its own (`EvalBatches`)."""
    return EvalBatches(files, labels, transform, batch_size=batch_size, device=device, num_threads=num_threads,
                       corrupt=corrupt, decoder=decoder).batches()
