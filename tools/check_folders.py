"""python -m mgssl.tools.check_folders ROOT [--threads T] [--batch-size B] [--json]

Decodes every image of an ImageNet-layout folder tree (ROOT/train/<class>/*, ROOT/val/<class>/*)
twice: with the DALI pipeline of the ImageNet path (pipelines/dali.py, its reader and decoder,
on the CPU) and with Pillow. It reports how far apart the two decodes are (mean and largest
absolute pixel difference, in 0-255 steps), the images each decodes per second, and every file
that either cannot decode or that they decode to different shapes."""
import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np


@dataclass
class Comparison:
    images: int = 0
    pixels: int = 0  # values compared (height x width x 3 per image)
    abs_sum: float = 0.0
    max_abs: int = 0
    max_file: str = ""  # the file with the largest difference
    differing_images: int = 0  # images with any value that differs
    shape_mismatch: list = field(default_factory=list)

    def add(self, path: str, dali: np.ndarray, pillow: np.ndarray) -> None:
        self.images += 1
        if dali.shape != pillow.shape:
            self.shape_mismatch.append(f"{path}: DALI {dali.shape}, Pillow {pillow.shape}")
            return
        diff = np.abs(dali.astype(np.int16) - pillow.astype(np.int16))
        self.pixels += diff.size
        self.abs_sum += float(diff.sum())
        largest = int(diff.max()) if diff.size else 0
        self.differing_images += largest > 0
        if largest > self.max_abs:
            self.max_abs, self.max_file = largest, path

    @property
    def mean_abs(self) -> float:
        return self.abs_sum / self.pixels if self.pixels else 0.0


def pillow_decode(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def dali_decode(files: list[str], *, batch_size: int, threads: int,
                clock: Callable[[], float] = time.perf_counter) -> Iterator[tuple[str, Optional[np.ndarray], float]]:
    """(file, RGB uint8 HWC array or None if DALI cannot decode it, seconds spent in DALI for it).

    A batch that fails is searched file by file for the culprit, and the pipeline is rebuilt
    without it from that batch on."""
    from mgssl.pipelines.dali import build_decode_pipeline, find_undecodable

    todo = list(files)
    while todo:
        began = clock()
        pipe = build_decode_pipeline(todo, batch_size=batch_size, num_threads=threads)
        build_s = clock() - began
        done = 0
        try:
            while done < len(todo):
                began = clock()
                (images,) = pipe.run()
                n = min(batch_size, len(todo) - done)
                arrays = [np.array(images.at(i)) for i in range(n)]
                each = (clock() - began + build_s) / n
                build_s = 0.0
                for path, array in zip(todo[done:done + n], arrays):
                    yield path, array, each
                done += n
            todo = []
        except RuntimeError:
            del pipe
            batch = todo[done:done + batch_size]
            bad = set(find_undecodable(batch))
            for path in batch:
                if path in bad:
                    yield path, None, 0.0
            if not bad:  # not a file's fault: let the error show
                raise
            todo = [p for p in todo[done:] if p not in bad]


def check(files: list[str], *, batch_size: int = 256, threads: int = 1, progress: Optional[Callable] = None) -> dict:
    """Both decodes of every file, compared; the timings count decoding only (not the comparison)."""
    result = Comparison()
    dali_s = pillow_s = 0.0
    undecodable = {"dali": [], "pillow": []}
    for k, (path, dali, seconds) in enumerate(dali_decode(files, batch_size=batch_size, threads=threads)):
        dali_s += seconds
        began = time.perf_counter()
        try:
            pillow = pillow_decode(path)
        except Exception:  # Pillow raises several types for broken files
            pillow = None
        pillow_s += time.perf_counter() - began
        if dali is None:
            undecodable["dali"].append(path)
        if pillow is None:
            undecodable["pillow"].append(path)
        if dali is not None and pillow is not None:
            result.add(path, dali, pillow)
        if progress is not None and (k + 1) % 10_000 == 0:
            progress(f"{k + 1}/{len(files)} images")
    decoded = {"dali": len(files) - len(undecodable["dali"]), "pillow": len(files) - len(undecodable["pillow"])}
    return {"files": len(files), "compared": result.images - len(result.shape_mismatch),
            "mean_abs_diff": result.mean_abs, "max_abs_diff": result.max_abs, "max_diff_file": result.max_file,
            "differing_images": result.differing_images, "shape_mismatch": result.shape_mismatch,
            "undecodable": undecodable, "dali_images_per_s": decoded["dali"] / dali_s if dali_s else None,
            "pillow_images_per_s": decoded["pillow"] / pillow_s if pillow_s else None,
            "dali_s": dali_s, "pillow_s": pillow_s, "threads": threads, "batch_size": batch_size}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mgssl check-folders", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="example:\n  OMP_NUM_THREADS=1 python -m mgssl.tools.check_folders data/c10/folders\n")
    p.add_argument("root", type=Path, help="the folder holding train/<class>/ and val/<class>/")
    p.add_argument("--threads", type=int, default=1, help="DALI decoding threads (Pillow uses one; default 1)")
    p.add_argument("--batch-size", type=int, default=256, help="images per DALI batch (default 256)")
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    args = p.parse_args(argv)
    from mgssl.pipelines.dali import DaliUnavailableError, require_dali
    from mgssl.pipelines.folders import load_image_folders
    from mgssl.pipelines.sources import DataMissingError

    try:
        if args.threads < 1 or args.batch_size < 1:
            raise ValueError("--threads and --batch-size must be at least 1")
        require_dali(gpu=False)  # the check decodes on the CPU
        data = load_image_folders(str(args.root))
    except (DataMissingError, DaliUnavailableError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    files = data.train_files + data.test_files
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    say(f"{len(files)} images in {args.root} ({len(data.train_files)} train, {len(data.test_files)} val, "
        f"{data.num_classes} classes)")
    result = check(files, batch_size=args.batch_size, threads=args.threads, progress=say)
    rate = lambda v: f"{v:,.0f} images/s" if v else "–"  # noqa: E731
    print(f"images: {result['files']}, compared: {result['compared']}, differing in any value: "
          f"{result['differing_images']}")
    print(f"absolute difference DALI vs Pillow (0-255): mean {result['mean_abs_diff']:.4f}, "
          f"max {result['max_abs_diff']}" + (f" ({result['max_diff_file']})" if result["max_abs_diff"] else ""))
    print(f"DALI CPU decode ({args.threads} thread(s), batch {args.batch_size}): {rate(result['dali_images_per_s'])} "
          f"({result['dali_s']:.1f} s); Pillow: {rate(result['pillow_images_per_s'])} ({result['pillow_s']:.1f} s)")
    problems = result["shape_mismatch"] + [f"{p}: DALI cannot decode it" for p in result["undecodable"]["dali"]] \
        + [f"{p}: Pillow cannot decode it" for p in result["undecodable"]["pillow"]]
    for line in problems:
        print(line)
    if args.json:
        print(json.dumps(result))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
