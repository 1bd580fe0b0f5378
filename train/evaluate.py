"""Top-1 / top-5 error of a network over batches of (x, y)."""
from typing import Iterable

import torch
import torch.nn as nn


@torch.no_grad()
def error_counts(net: nn.Module, batches: Iterable, autocast) -> torch.Tensor:
    """(errors@1, errors@5, loss sum, count) as a float64 device tensor, summable across ranks.

    Nothing is read back to the host here: the caller reads the totals once, at the end."""
    was_training = net.training
    net.eval()
    totals = None
    for x, y in batches:
        with autocast:
            logits = net(x).float()  # (B, C)
        k = min(5, logits.shape[1])
        top = logits.topk(k, dim=1).indices  # (B, k)
        hit = top == y[:, None]
        row = torch.stack([(~hit[:, 0]).sum(), (~hit.any(dim=1)).sum(),
                           torch.nn.functional.cross_entropy(logits, y, reduction="sum"),
                           torch.full((), len(y), device=y.device)]).double()
        totals = row if totals is None else totals + row
    net.train(was_training)
    if totals is None:
        raise ValueError("no evaluation batches: the test set is empty")
    return totals


def errors_from_counts(totals: torch.Tensor) -> dict:
    err1, err5, loss, n = totals.tolist()  # a CPU-GPU sync point
    return {"top1_error": err1 / n, "top5_error": err5 / n, "test_loss": loss / n, "test_images": int(n)}
