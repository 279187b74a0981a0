"""The decoder most training tests train: TINY's widths and numerics on two levels of one
ResBlock each.

What those tests check (resuming bit for bit, sharding, refusals, exports, keys, the losses
against torch, remat's gradients and memory, the product path's gradients) does not depend on
the depth, and this step compiles in about half of TINY's time on XLA:CPU, which is most of
what each trainer run costs there. The released topology is still trained, at TINY's widths,
where depth matters: in test_training_learns (what a run learns).
"""

import os

import jaxconsdec as jcd

SMALLEST = jcd.TINY.replace(block_out_channels=(32, 64), layers_per_block=1)


def config_file(folder) -> str:
  """SMALLEST as a `--config FILE` for the command."""
  path = os.path.join(folder, "smallest.json")
  with open(path, "w") as f:
    f.write(SMALLEST.to_json())
  return path
