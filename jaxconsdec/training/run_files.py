"""The names of what a training run folder holds (see `loop`'s docstring)."""

RUN = "run.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
SAMPLES = "samples"
MODEL = "model"
FAILURES = "failures.json"
LOCK = ".lock"        # held by the running trainer: one trainer per run folder
