"""The one place where user-facing NCHW/NHWC arrays meet the model's internal NHWC."""

from __future__ import annotations

import jax
import jax.numpy as jnp

LAYOUTS = ("NCHW", "NHWC")


def check_layout(layout: str) -> None:
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def channel_axis(layout: str) -> int:
  """Axis of the channels in a rank-4 array of this layout."""
  check_layout(layout)
  return 1 if layout == "NCHW" else 3


def to_nhwc(x: jax.Array, layout: str) -> jax.Array:
  check_layout(layout)
  return jnp.transpose(x, (0, 2, 3, 1)) if layout == "NCHW" else x


def from_nhwc(x: jax.Array, layout: str) -> jax.Array:
  check_layout(layout)
  return jnp.transpose(x, (0, 3, 1, 2)) if layout == "NCHW" else x


def shape_in_layout(b: int, h: int, w: int, c: int, layout: str) -> tuple[int, int, int, int]:
  check_layout(layout)
  return (b, c, h, w) if layout == "NCHW" else (b, h, w, c)
