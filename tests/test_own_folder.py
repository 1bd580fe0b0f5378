"""Your own images in, a model out: a folder of class sub-folders in mixed formats, sizes and colour
modes (with an unlabeled folder and broken files) trained from one command, predicted and exported."""
import csv
import json
import re

import numpy as np
import pytest
import torch

from fake_datasets import break_jpeg, damage_png, write_class_folders, write_unlabeled_folder
from mgssl.pipelines import DataConfig, LabelSplit, build_data, check_fit
from mgssl.pipelines.class_folders import SKIPPED_LOG, load_class_folders
from mgssl.pipelines.splits import balanced_split
from mgssl.runfolder import RUN_FILES

# Tiny sizes: a narrow Conv-Large on 16-pixel crops, a few steps.
TINY = ("data.image_size=16", "data.resize_size=18", "data.batch_size=4", "data.eval_batch_size=8", "data.workers=1",
        "model.name=convlarge", "model.width=0.0625", "train.steps=4", "train.epochs=null", "train.eval_every=2",
        "train.checkpoint_every=2", "train.log_every=2", "train.ema=0.5", "optim.warmup_epochs=null",
        "optim.warmup_steps=0", "train.progress=false", "train.tensorboard=false", "train.device=cpu")


@pytest.fixture
def own_images(tmp_path):
    """Three classes of eight images each, an unlabeled folder, and three files that cannot be used."""
    root = write_class_folders(tmp_path / "photos")
    unlabeled = write_unlabeled_folder(tmp_path / "more")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "dog" / "empty.png").write_bytes(b"")
    break_jpeg(root / "fox" / "img7.jpg")
    return root, unlabeled


def command(main, argv, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of a command's main(argv), run in this process."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def train(tmp_path, capsys, *settings):
    from mgssl.train.cli import main

    return command(main, ["folder", "--out", tmp_path / "run", "--set", *TINY, *settings], capsys)


@pytest.mark.slow
def test_train_predict_and_export_a_folder_of_ones_own_images(tmp_path, capsys, own_images):
    from mgssl.tools import export, predict

    root, unlabeled = own_images
    code, _, err = train(tmp_path, capsys, f"data.root={root}", f"data.unlabeled_root={unlabeled}")
    assert code == 0, err[-3000:]
    run = tmp_path / "run"
    # The three unusable files are named in one warning and listed in the run folder.
    warning = [line for line in err.splitlines() if "skipped 3 of" in line]
    assert len(warning) == 1 and "notes.txt" in warning[0]
    listed = (run / SKIPPED_LOG).read_text()
    assert all(name in listed for name in ("notes.txt", "empty.png", "img7.jpg"))
    final = json.loads((run / "final.json").read_text())
    assert final["dataset"] == "folder" and final["classes"] == ["cat", "dog", "fox"]
    assert {"best_val_error", "best_val_test_error", "ema_test_error"} <= final.keys()
    for name in ("best.pt", "last.pt"):
        assert torch.load(run / "checkpoints" / name, weights_only=True)["classes"] == ["cat", "dog", "fox"]
    split = json.loads((run / "labeled_split.json").read_text())
    assert split["classes"] == ["cat", "dog", "fox"] and len(split["held_out_test"]) == 3 and split["validation"]

    # Predict: a folder of images of every format with broken files (one that opens but does not
    # decode among them); each broken one gets a row with the reason and a line on stderr.
    damage_png(root / "cat" / "damaged.png")
    preds = tmp_path / "preds.csv"
    code, _, err = command(predict.main, [run, root, "--topk", 2, "--out", preds], capsys)
    assert code == 0, err[-3000:]
    rows = list(csv.DictReader(preds.open()))
    good = [r for r in rows if not r["error"]]
    assert len(good) == 23 and {r["class_1"] for r in good} <= {"cat", "dog", "fox"}
    assert all(float(r["prob_1"]) + float(r["prob_2"]) <= 1 + 1e-5 and float(r["prob_1"]) >= float(r["prob_2"])
               for r in good)
    broken = {"notes.txt", "empty.png", "img7.jpg", "damaged.png"}
    assert {r["file"].rsplit("/", 1)[-1] for r in rows if r["error"]} == broken
    assert all(name in err for name in broken)
    # The other weights predict too: the last checkpoint, and the weight average.
    for which in ("last", "ema"):
        code, out, err = command(predict.main, [run, root, "--checkpoint", which, "--out", preds], capsys)
        assert code == 0 and "23 images predicted" in out, err[-3000:]

    # Export to each format; the command checks the outputs against the checkpoint before success.
    formats = ["torchscript", "onnx", "safetensors"]
    for fmt, module in (("onnx", "onnxruntime"), ("safetensors", "safetensors")):
        try:
            __import__(module)
        except ImportError:
            formats.remove(fmt)
    for fmt in formats:
        code, out, err = command(export.main, [run, "--format", fmt, "--out", tmp_path / f"model.{fmt}"], capsys)
        assert code == 0 and "outputs equal to the checkpoint's" in out, err[-3000:]
        assert "images of" in out  # checked on images of the data set, not random inputs


def test_exports_give_the_checkpoints_outputs_and_carry_the_metadata(tmp_path, own_images):
    """In process, on a checkpoint written by hand: each format loaded back equals the network."""
    from mgssl.model import build_model
    from mgssl.tools.export import FORMATS, WRITERS, export
    from mgssl.train.config import load_config, to_dict

    root, _ = own_images
    cfg = load_config("folder", (f"data.root={root}", *TINY))
    torch.manual_seed(0)
    net = build_model("convlarge", 3, width=0.0625)
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    torch.save({"model": net.state_dict(), "config": to_dict(cfg), "classes": ["cat", "dog", "fox"], "step": 7},
               tmp_path / "run" / "checkpoints" / "last.pt")
    x = torch.randn(3, 3, 16, 16)
    expected = net.eval()(x)
    for fmt in FORMATS:
        out = tmp_path / f"m.{fmt}"
        try:
            report = export(tmp_path / "run", fmt, out, checkpoint="last")
        except ImportError:
            continue  # the optional package of this format is not installed
        if "max_abs_difference" not in report:
            continue  # onnx without onnxruntime: written, not run
        got, meta = WRITERS[fmt][1](out, x)
        assert torch.allclose(got.float(), expected, atol=1e-4), fmt
        assert meta["classes"] == ["cat", "dog", "fox"] and meta["image_size"] == 16 and meta["resize_size"] == 18
        assert len(meta["mean"]) == 3 and len(meta["std"]) == 3 and meta["step"] == 7


def test_every_format_and_colour_mode_decodes_to_rgb_in_its_class(tmp_path, own_images):
    root, unlabeled = own_images
    cfg = DataConfig(name="folder", root=str(root), unlabeled_root=str(unlabeled), labels=1.0, unlabeled="all",
                     validation=0.2, batch_size=4, eval_batch_size=30, image_size=16, resize_size=18, workers=1)
    data = build_data(cfg, seed=0, device="cpu", run_dir=tmp_path / "run")
    assert data.classes == ["cat", "dog", "fox"]
    folders = load_class_folders(str(root), str(unlabeled))
    assert len(folders.unlabeled_files) == 6 and len(folders.skipped) == 3
    assert data.unlabeled_size == len(folders.train_files) - len(data.split.validation) + 6
    # Validation, test and training images are three disjoint sets.
    assert not set(folders.test_files) & set(folders.train_files)
    x, y = next(iter(data.eval_batches("test")))
    assert x.shape == (3, 3, 16, 16) and sorted(y.tolist()) == [0, 1, 2]
    # Class c is brighter than class c-1 whatever the file's format and colour mode.
    means = [x[y == c].mean().item() for c in range(3)]
    assert means[0] < means[1] < means[2]


def test_a_val_folder_is_the_test_set_when_there_is_one(tmp_path):
    write_class_folders(tmp_path / "d" / "train", per_class=4)
    write_class_folders(tmp_path / "d" / "val", per_class=2, seed=5)
    folders = load_class_folders(str(tmp_path / "d"))
    assert not folders.held_out_test and len(folders.test_files) == 6 and len(folders.train_files) == 12
    assert all("/val/" in f for f in folders.test_files)


def test_the_held_out_test_share_does_not_depend_on_the_seed(tmp_path):
    write_class_folders(tmp_path / "d", per_class=10)
    cfg = DataConfig(name="folder", root=str(tmp_path / "d"), labels=0.5, test_share=0.2, batch_size=2,
                     eval_batch_size=8, image_size=16, resize_size=18, workers=1)
    a, b = (build_data(cfg, seed=s, device="cpu") for s in (0, 1))
    assert a.data.test_files == b.data.test_files and len(a.data.test_files) == 6
    assert not np.array_equal(a.split.labeled, b.split.labeled)


@pytest.mark.parametrize("case, message", [
    ("empty class", "the class folder .*dog holds no images"),
    ("no images", "has no class sub-folders"),
    ("too many labels", "data.labels asks for 20 labeled images of class"),
    ("batch far over labels", "data.batch_size=64 is 21 times the 3 labeled images"),
    ("only unreadable", "holds no images .*1 unusable files"),
])
def test_bad_inputs_are_refused_in_one_line_before_any_run_file(tmp_path, capsys, case, message):
    root = tmp_path / "photos"
    settings = []
    if case == "no images":
        root.mkdir()
        (root / "readme.txt").write_text("photos go here")
    else:
        write_class_folders(root, per_class=4)
        if case == "empty class":
            for f in (root / "dog").iterdir():
                f.unlink()
        if case == "only unreadable":
            for f in (root / "dog").iterdir():
                f.unlink()
            (root / "dog" / "a.png").write_text("not a png")
        if case == "too many labels":
            settings = ["data.labels=60"]
        if case == "batch far over labels":
            settings = ["data.labels=3", "data.unlabeled=all", "data.batch_size=64", "data.validation=0"]
    code, _, err = train(tmp_path, capsys, f"data.root={root}", *settings)
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    assert re.search(message, lines[0]), lines[0]
    assert not [name for name in (*RUN_FILES, SKIPPED_LOG) if (tmp_path / "run" / name).exists()]


def test_a_batch_larger_than_the_labeled_set_warns_and_a_class_without_labels_is_refused():
    labels = np.repeat(np.arange(3), 8)
    said = []
    check_fit(DataConfig(name="folder", labels=6, batch_size=12), balanced_split(labels, 3, 6, 0, "folder"), labels, 3,
              18, said.append)
    assert len(said) == 1 and "exceeds the 6 labeled images" in said[0]
    with pytest.raises(ValueError, match="class 1 has no labeled image"):  # a split file of only class 0
        check_fit(DataConfig(name="folder", labels=6, batch_size=4), LabelSplit("folder", 24, 0, np.array([0, 1])),
                  labels, 3, 18, said.append)


@pytest.mark.cuda
def test_a_run_trained_on_a_gpu_predicts_there_as_on_the_cpu(tmp_path, capsys, own_images):
    from mgssl.tools import predict

    root, unlabeled = own_images
    code, _, err = train(tmp_path, capsys, f"data.root={root}", f"data.unlabeled_root={unlabeled}", "train.device=cuda")
    assert code == 0, err[-3000:]
    rows = {device: predict.predict(tmp_path / "run", root, topk=3, device=device, warn=lambda text: None)
            for device in ("cpu", "cuda")}
    assert [r["file"] for r in rows["cpu"]] == [r["file"] for r in rows["cuda"]]
    for a, b in zip(rows["cpu"], rows["cuda"]):
        if "error" not in a:  # the GPU decoder may round a pixel differently: probabilities close, not equal
            assert abs(a["prob_1"] - b["prob_1"]) < 0.05


@pytest.mark.slow
def test_a_folder_run_with_unlabeled_images_resumes_bit_identical_best_and_average(tmp_path, own_images):
    from mgssl.train.config import load_config
    from mgssl.train.engine import run

    root, unlabeled = own_images
    settings = (*TINY, f"data.root={root}", f"data.unlabeled_root={unlabeled}", "train.eval_every=1",
                "train.checkpoint_every=3", "optim.schedule=step")  # its rates do not depend on the length

    def config(steps):
        return load_config("folder", (*settings, f"train.steps={steps}"))

    run(config(6), tmp_path / "straight")
    run(config(3), tmp_path / "stopped")
    run(config(6), tmp_path / "stopped", resume=True)
    for name in ("best.pt", "last.pt"):
        a, b = (torch.load(tmp_path / r / "checkpoints" / name, weights_only=True) for r in ("straight", "stopped"))
        assert a["step"] == b["step"] and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"]), name
    a, b = (torch.load(tmp_path / r / "checkpoints" / "last.pt", weights_only=True)["ema"]["averaged"]
            for r in ("straight", "stopped"))
    assert all(torch.equal(a[k], b[k]) for k in a)
