"""python -m mgssl.train [CONFIG] [--set key=value ...] [--out DIR] [--resume [--allow-schedule-change]]"""
import argparse
import os
import sys
from pathlib import Path

from mgssl.train.config import load_config, resolve_config_path


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m mgssl.train",
        description="Train a semi-supervised classifier with meta-gradient pseudo labels.",
        epilog="examples:\n"
               "  python -m mgssl.train digits\n"
               "  python -m mgssl.train convlarge_cifar10_4k --set data.root=/data/cifar10 train.precision=bf16\n"
               "  python -m mgssl.train convlarge_cifar10_4k --set data.root=/data/cifar10 --resume\n"
               "  torchrun --standalone --nproc_per_node=8 --max-restarts=3 -m mgssl.train resnet18_imagenet_10pct \\\n"
               "      --set data.root=/data/imagenet\n"
               "  torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST0:29400 \\\n"
               "      --rdzv-id=imagenet -m mgssl.train resnet18_imagenet_10pct --set data.root=/data/imagenet  (on each node)\n"
               "batch sizes are global (summed over all processes); see configs/README.md for every experiment.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default="digits",
                   help="a YAML file, or the name of one in configs/ (default: digits)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set train.steps=1000 method.meta=false")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<config>-seed<seed>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (starts fresh if there is none)")
    p.add_argument("--allow-schedule-change", action="store_true",
                   help="with --resume: accept a new train.steps/epochs that changes the learning rate of steps "
                        "already trained (optim.schedule=cosine)")
    return p.parse_args(argv)


def _say_error(e: BaseException) -> None:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
    print(f"{where}error: {message}", file=sys.stderr)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, tuple(args.overrides))
    except (KeyError, ValueError, FileNotFoundError) as e:
        _say_error(e)
        return 2
    out = args.out or Path("runs") / f"{resolve_config_path(args.config).stem}-seed{cfg.seed}"
    # A worker restarted by `torchrun --max-restarts` reruns this command: continue, don't refuse.
    # The restart count alone cannot tell: on several nodes, an agent whose own workers were healthy
    # restarts them with a count of 0. So under --max-restarts an existing checkpoint is continued.
    restarts_allowed = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
    resume = args.resume or restarts_allowed or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0

    from mgssl.pipelines.dali import CorruptImageError  # these import torch: keep `--help` and config errors fast
    from mgssl.train.checkpoint import CheckpointError
    from mgssl.train.distributed import DeviceError
    from mgssl.train.engine import NonFiniteLossError, RanksDivergedError, run
    from mgssl.train.rundir import EXIT_STOPPED, RunFolderError, RunStopped, continue_command

    # Faults the user can act on get one clear line and a non-zero exit; anything else is a bug and
    # keeps its traceback.
    expected = (FileNotFoundError, FileExistsError, NotImplementedError, ValueError, CheckpointError,
                NonFiniteLossError, RanksDivergedError, DeviceError, CorruptImageError, RunFolderError)
    try:
        summary = run(cfg, out, resume=resume, argv=argv, allow_schedule_change=args.allow_schedule_change)
    except expected as e:
        _say_error(e)
        return 1
    except RunStopped as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{e}; saved {e.checkpoint}. Continue with: {continue_command(argv)}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print(f"interrupted; continue with the same command plus --resume (run folder {out})", file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        err = summary.get("test_error")
        kept = ""
        if "best_val_test_error" in summary:
            kept = (f"; best.pt (lowest validation error, step {summary['best_val_step']}) "
                    f"{summary['best_val_test_error']:.4f}")
        if "ema_test_error" in summary:
            kept += f"; weight average {summary['ema_test_error']:.4f}"
        print(f"done: {out}/final.json  test error {err:.4f} (best {summary['best_test_error']:.4f}{kept})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
