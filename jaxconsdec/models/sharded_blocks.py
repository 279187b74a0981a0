"""Rematerialised ResBlocks run on each device's own examples, with their params gathered
inside the block and their gradients reduce-scattered as the block's backward pass ends.

Why. With params split over devices (the trainer's sharded state) and the step left to XLA's
SPMD partitioner, XLA:CPU gathers every layer's weights ahead of the forward pass and keeps
each gradient whole on every device until the optimiser's update (it has no pass that turns
an all-reduce and a slice into a reduce-scatter): 2.3-2.9 GiB of temporaries per device for
the released widths at 64x64, batch 1 per device (benchmarks/README.md, Training memory).
Written explicitly per block, a device holds about one block's gathered weights at a time,
and a block's gradient is reduced to each device's part as soon as it exists: 0.88 GiB.
A block's gather waits for its input, so it cannot overlap the block before: the trainer
uses this on CPUs only, where that costs nothing (`TrainStep.block_layout`).

`with sharded_blocks(Layout(mesh, axis, spec_of)):` around the traced code turns this on for
the ResBlocks that `models.unet.recomputed` runs (the trainer's step does, when its state is
sharded and remat is on). `spec_of(shape)` is the PartitionSpec a param of that shape is
split with over `axis`; the blocks' inputs are split over `axis` on their batch. Outside the
context, or with a layout of None, a block is traced as it is, for whatever partitioning the
caller's jit chooses.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Callable, NamedTuple, Optional

import jax
from jax.sharding import Mesh, PartitionSpec


class Layout(NamedTuple):
  mesh: Mesh
  axis: str
  spec_of: Callable[[tuple[int, ...]], PartitionSpec]


_LAYOUT: contextvars.ContextVar[Optional[Layout]] = contextvars.ContextVar(
    "jaxconsdec_sharded_blocks", default=None)


@contextlib.contextmanager
def sharded_blocks(layout: Optional[Layout]):
  token = _LAYOUT.set(layout)
  try:
    yield
  finally:
    _LAYOUT.reset(token)


def current_layout() -> Optional[Layout]:
  """The layout of the enclosing `sharded_blocks`, or None outside one."""
  return _LAYOUT.get()


def _gather(axis: str, params, specs):
  """Each param whole: the split ones gathered over `axis` along their split."""
  def whole(p, spec):
    if axis not in spec:
      return p
    return jax.lax.all_gather(p, axis, axis=list(spec).index(axis), tiled=True)
  return jax.tree.map(whole, params, specs)


def after(value: jax.Array, tree):
  """`tree` plus 0 times one element of `value`: the same numbers (for finite `value`), which
  no compiler can compute before `value` exists."""
  zero = value.reshape(-1)[0] * 0
  return jax.tree.map(lambda a: a + zero.astype(a.dtype), tree)


def forward(layout: Layout, apply, params, x, temb):
  """apply(params, x, temb) with the params gathered on each device for its examples.

  Each device's part is gathered only once x exists: XLA:CPU's scheduler would otherwise
  gather every block's weights at the start of the pass, and hold them all at once (1.6 of
  the 2.5 GiB of temporaries of the released widths' step at 64x64 on 8 devices)."""
  batch, specs = PartitionSpec(layout.axis), _specs(layout, params)
  local = lambda p, x, temb: apply(_gather(layout.axis, after(x, p), specs), x, temb)
  return jax.shard_map(local, mesh=layout.mesh, in_specs=(specs, batch, batch),
                       out_specs=batch)(params, x, temb)


def backward(layout: Layout, apply, params, x, temb, g):
  """The vjp of `forward` at (params, x, temb) for the output cotangent g: (d_params, dx,
  dtemb), d_params split as the params are. The recomputation starts only once g exists
  (see `models.unet.recomputed`), and gathers its own copy of the params."""
  batch, specs = PartitionSpec(layout.axis), _specs(layout, params)

  def local(p, x, temb, g):
    p, x = after(g, (p, x))
    # The transpose of the gather is a reduce-scatter: each device receives the sum over
    # devices of its part of the gradient. Unsplit params are summed whole (the transpose
    # of their broadcast to every device's examples).
    gathered = lambda p, x, temb: apply(_gather(layout.axis, p, specs), x, temb)
    return jax.vjp(gathered, p, x, temb)[1](g)

  return jax.shard_map(local, mesh=layout.mesh, in_specs=(specs, batch, batch, batch),
                       out_specs=(specs, batch, batch))(params, x, temb, g)


def _specs(layout: Layout, params):
  """Each param's PartitionSpec, from its whole shape."""
  return jax.tree.map(lambda p: layout.spec_of(p.shape), params)
