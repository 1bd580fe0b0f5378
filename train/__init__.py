"""The training engine: the meta-gradient step, its schedule, checkpoints and the loop.

`train` builds on `pipelines` (batches) and `model` (networks)."""
