"""tools.tsne (the paper's Figure 3) on the checkpoints of real short digits runs."""
import json

import numpy as np
import pytest
from PIL import Image

from tool_runs import shared_runs
from mgssl.tools.tsne import SUBSETS, main, tsne_figure

pytestmark = pytest.mark.slow
MAX_POINTS = 60


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.fixture(scope="module")
def figure(runs_root):
    paths = [runs_root / "labels50/baseline-s0", runs_root / "labels50/full-s0" / "checkpoints" / "last.pt"]
    return tsne_figure(paths, max_points=MAX_POINTS, warn=lambda text: None)


def test_one_row_per_network_with_four_panels(figure):
    fig, rows = figure
    assert len(fig.axes) == 2 * 4
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[3] == titles[7] == "all three"
    assert [t.split(" (")[0] for t in titles[:3]] == list(SUBSETS)
    assert "labeled-only" in rows[0][0] and "meta + mixup" in rows[1][0]
    for ax, subset in zip(fig.axes[:3], SUBSETS):  # the panels draw the points of their subset
        offsets = ax.collections[0].get_offsets()
        assert np.allclose(offsets, rows[0][1][subset][0])
    together = fig.axes[3]
    assert sorted(c.get_label() for c in together.collections) == sorted(SUBSETS)
    assert sum(len(c.get_offsets()) for c in together.collections) == sum(len(rows[0][1][s][1]) for s in SUBSETS)


def test_the_points_are_the_runs_subsets(figure, runs_root):
    from mgssl.pipelines.sources import load_digits_arrays

    _, rows = figure
    arrays = load_digits_arrays()
    labeled = json.loads((runs_root / "labels50/baseline-s0" / "labeled_split.json").read_text())["labeled"]
    for _, subsets in rows:
        points, labels = subsets["labeled"]  # 50 labeled images, fewer than MAX_POINTS: all of them
        assert list(labels) == list(arrays.train_labels[sorted(labeled)])
        assert len(subsets["unlabeled"][1]) == len(subsets["test"][1]) == MAX_POINTS
        assert set(subsets["test"][1]) <= set(range(10))
        for subset in SUBSETS:
            assert subsets[subset][0].shape == (len(subsets[subset][1]), 2)
            assert np.isfinite(subsets[subset][0]).all()


def test_the_command_line_writes_a_png(runs_root, tmp_path, capsys):
    out = tmp_path / "fig" / "tsne.png"
    assert main([str(runs_root / "labels100/full-s0"), "--out", str(out), "--max-points", "40",
                 "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (1600, 410)  # one row: 16 x 4.1 inches at 100 dpi
