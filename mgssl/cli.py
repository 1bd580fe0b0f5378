"""mgssl COMMAND [ARGS ...]: one console command whose subcommands are the project's tools.

Each subcommand forwards its arguments to the `main(argv)` of one module and exits with its code;
`python -m MODULE ARGS` runs the same thing (torchrun takes `-m mgssl.train`)."""
import importlib
import sys
from typing import NamedTuple, Optional


class Command(NamedTuple):
    module: str
    summary: str


# Modules are imported only when their command runs: `mgssl --help` stays fast and torch-free.
COMMANDS = {
    "train": Command("mgssl.train.cli", "train a run (python -m mgssl.train); --print-config CONFIG lists every key"),
    "evaluate": Command("mgssl.tools.evaluate", "test error of a saved network"),
    "predict": Command("mgssl.tools.predict", "class predictions of a run's network for image files (CSV)"),
    "export": Command("mgssl.tools.export", "the network as TorchScript, ONNX or safetensors, checked against the run"),
    "ablation": Command("mgssl.tools.ablation", "a Table-4 study: rows x seeds, then its report"),
    "report": Command("mgssl.tools.report", "markdown report, figures and paired tests of finished runs"),
    "bench": Command("mgssl.tools.bench", "throughput of the training step per method"),
    "bench-data": Command("mgssl.tools.bench_data", "images per second and gaps between batches of each data pipeline"),
    "bench-fd": Command("mgssl.tools.bench_fd", "fd's ±εg passes: separate calls against one batched call"),
    "plan": Command("mgssl.tools.plan", "a run's counts and predicted wall time from measured or published rates"),
    "fidelity": Command("mgssl.tools.fidelity", "how faithful the meta-gradient is under bf16/fp16"),
    "tsne": Command("mgssl.tools.tsne", "t-SNE of a network's features (the paper's Figure 3)"),
    "meta-probe": Command("mgssl.tools.meta_probe", "does the meta step lower the labeled loss after an SGD step (Theorem 1)"),
    "check-folders": Command("mgssl.tools.check_folders", "decode every image of a folder tree with DALI and Pillow"),
    "gpu-check": Command("mgssl.tools.gpu_check", "every CUDA path once, with timings, on the first GPU"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mgssl COMMAND [ARGS ...]", "",
             "Semi-supervised image classification with meta-gradient pseudo labels.", "", "commands:"]
    lines += [f"  {name:<{width}}  {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", "`mgssl COMMAND --help` describes each; `python -m mgssl COMMAND` is the same."]
    return "\n".join(lines)


def exit_code(result: object) -> int:
    """A tool's main returns its exit code, or (the measuring tools, for their tests) what it measured: 0."""
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def main(argv: Optional[list] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from mgssl import __version__

        print(f"mgssl {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, list(COMMANDS), n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"choose one of {', '.join(COMMANDS)}"
        print(f"mgssl: unknown command {name!r}; {hint} (mgssl --help lists them)", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name].module)
    return exit_code(module.main(rest))


if __name__ == "__main__":
    sys.exit(main())
