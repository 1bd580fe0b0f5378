"""The names of the meta-gradient estimators and what `auto` means, resolved once per run: by the
config (train/config.py) from train.precision, so that the steps, the summary, config.yaml and the
tools all name the estimator that ran. No torch here: the config imports it."""

ESTIMATORS = ("auto", "fd", "jvp", "exact")


def resolve_estimator(estimator: str, low_precision: bool) -> str:
    """The estimator that `estimator` names in a run with (or without) bf16/fp16 autocast.

    auto: under autocast jvp, one pass in the low precision. fd would need its passes in fp32 without
    TF32, because ±εg is below bf16 resolution, and on a GPU those run at a fifteenth of the bf16 rate;
    jvp has no ε to resolve and stays faithful in bf16 (docs/PERF.md, "Fidelity"). In fp32 runs fd,
    the authors' estimator, which costs the same as jvp there."""
    if estimator == "auto":
        return "jvp" if low_precision else "fd"
    return estimator
