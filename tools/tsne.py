"""python -m mgssl.tools.tsne CHECKPOINT_OR_RUN_DIR [more ...] --out PNG

The paper's Figure 3: the features (model.forward_features) of the labeled, unlabeled and test
images of a run's data set, embedded together in 2-D with t-SNE. One row per network: a panel per
subset coloured by class, then the three subsets together in red, blue and gray. Give the
labeled-only baseline and the full method to compare them as the paper does."""
import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np

SUBSETS = ("labeled", "unlabeled", "test")


def subset_features(restored, subset: str, max_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, D), labels (N,)) of one subset, at most `max_points` of them drawn at random."""
    import torch

    feats, labels = [], []
    with torch.no_grad():
        for x, y in restored.data.eval_batches(subset):
            feats.append(restored.net.forward_features(x).float().flatten(1).cpu())
            labels.append(y.cpu())
    if not feats:
        raise ValueError(f"the {subset} set of {restored.checkpoint} is empty; nothing to draw")
    feats, labels = torch.cat(feats).numpy(), torch.cat(labels).numpy()
    if len(labels) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(labels), size=max_points, replace=False))
        feats, labels = feats[keep], labels[keep]
    return feats, labels


def embed(features: list[np.ndarray], seed: int, perplexity: float = 30.0) -> list[np.ndarray]:
    """One t-SNE of all the subsets at once (so that their points share one map), split back."""
    from sklearn.manifold import TSNE

    joined = np.concatenate(features).astype(np.float32)
    perplexity = min(perplexity, max(1.0, (len(joined) - 1) / 3.0))  # TSNE needs perplexity < samples
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(joined)
    return np.split(points, np.cumsum([len(f) for f in features])[:-1])


def tsne_figure(paths: list, *, max_points: int = 1000, data_root: Optional[str] = None, device: str = "cpu",
                seed: int = 0, perplexity: float = 30.0, titles: Optional[list] = None, warn=print):
    """The figure and the points of each row: (Figure, [(title, {subset: (points, labels)})])."""
    from mgssl.tools import plots
    from mgssl.tools.runs import method_name, restore
    from mgssl.train import run_state as rs

    rows, num_classes = [], 0
    for i, path in enumerate(paths):
        restored = restore(path, data_root=data_root, device=device, warn=warn)
        num_classes = max(num_classes, int(restored.data.num_classes))
        feats = [subset_features(restored, s, max_points, seed + j) for j, s in enumerate(SUBSETS)]
        points = embed([f for f, _ in feats], seed, perplexity)
        cfg = restored.cfg
        title = titles[i] if titles else (f"{(restored.run_dir or restored.checkpoint).name}\n"
                                          f"{method_name(cfg.method.unlabeled, cfg.method.meta, cfg.method.mixup)}, "
                                          f"step {restored.state.get(rs.STEP, '?')}")
        rows.append((title, {s: (p, y) for s, p, (_, y) in zip(SUBSETS, points, feats)}))
    return plots.tsne_panels(rows, num_classes), rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mgssl tsne", description=__doc__.split("\n\n")[1],
                                epilog="example:\n  python -m mgssl.tools.tsne runs/baseline runs/full --out runs/tsne.png",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", type=Path, metavar="CHECKPOINT_OR_RUN_DIR",
                   help="checkpoint files, or run folders (their checkpoints/last.pt); one figure row each")
    p.add_argument("--out", type=Path, default=Path("runs/tsne.png"),
                   help="the PNG to write (default: runs/tsne.png)")
    p.add_argument("--max-points", type=int, default=1000,
                   help="at most this many images of each subset, drawn at random (default: 1000); t-SNE "
                        "time grows faster than linearly with the points")
    p.add_argument("--perplexity", type=float, default=30.0, help="t-SNE perplexity (default: 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsampling and of t-SNE (default: 0)")
    p.add_argument("--dpi", type=int, default=100, help="pixels per inch of the PNG; a row is 16 x 4.1 "
                   "inches (default: 100)")
    p.add_argument("--data-root", default=None, help="where the data set lies on this machine, if not where "
                   "it lay for training (data.root)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="where the features are computed; auto: the GPU if there is one (default)")
    args = p.parse_args(argv)
    if args.max_points < 2:
        p.error("--max-points must be at least 2")
    warn = lambda text: print(text, file=sys.stderr)  # noqa: E731
    try:
        fig, rows = tsne_figure(args.checkpoints, max_points=args.max_points, data_root=args.data_root,
                                device=args.device, seed=args.seed, perplexity=args.perplexity, warn=warn)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from mgssl.tools.plots import save
    from mgssl.tools.runs import output_error

    try:
        save(fig, args.out, dpi=args.dpi)
    except OSError as e:
        print(f"error: {output_error(e, '--out')}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{s} {len(rows[0][1][s][1])}" for s in SUBSETS)
    print(f"wrote {args.out} ({len(rows)} row{'s' if len(rows) > 1 else ''}; points per row: {counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
