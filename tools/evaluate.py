"""python -m mgssl.tools.evaluate CHECKPOINT_OR_RUN_DIR [--data-root DIR] [--json PATH]

The test error of a saved network (top-1, and top-5 for data sets of more than 10 classes), on the
test set of the data set it was trained on, rebuilt from the config saved in the checkpoint."""
import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from mgssl.tools.runs import write_json_output


def evaluate_checkpoint(path, *, data_root: Optional[str] = None, device: str = "cpu",
                        precision: Optional[str] = None, warn=print) -> dict:
    """{"top1_error", "top5_error" (more than 10 classes), "test_loss", "test_images", "step", ...}.
    `precision` defaults to the run's train.precision, the one its own evaluations used."""
    from mgssl.train.evaluate import error_counts, errors_from_counts
    from mgssl.train.step import autocast_for
    from mgssl.tools.runs import restore
    from mgssl.train import run_state as rs

    restored = restore(path, data_root=data_root, device=device, warn=warn)
    precision = precision or restored.cfg.train.precision
    if restored.device.type == "cpu" and precision == "fp16":
        precision = "fp32"  # no fp16 autocast on CPUs worth using; the run's own numbers came from a GPU
    totals = error_counts(restored.net, restored.data.eval_batches("test"), autocast_for(restored.device, precision))
    result = errors_from_counts(totals)
    if restored.data.num_classes <= 10:
        result.pop("top5_error")
    result.update(checkpoint=str(restored.checkpoint), step=int(restored.state.get(rs.STEP, -1)),
                  dataset=restored.cfg.data.name, model=restored.cfg.model.name,
                  num_classes=int(restored.data.num_classes), precision=precision, device=str(restored.device))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="mgssl evaluate", description=__doc__.split("\n\n")[1],
                                epilog="example:\n  python -m mgssl.tools.evaluate runs/digits-seed0\n"
                                       "  python -m mgssl.tools.evaluate runs/cifar10/checkpoints/last.pt "
                                       "--data-root /data/cifar10 --json eval.json",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_OR_RUN_DIR",
                   help="a checkpoint file, or a run folder (its checkpoints/last.pt)")
    p.add_argument("--data-root", default=None, help="where the data set lies on this machine, if not where "
                   "it lay for training (data.root)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: the GPU if there is one (default)")
    p.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"),
                   help="autocast for the forward passes (default: the run's train.precision)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON "
                   "('-' prints it instead of the text lines)")
    args = p.parse_args(argv)
    warn = lambda text: print(text, file=sys.stderr)  # noqa: E731
    if args.json is not None and str(args.json) != "-" and args.json.is_dir():  # before the evaluation, not after
        print(f"error: --json {args.json} is a folder; name the file to write, e.g. {args.json / 'eval.json'}",
              file=sys.stderr)
        return 2
    try:
        result = evaluate_checkpoint(args.checkpoint, data_root=args.data_root, device=args.device,
                                     precision=args.precision, warn=warn)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if str(args.json) == "-":
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['checkpoint']} (step {result['step']}, {result['dataset']}, {result['model']})")
    print(f"test error top-1: {100 * result['top1_error']:.2f}%  on {result['test_images']} images")
    if "top5_error" in result:
        print(f"test error top-5: {100 * result['top5_error']:.2f}%")
    if args.json is not None:
        error = write_json_output(args.json, result)
        if error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
