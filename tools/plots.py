"""The paper's figures drawn from run summaries. Each function returns a matplotlib Figure, made
without pyplot (no global figure list) on the Agg canvas, so it works headless and in tests."""
import sys
from pathlib import Path
from typing import Optional

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mgssl.tools.runs import at_common_steps

# Figure 3 of the paper: labeled, unlabeled and test points in red, blue and gray.
SUBSET_COLOURS = {"labeled": "tab:red", "unlabeled": "tab:blue", "test": "tab:gray"}
METHOD_ORDER = ("labeled-only", "consistency only", "mixup", "meta", "meta + mixup")


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path: Path, dpi: int = 100) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def mean_curve(seeds: list[list[dict]], key: str) -> Optional[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(steps, mean, min, max) of the test accuracy (%) over the seeds of one variant, at the steps
    that every seed evaluated; None if there are none."""
    steps, errors = at_common_steps(seeds, key)
    if not steps:
        return None
    acc = 100.0 * (1.0 - np.array(errors))  # (seeds, steps)
    return np.asarray(steps), acc.mean(axis=0), acc.min(axis=0), acc.max(axis=0)


def accuracy_curves(variants: list[tuple[str, list[list[dict]]]], title: str = "") -> Figure:
    """Figure 1: test accuracy (%) against training steps, one line per variant: the mean over its
    seeds, with a band from the lowest to the highest seed where it has more than one. `variants`:
    [(name, [the evaluation rows of each seed])]. A second panel for top-5 accuracy when the runs
    logged it (data sets with more than 10 classes)."""
    has_top5 = any("top5_error" in row for _, seeds in variants for rows in seeds for row in rows)
    legend_outside = len(variants) > 6
    fig = new_figure((11 if has_top5 else 6.5) + (3 if legend_outside else 0), 4)
    keys = [("top1_error", "top-1")] + ([("top5_error", "top-5")] if has_top5 else [])
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    styles = ("-", "--", ":", "-.")  # past ten variants the colours repeat: the line style tells them apart
    for ax, (key, label) in zip(axes, keys):
        for i, (name, seeds) in enumerate(variants):
            curve = mean_curve(seeds, key)
            if curve is None:
                continue
            steps, mean, low, high = curve
            (line,) = ax.plot(steps, mean, linestyle=styles[(i // 10) % len(styles)],
                              marker="o" if len(steps) < 30 else None, markersize=3, label=name)
            if len(seeds) > 1:
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("training step")
        ax.set_ylabel(f"test {label} accuracy (%)")
        ax.grid(alpha=0.3)
    if legend_outside:
        axes[-1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), ncols=1 + len(variants) // 25)
    else:
        axes[0].legend(fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    return fig


def meta_signal_curves(variants: list[tuple[str, list[list[dict]]]]) -> Figure:
    """What drives the meta step, against training steps: the norm of the labeled gradient g and the
    mean L1 size of the pseudo-label update ‖ŷ − ỹ‖₁, one line per variant (mean over its seeds).
    `variants`: [(name, [the training log rows of each seed])]; variants without the meta term log neither."""
    fig = new_figure(11, 3.8)
    axes = fig.subplots(1, 2)
    for ax, (key, label) in zip(axes, (("labeled_grad_norm", "‖g‖, labeled gradient norm"),
                                       ("pseudo_label_shift", "‖ŷ − ỹ‖₁, pseudo-label update"))):
        for name, seeds in variants:
            steps, values = at_common_steps(seeds, key)
            if steps:
                ax.plot(steps, np.mean(values, axis=0), label=name)
        ax.set_yscale("log")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if any(ax.lines for ax in axes):
        axes[0].legend(fontsize="small", loc="best")
    return fig


def error_vs_labels(panels: list[tuple[str, dict]]) -> Figure:
    """Figure 2: test error (%) against the number of labels, one panel per data set, one line per
    method, mean ± std over seeds as error bars. `panels`: [(title, {method: [(labels, mean, std)]})]."""
    fig = new_figure(5.5 * len(panels), 4)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, lines) in zip(axes, panels):
        for method in sorted(lines, key=method_rank):
            labels, mean, std = zip(*sorted(lines[method]))
            ax.errorbar(labels, 100 * np.asarray(mean), yerr=100 * np.asarray(std), marker="o", capsize=3,
                        label=method)
        ax.set_xscale("log")
        ticks = sorted({p[0] for pts in lines.values() for p in pts})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("number of labeled examples")
        ax.set_ylabel("test error (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def tsne_panels(rows: list[tuple[str, dict]], num_classes: int) -> Figure:
    """Figure 3: for each network (a row), the 2-D points of the labeled, unlabeled and test images
    coloured by class, then all three together in red, blue and gray.
    `rows`: [(row title, {subset: (points (N, 2), labels (N,))})]."""
    fig = new_figure(16, 4.1 * len(rows))
    grid = fig.subplots(len(rows), 4, squeeze=False)
    cmap = _class_colours(num_classes)
    for (title, subsets), axes in zip(rows, grid):
        for ax, subset in zip(axes[:3], SUBSET_COLOURS):
            points, labels = subsets[subset]
            ax.scatter(points[:, 0], points[:, 1], c=cmap(labels % cmap.N), s=6, linewidths=0)
            ax.set_title(f"{subset} ({len(labels)})")
        together = axes[3]
        # The largest set first, the labeled points (the fewest) last and larger, so that none hides the rest.
        for subset in sorted(SUBSET_COLOURS, key=lambda name: -len(subsets[name][1])):
            points, _ = subsets[subset]
            together.scatter(points[:, 0], points[:, 1], c=SUBSET_COLOURS[subset], s=14 if subset == "labeled" else 6,
                             linewidths=0, label=subset, alpha=0.6)
        together.set_title("all three")
        together.legend(fontsize="small", markerscale=2)
        axes[0].set_ylabel(title)
        for ax in axes:
            ax.set_xticks([])
            ax.set_yticks([])
    return fig


def _class_colours(num_classes: int):
    from matplotlib import colormaps

    if num_classes <= 10:
        return colormaps["tab10"]
    if num_classes <= 20:
        return colormaps["tab20"]
    return colormaps["hsv"].resampled(num_classes)


if __name__ == "__main__":  # a library: `python -m` on it would otherwise print nothing and exit 0
    sys.exit("mgssl.tools.plots is a library, not a command; `mgssl --help` lists the commands")
