"""Batched augmentation on the device: pad + random crop + optional flip + normalise.

Images arrive as uint8 (B, H, W, C); the result is float32 (B, C, H, W) in channels_last memory
(a permuted view of NHWC), the layout the conv kernels want."""
import torch
import torch.nn.functional as F


def random_crop_flip(images: torch.Tensor, pad: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """uint8 (B, H, W, C) -> uint8 (B, H, W, C): each image shifted by up to `pad` pixels (zero fill)
    and mirrored with probability 1/2 when `flip`."""
    b, h, w, _ = images.shape
    dev = images.device
    if pad:
        padded = F.pad(images, (0, 0, pad, pad, pad, pad))  # (B, H+2p, W+2p, C)
        dy = torch.randint(0, 2 * pad + 1, (b, 1, 1), device=dev, generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (b, 1, 1), device=dev, generator=gen)
        rows = dy + torch.arange(h, device=dev).view(1, h, 1)  # (B, H, 1)
        cols = dx + torch.arange(w, device=dev).view(1, 1, w)  # (B, 1, W)
        images = padded[torch.arange(b, device=dev).view(b, 1, 1), rows, cols]  # (B, H, W, C)
    if flip:
        mirror = torch.rand(b, device=dev, generator=gen) < 0.5
        images = torch.where(mirror.view(b, 1, 1, 1), images.flip(2), images)
    return images


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float32 (B, C, H, W) channels_last, (x/255 - mean) / std per channel."""
    scale = 1.0 / (255.0 * std)
    shift = -mean / std
    x = images.float() * scale + shift  # (B, H, W, C)
    return x.permute(0, 3, 1, 2)  # NCHW shape, NHWC memory
