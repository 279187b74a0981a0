"""The names of what a training run folder holds (see `loop`'s docstring)."""

import os

RUN = "run.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"
SAMPLES = "samples"
MODEL = "model"
FAILURES = "failures.json"
LOCK = ".lock"        # held by the running trainer: one trainer per run folder


def exported_model(folder: str) -> str:
  """A training run's folder stands for the model it exported; any other folder for itself."""
  from jaxconsdec.checkpoint import META, CheckpointError
  if os.path.exists(os.path.join(folder, META)) or not os.path.exists(os.path.join(folder, RUN)):
    return folder
  model = os.path.join(folder, MODEL)
  if not os.path.exists(os.path.join(model, META)):
    raise CheckpointError(f"{folder} is a training run that has not exported a model yet: run"
                          " its `jaxconsdec train` command again to finish (it resumes)")
  return model
