"""mgssl train [CONFIG] [--set key=value ...] [--out DIR] [--resume [--allow-schedule-change]] [--print-config]

Also `python -m mgssl.train ...` (what torchrun takes). A resume without CONFIG continues the run saved
in --out with its own config.yaml."""
import argparse
import os
import sys
from pathlib import Path

from mgssl import runfolder
from mgssl.train.config import load_config, resolve_config_path

DEFAULT_CONFIG = "digits"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="mgssl train",
        description="Train a semi-supervised classifier with meta-gradient pseudo labels.",
        epilog="examples:\n"
               "  mgssl train digits                  (the same as: python -m mgssl.train digits)\n"
               "  mgssl train --print-config convlarge_cifar10_4k   (every key, its default and meaning)\n"
               "  mgssl train --out runs/digits-seed0 --resume      (continue a run with its saved config)\n"
               "  mgssl train convlarge_cifar10_4k --set data.root=/data/cifar10 train.precision=bf16\n"
               "  torchrun --standalone --nproc_per_node=8 --max-restarts=3 -m mgssl.train resnet18_imagenet_10pct \\\n"
               "      --set data.root=/data/imagenet\n"
               "  torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST0:29400 \\\n"
               "      --rdzv-id=imagenet -m mgssl.train resnet18_imagenet_10pct --set data.root=/data/imagenet  (on each node)\n"
               "batch sizes are global (summed over all processes); `mgssl train --print-config CONFIG` lists every\n"
               "config key with its default and meaning; configs/README.md describes every experiment.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", nargs="?", default=None,
                   help="a YAML file, or the name of one in configs/ (default: digits; with --resume, the "
                        "config.yaml saved in --out)")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set train.steps=1000 method.meta=false")
    p.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<config>-seed<seed>)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (starts fresh if there is none)")
    p.add_argument("--allow-schedule-change", action="store_true",
                   help="with --resume: accept a new train.steps/epochs that changes the learning rate of steps "
                        "already trained (optim.schedule=cosine)")
    p.add_argument("--print-config", action="store_true",
                   help="print every config key of CONFIG (after --set) with its default and meaning, and exit")
    return p.parse_args(argv)


def config_source(args) -> str:
    """The config to train: the one named, else on a resume the run folder's own config.yaml, else digits."""
    if args.config is not None:
        return args.config
    if not (args.resume and args.out is not None):
        return DEFAULT_CONFIG
    saved = args.out / runfolder.CONFIG
    if not saved.is_file():
        raise FileNotFoundError(f"--resume without a config continues the run saved in {args.out}, but it holds no "
                                f"{runfolder.CONFIG}; name the config to start or continue it "
                                f"(mgssl train CONFIG --out {args.out} --resume)")
    return str(saved)


def _rank_and_world() -> tuple[str, str]:
    """RANK and WORLD_SIZE as the environment spells them (checked where the run starts)."""
    return os.environ.get("RANK", "0").strip() or "0", os.environ.get("WORLD_SIZE", "1").strip() or "1"


def _say_error(e: BaseException) -> None:
    message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    rank, world = _rank_and_world()
    where = f"[rank {rank}] " if world not in ("0", "1") and world.isdigit() else ""
    print(f"{where}error: {message}", file=sys.stderr)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        source = config_source(args)
        cfg = load_config(source, tuple(args.overrides))
    except (KeyError, ValueError, FileNotFoundError) as e:
        _say_error(e)
        return 2
    if args.print_config:
        from mgssl.train.config_help import describe

        print(describe(cfg, " ".join([str(source), *(f"--set {o}" for o in args.overrides)])), end="")
        return 0
    out = args.out or Path("runs") / f"{resolve_config_path(source).stem}-seed{cfg.seed}"
    # under --max-restarts a checkpoint is continued: a healthy node's agent restarts its workers with count 0
    restarts_allowed = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0
    resume = args.resume or restarts_allowed or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0

    from mgssl.pipelines.dali import CorruptImageError, DaliUnavailableError  # these import torch: keep `--help` fast
    from mgssl.train.checkpoint import CheckpointError
    from mgssl.train.distributed import DeviceError
    from mgssl.train.engine import NonFiniteLossError, RanksDivergedError, run
    from mgssl.train.rundir import EXIT_STOPPED, RunFolderError, RunStopped, continue_command

    # faults a user can act on get one line and a non-zero exit; anything else is a bug and keeps its traceback
    expected = (FileNotFoundError, FileExistsError, NotImplementedError, ValueError, CheckpointError,
                NonFiniteLossError, RanksDivergedError, DeviceError, CorruptImageError, DaliUnavailableError,
                RunFolderError)
    try:
        summary = run(cfg, out, resume=resume, argv=argv, allow_schedule_change=args.allow_schedule_change)
    except expected as e:
        _say_error(e)
        return 1
    except RunStopped as e:
        if _rank_and_world()[0] == "0":
            print(f"{e}; saved {e.checkpoint}. Continue with: {continue_command(argv)}", file=sys.stderr)
        return EXIT_STOPPED
    except KeyboardInterrupt:
        print(f"interrupted; continue with the same command plus --resume (run folder {out})", file=sys.stderr)
        return 130
    if _rank_and_world()[0] == "0":
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
