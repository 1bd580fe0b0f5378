"""python -m mgssl.tools.export RUN --format torchscript|onnx|safetensors --out FILE [--checkpoint best|last|ema]

A trained run's network as one file for other programs, with the class names and the preprocessing
(mean, std, input size, resize) as metadata: a JSON text under the name "mgssl" (TorchScript: the
extra file mgssl.json; ONNX: metadata_props; safetensors: the header's __metadata__). The network
takes float32 (N, 3, image_size, image_size) images, normalised as the metadata says, and returns
logits (N, classes). Before the command reports success the written file is loaded back and its
outputs compared with the checkpoint's on a few images of the run's data (random inputs where the
data is not at hand); ONNX is checked with onnxruntime when it is installed."""
import argparse
import json
import sys
import warnings
from pathlib import Path

FORMATS = ("torchscript", "onnx", "safetensors")
METADATA_KEY = "mgssl"
# Largest |difference| of logits accepted, relative to the largest |logit| (at least 1).
TOLERANCE = {"torchscript": 1e-5, "onnx": 1e-4, "safetensors": 1e-6}


class ExportMismatchError(RuntimeError):
    pass


def sample_inputs(model, count: int = 4):
    """A few images of the run's data set, preprocessed as the run evaluated, or seeded random inputs
    when the data is not at hand; with a note of which."""
    import torch

    from mgssl.pipelines.class_folders import why_unusable
    from mgssl.tools.inference import image_batches

    root = Path(model.cfg.data.root or "")
    files = []
    if model.cfg.data.root and root.is_dir():
        for path in sorted(root.rglob("*")):
            if path.is_file() and why_unusable(path) is None:
                files.append(str(path))
                if len(files) == count:
                    break
    device = next(model.net.parameters()).device
    if files:
        try:
            batches = [x for _, x in image_batches(files, model.preprocess, batch_size=count, device=device)]
            if batches:
                return torch.cat(batches).contiguous(), f"{sum(len(b) for b in batches)} images of {root}"
        except RuntimeError:
            pass  # fall back to random inputs below
    size = model.preprocess.image_size
    gen = torch.Generator().manual_seed(0)
    return torch.randn(count, 3, size, size, generator=gen).to(device), f"{count} random inputs (data not at hand)"


def write_torchscript(model, x, out: Path, metadata: str) -> None:
    import torch

    traced = torch.jit.trace(model.net, x[:1], check_trace=False)
    torch.jit.save(traced, str(out), _extra_files={f"{METADATA_KEY}.json": metadata})


def run_torchscript(out: Path, x):
    import torch

    extra = {f"{METADATA_KEY}.json": ""}
    loaded = torch.jit.load(str(out), map_location=x.device, _extra_files=extra)
    return loaded(x), json.loads(extra[f"{METADATA_KEY}.json"])


def write_onnx(model, x, out: Path, metadata: str) -> None:
    import torch

    try:
        import onnx
    except ImportError:
        raise ImportError("ONNX export needs the onnx package: pip install onnx onnxruntime "
                          "(or the extra: pip install 'mgssl[export]')") from None
    # The TorchScript-based exporter: the dynamo one needs onnxscript, and this network needs nothing newer.
    torch.onnx.export(model.net, (x[:1].cpu(),), str(out), dynamo=False, input_names=["image"],
                      output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    proto = onnx.load(str(out))
    onnx.helper.set_model_props(proto, {METADATA_KEY: metadata})
    onnx.checker.check_model(proto)
    onnx.save(proto, str(out))


def run_onnx(out: Path, x):
    import torch

    try:
        import onnxruntime
    except ImportError:
        return None, None
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    logits = session.run(["logits"], {"image": x.detach().cpu().numpy()})[0]
    return torch.from_numpy(logits), json.loads(session.get_modelmeta().custom_metadata_map[METADATA_KEY])


def write_safetensors(model, x, out: Path, metadata: str) -> None:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ImportError("safetensors export needs the safetensors package: pip install safetensors "
                          "(or the extra: pip install 'mgssl[export]')") from None
    weights = {k: v.detach().cpu().contiguous() for k, v in model.net.state_dict().items()}
    save_file(weights, str(out), metadata={METADATA_KEY: metadata})


def run_safetensors(out: Path, x):
    """The weights only: the network is rebuilt from the metadata's model entry, as a user would."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mgssl.model import build_model

    with safe_open(str(out), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
    spec = meta["model"]
    net = build_model(spec["name"], len(meta["classes"]), x.shape[1], width=spec.get("width"),
                      dropout=spec.get("dropout"))
    net.load_state_dict(load_file(str(out)))
    return net.to(x.device).eval()(x), meta


WRITERS = {"torchscript": (write_torchscript, run_torchscript), "onnx": (write_onnx, run_onnx),
           "safetensors": (write_safetensors, run_safetensors)}


def export(run_dir, fmt: str, out, *, checkpoint: str = "", device: str = "cpu") -> dict:
    """Write the export, load it back and compare; returns what was checked. Raises
    ExportMismatchError (and removes the file) when the outputs differ."""
    import torch

    from mgssl.tools.inference import default_checkpoint, load_model, metadata_json

    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    model = load_model(run_dir, checkpoint or default_checkpoint(run_dir), device)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    x, inputs = sample_inputs(model)
    metadata = metadata_json(model)
    write, load_and_run = WRITERS[fmt]
    with torch.no_grad(), warnings.catch_warnings():
        # torch marks TorchScript and the TorchScript-based ONNX exporter as deprecated; both still do the job.
        warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
        expected = model.net(x).float()
        write(model, x, out, metadata)
        got, meta = load_and_run(out, x)
    report = {"file": str(out), "format": fmt, "weights": model.which, "step": model.step, "inputs": inputs,
              "classes": model.classes}
    if got is None:
        report["checked"] = "not run: onnxruntime is not installed (pip install onnxruntime); the model was checked " \
                            "by onnx.checker only"
        return report
    difference = (got.float().cpu() - expected.cpu()).abs().max().item()
    scale = max(1.0, expected.abs().max().item())
    if difference > TOLERANCE[fmt] * scale or meta.get("classes") != model.classes:
        out.unlink(missing_ok=True)
        raise ExportMismatchError(f"the {fmt} export gives logits up to {difference:.3g} away from the checkpoint's "
                                  f"(tolerance {TOLERANCE[fmt] * scale:.3g}) on {inputs}; nothing was written")
    report.update(checked=f"outputs equal to the checkpoint's within {difference:.2g} on {inputs}",
                  max_abs_difference=difference)
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mgssl export", description=__doc__.split("\n\n")[1],
                                epilog="examples:\n  python -m mgssl.tools.export runs/flowers --format onnx --out "
                                       "flowers.onnx\n  python -m mgssl.tools.export runs/flowers --format "
                                       "safetensors --checkpoint ema --out flowers.safetensors",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the run folder (--out of python -m mgssl.train)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", type=Path, required=True, help="the file to write")
    p.add_argument("--checkpoint", choices=("best", "last", "ema"), default="",
                   help="which weights (default: best when the run kept a best.pt, else last)")
    args = p.parse_args(argv)
    try:
        report = export(args.run, args.format, args.out, checkpoint=args.checkpoint)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {report['file']} ({report['format']}, {report['weights']} weights of step {report['step']}, "
          f"{len(report['classes'])} classes); {report['checked']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
