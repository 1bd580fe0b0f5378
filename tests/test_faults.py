"""Bad input and faults: each gets one clear message, a non-zero exit, and loses nothing saved."""
import errno

import pytest
import torch

import mgssl.train.engine as engine_module
from mgssl.train import checkpoint as ckpt
from mgssl.train.cli import main
from mgssl.train.config import load_config
from mgssl.train.engine import NonFiniteLossError, run

SHORT = ("train.steps=30", "train.eval_every=10", "train.checkpoint_every=10", "train.log_every=5",
         "train.progress=false", "train.tensorboard=false")


def assert_clean_error(capsys, code, *fragments):
    err = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in err and err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def poison_inputs_from_step(monkeypatch, first_bad_step):
    """Feeds NaN images to the step from `first_bad_step` on (the loss, then the weights, turn NaN)."""
    real_step, calls = engine_module.train_step, []

    def step(parts, batch, **kwargs):
        calls.append(1)
        if len(calls) > first_bad_step:
            x_l, y_l, x_u = batch
            batch = (torch.full_like(x_l, float("nan")), y_l, x_u)
        return real_step(parts, batch, **kwargs)

    monkeypatch.setattr(engine_module, "train_step", step)


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    poison_inputs_from_step(monkeypatch, 13)  # steps 1-13 are clean; step 14 sees NaN
    with pytest.raises(NonFiniteLossError, match="NaN or inf at or before step 15") as err:
        run(load_config("digits", SHORT), tmp_path)
    assert str(tmp_path / "checkpoints" / "last.pt") in str(err.value)
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 10 and ckpt.all_finite(ckpt.tensors_of(state["model"], state["optimizer"]))
    assert not (tmp_path / "final.json").exists()


def test_nan_loss_from_the_command_line_is_one_clear_line(tmp_path, monkeypatch, capsys):
    poison_inputs_from_step(monkeypatch, 3)
    code = main(["digits", "--out", str(tmp_path), "--set", *SHORT])
    assert_clean_error(capsys, code, "NaN or inf", "No checkpoint had been written yet")


def test_a_full_disk_while_saving_loses_nothing(tmp_path, monkeypatch, capsys):
    real_write, writes = ckpt._write_file, []

    def write_then_run_out_of_space(path, data):
        writes.append(path)
        if len(writes) == 1:
            return real_write(path, data)
        with open(path, "wb") as f:  # half a file reaches the disk, then the disk is full
            f.write(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "_write_file", write_then_run_out_of_space)
    code = main(["digits", "--out", str(tmp_path), "--set", *SHORT])
    assert_clean_error(capsys, code, "no space left", "--resume", str(tmp_path / "checkpoints"))
    assert len(writes) == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.pt"]  # no half-written file
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["step"] == 10

    monkeypatch.setattr(ckpt, "_write_file", real_write)  # space freed: the same command with --resume
    assert main(["digits", "--out", str(tmp_path), "--resume", "--set", *SHORT]) == 0
    assert torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)["step"] == 30


def test_a_missing_data_path_names_it(tmp_path, capsys):
    missing = tmp_path / "no-such-folder"
    code = main(["convlarge_cifar10_4k", "--out", str(tmp_path / "run"), "--set", f"data.root={missing}",
                 "train.device=cpu"])
    assert_clean_error(capsys, code, str(missing), "cifar-10-batches-py")


def test_an_impossible_split_says_what_is_possible(tmp_path, capsys):
    code = main(["digits", "--out", str(tmp_path), "--set", "data.labels=5000"])
    assert_clean_error(capsys, code, "data.labels", "ask for at most")


def test_a_bad_key_exits_with_a_suggestion(tmp_path, capsys):
    code = main(["digits", "--out", str(tmp_path), "--set", "optim.lrr=0.1"])
    assert code == 2
    assert_clean_error(capsys, code, "optim.lr")


def test_a_broken_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.pt").write_bytes(b"not a checkpoint")
    code = main(["digits", "--out", str(tmp_path), "--resume", "--set", *SHORT])
    assert_clean_error(capsys, code, "last.pt", "damaged")


def test_zero_steps_is_refused_before_anything_is_written(tmp_path, capsys):
    code = main(["digits", "--out", str(tmp_path / "run"), "--set", "train.steps=0"])
    assert_clean_error(capsys, code, "train.steps=0")
    assert not (tmp_path / "run").exists()


def test_a_yaml_syntax_error_names_the_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 0.1\n   momentum: 0.9\n")  # line 3 is indented under a scalar
    code = main([str(bad), "--out", str(tmp_path / "run")])
    err = assert_clean_error(capsys, code, f"{bad}:3:", "not valid YAML")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    (tmp_path / "top.yaml").write_text("base: bad.yaml\n")  # an included file is named itself
    assert_clean_error(capsys, main([str(tmp_path / "top.yaml"), "--out", str(tmp_path / "run")]), f"{bad}:3:")


def test_a_yaml_syntax_error_in_an_override_names_the_override(tmp_path, capsys):
    code = main(["digits", "--out", str(tmp_path / "run"), "--set", "optim.milestones=[10, 20"])
    err = assert_clean_error(capsys, code, "--set optim.milestones=[10, 20", "not valid YAML")
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_a_bad_jpeg_under_on_corrupt_error_is_one_line_naming_it(tmp_path, capsys):
    pytest.importorskip("nvidia.dali")
    from fake_datasets import break_jpeg, write_image_folders

    root = write_image_folders(tmp_path / "data", num_classes=2, per_class_train=4, per_class_val=2)
    broken = break_jpeg(root / "val" / "n00000000" / "n00000000_1.JPEG")
    code = main(["digits", "--out", str(tmp_path / "run"), "--set", *SHORT, "train.steps=2", "train.eval_every=2",
                 "data.name=imagenet", f"data.root={root}", "data.labels=0.5", "data.batch_size=2",
                 "data.eval_batch_size=4", "data.image_size=16", "data.resize_size=20", "data.workers=1",
                 "data.on_corrupt=error", "model.name=digits_cnn", "train.device=cpu"])
    err = assert_clean_error(capsys, code, f"cannot decode {broken}", "data.on_corrupt=skip")
    assert len(err.strip().splitlines()) == 1
