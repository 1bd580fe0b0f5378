"""The labeled set decoded once (`data.labeled_cache=true`).

The labeled stream cycles through its small set hundreds of times (at 10% labels on ImageNet, each
labeled image comes back about every 250 steps), so decoding it every time doubles the decode work of a
run. With the cache, each labeled image is decoded and resized (shortest edge `data.resize_size`) once,
when the stream starts, and kept as uint8 HWC in host memory; every batch then only crops, flips and
normalises it. This is the `paper` augmentation's own order (resize, then crop), so the batches are
bit-identical to those of the uncached stream, and resume stays exact.

Memory: the sum of H x W x 3 bytes at the resize size, held by every process. For ImageNet at 10% labels
(128k images, about 256 x 340 each) that is about 33 GB per process, 267 GB on an 8-GPU node."""
import sys
from typing import Optional, Sequence

import numpy as np

from mgssl.pipelines.dali import PREFETCH, CorruptFiles, DecoderSettings, Transform, crop_normalise, \
    find_undecodable


class DecodedImages:
    """uint8 HWC images at the resize size, by index into the data set's file list."""

    def __init__(self):
        self.images: dict[int, np.ndarray] = {}

    @property
    def nbytes(self) -> int:
        return sum(image.nbytes for image in self.images.values())

    def fill(self, files: Sequence[str], indices: Sequence[int], transform: Transform, *, batch_size: int,
             device_id: Optional[int], num_threads: int, decoder: DecoderSettings, corrupt: CorruptFiles) -> set[int]:
        """Decode files[i] for i in `indices` (those not held yet); returns the indices that cannot be decoded
        (after `corrupt` has reported them: named and skipped, or an error)."""
        todo = [int(i) for i in indices if int(i) not in self.images]
        bad: set[int] = set()
        while todo:
            pipe = build_resize_pipeline([files[i] for i in todo], transform, batch_size=batch_size,
                                         device_id=device_id, num_threads=num_threads, decoder=decoder)
            done = 0
            try:
                while done < len(todo):
                    (images,) = pipe.run()
                    images = images.as_cpu() if hasattr(images, "as_cpu") else images
                    for k in range(min(batch_size, len(todo) - done)):  # the reader pads the last batch
                        self.images[todo[done + k]] = np.array(images.at(k), copy=True)
                    done += min(batch_size, len(todo) - done)
            except Exception as e:  # a decode failure: find the file, report it, go on after it
                del pipe
                pending = todo[done:done + (1 + PREFETCH) * batch_size]
                found = set(find_undecodable([files[i] for i in pending]))
                corrupt.report(sorted(found), [files[i] for i in pending], e)
                bad |= {i for i in pending if files[i] in found}
                todo = [i for i in todo[done:] if i not in bad]
                continue
            todo = []
        print(f"[data] labeled cache: {len(self.images):,} images decoded once, {self.nbytes / 1e9:.2f} GB of host "
              "memory (data.labeled_cache=false decodes them every time instead)", file=sys.stderr, flush=True)
        return bad


def build_resize_pipeline(files: Sequence[str], transform: Transform, *, batch_size: int, device_id: Optional[int],
                          num_threads: int, decoder: DecoderSettings):
    """A built DALI pipeline that reads `files` in order, decodes and resizes them (shortest edge
    `resize_size`): uint8 HWC, the images the cache keeps."""
    from nvidia.dali import fn, pipeline_def, types

    backend = decoder.backend(device_id)

    @pipeline_def
    def pipe():
        jpegs, _ = fn.readers.file(files=list(files), random_shuffle=False, pad_last_batch=True,
                                   dont_use_mmap=not decoder.use_mmap, name="reader")
        images = fn.decoders.image(jpegs, device=backend, output_type=types.RGB, **decoder.decoder_arguments(backend))
        return fn.resize(images, resize_shorter=transform.resize_size)

    p = pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0, prefetch_queue_depth=PREFETCH)
    p.build()
    return p


def build_cached_pipeline(source, transform: Transform, *, batch_size: int, device_id: Optional[int],
                          num_threads: int):
    """A built DALI pipeline fed by `source(info)` -> (uint8 HWC images, int32 labels, float32 uniforms):
    the crop, flip and normalisation of cached images (on the GPU in a CUDA run)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def pipe():
        images, labels, uniforms = fn.external_source(source=source, num_outputs=3, batch=True, batch_info=True,
                                                      dtype=[types.UINT8, types.INT32, types.FLOAT], ndim=[3, 1, 1],
                                                      layout=["HWC", "", ""])
        images = images.gpu() if device_id is not None else images
        return crop_normalise(images, transform, uniforms), labels

    p = pipe(batch_size=batch_size, num_threads=num_threads, device_id=device_id, seed=0,
             prefetch_queue_depth=PREFETCH, exec_async=True, exec_pipelined=True)
    p.build()
    return p
