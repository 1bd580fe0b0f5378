"""Losses and label arithmetic of one step (paper Eq. 6, 12, 13)."""
import torch
import torch.nn.functional as F


def fp32_or_wider(t: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors up to float32; float32 and float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def one_hot(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """(B,) class indices -> (B, C) one-hot rows of `dtype`. Unlike F.one_hot it does not check the
    labels' range, which reads two values back to the host at every call."""
    return (labels[:, None] == torch.arange(num_classes, device=labels.device)).to(dtype)


def soft_target_kl(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ softmax(logits)) averaged over the batch; with one-hot targets this is the CE."""
    return F.kl_div(F.log_softmax(fp32_or_wider(logits), dim=1), target, reduction="batchmean")


def consistency_mse(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """mean_i ||softmax(logits_i) - target_i||²."""
    return (torch.softmax(fp32_or_wider(logits), dim=1) - target).pow(2).sum(dim=1).mean()


def mixup_pairs(x_l, y_l_onehot, x_u, y_u, lam):
    """Cross-domain mixup (Eq. 12): pair i mixes labeled image i with unlabeled image i."""
    lam_x = lam.view(-1, *([1] * (x_l.dim() - 1))).to(x_l.dtype)  # (B, 1, 1, 1)
    lam_y = lam.view(-1, 1).to(y_u.dtype)  # (B, 1)
    x = torch.lerp(x_u, x_l, lam_x)
    y = torch.lerp(y_u, y_l_onehot, lam_y)
    return x, y
