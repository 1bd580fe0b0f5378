"""The trainer on an ImageNet-layout folder through the DALI pipeline (CPU), including an exact resume.
A small network keeps it quick: the data path, not the network, is under test."""
import pytest
import torch

from fake_datasets import write_image_folders

pytest.importorskip("nvidia.dali")


def overrides(root, steps):
    return ("data.name=imagenet", f"data.root={root}", "data.labels=0.25", "data.batch_size=4",
            "data.eval_batch_size=8", "data.image_size=16", "data.resize_size=20", "data.workers=1",
            "data.augment=authors", "model.name=digits_cnn", f"train.steps={steps}", "train.eval_every=2",
            "train.checkpoint_every=2", "train.log_every=2", "train.device=cpu", "optim.warmup_steps=1",
            "method.consistency_rampup=1")


@pytest.mark.slow
def test_training_on_image_folders_resumes_to_the_same_weights(tmp_path):
    from mgssl.train.config import load_config
    from mgssl.train.engine import run

    root = write_image_folders(tmp_path / "data", num_classes=3, per_class_train=8, per_class_val=2)
    straight = run(load_config("digits", overrides(root, 4)), tmp_path / "straight")
    assert straight["steps"] == 4 and straight["num_labels"] == 6 and straight["dataset"] == "imagenet"
    run(load_config("digits", overrides(root, 2)), tmp_path / "split")
    run(load_config("digits", overrides(root, 4)), tmp_path / "split", resume=True)
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert a["data"] == b["data"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name


def imagenet_defaults(root, steps, *extra):
    """resnet18_imagenet_10pct as shipped (bf16, the fp32 meta window, the labeled cache) on a tiny folder
    and a tiny network, uncompiled (the CPU's inductor would take minutes)."""
    return ("data.root=" + str(root), "data.labels=0.25", "data.batch_size=4", "data.eval_batch_size=8",
            "data.image_size=16", "data.resize_size=20", "data.workers=1", "model.name=digits_cnn",
            "train.epochs=null", f"train.steps={steps}", "train.eval_every=100", f"train.checkpoint_every={steps}",
            "train.log_every=1", "train.device=cpu", "train.compile=off", "train.progress=false",
            "optim.warmup_epochs=null", "optim.warmup_steps=1", *extra)


@pytest.mark.slow
def test_the_imagenet_defaults_run_no_fp32_meta_pass_after_their_window(tmp_path, monkeypatch):
    import mgssl.train.meta as meta
    from mgssl.train.config import load_config
    from mgssl.train.engine import run

    entered = []
    real = meta._full_precision
    monkeypatch.setattr(meta, "_full_precision", lambda device: entered.append(1) or real(device))
    root = write_image_folders(tmp_path / "data", num_classes=3, per_class_train=8, per_class_val=2)
    shipped = load_config("resnet18_imagenet_10pct")
    assert (shipped.train.precision, shipped.method.estimator, shipped.data.labeled_cache) == ("bf16", "jvp", True)
    assert shipped.method.fp32_meta_steps > 0 and shipped.train.compile != "off" and shipped.model.channels_last
    counts = {}
    for steps in (2, 5):
        entered.clear()
        cfg = load_config("resnet18_imagenet_10pct", imagenet_defaults(root, steps, "method.fp32_meta_steps=2"))
        run(cfg, tmp_path / f"run{steps}")
        counts[steps] = len(entered)
    assert counts[2] > 0  # the window runs the meta part in fp32
    assert counts[5] == counts[2]  # and nothing after it does
