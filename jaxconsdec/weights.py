"""PyTorch (diffusers `UNet2DModel`) names <-> the Flax param tree, and strict loading.

`torch_key_to_path` is the single key mapping of the project: the converter and the parity
tests use it too. Which tensor layout change a key needs is decided by the *module* it
belongs to, never by guessing from the array's rank.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Mapping, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxconsdec.config import UNetConfig, VAEConfig
from jaxconsdec.models.unet import UNet
from jaxconsdec.models.vae import HALVES, VAE

DIFFUSERS_PREFIX = "decoder_unet."

# Module name -> kind. The kind fixes both the Flax leaf name and the layout change. The
# UNet's and the VAE's modules (`conv` of the resamplers, the quant convs, the attention).
_MODULE_KINDS = {
    "conv_in": "conv", "conv1": "conv", "conv2": "conv", "conv_shortcut": "conv",
    "conv_out": "conv", "conv": "conv", "quant_conv": "conv", "post_quant_conv": "conv",
    "linear_1": "dense", "linear_2": "dense", "time_emb_proj": "dense",
    "to_q": "dense", "to_k": "dense", "to_v": "dense", "to_out_0": "dense",
    "norm1": "norm", "norm2": "norm", "conv_norm_out": "norm", "group_norm": "norm",
    "time_proj": "embed",
}
# torch parameter name -> Flax leaf name, per kind.
_LEAF_NAMES = {
    "conv": {"weight": "kernel", "bias": "bias"},
    "dense": {"weight": "kernel", "bias": "bias"},
    "norm": {"weight": "scale", "bias": "bias"},
    "embed": {"weight": "embedding"},
}
# ModuleList containers: torch `name.3` is Flax `name_3`.
_CONTAINERS = ("down_blocks", "up_blocks", "resnets", "downsamplers", "upsamplers", "attentions",
               "to_out")
_CONTAINER_RE = re.compile(rf"^({'|'.join(_CONTAINERS)})_(\d+)$")


class ParamsMismatchError(ValueError):
  """Weights and model disagree; the message lists every difference."""


def torch_key_to_path(key: str) -> tuple[tuple[str, ...], str] | None:
  """diffusers name -> (Flax param path, kind), or None if the name is not a UNet param.

  'decoder_unet.down_blocks.0.resnets.1.conv1.weight' ->
  (('down_blocks_0', 'resnets_1', 'conv1', 'kernel'), 'conv'). The `decoder_unet.` prefix of
  `ConsistencyDecoderVAE` files is optional.
  """
  if key.startswith(DIFFUSERS_PREFIX):
    key = key[len(DIFFUSERS_PREFIX):]
  parts = key.split(".")
  path: list[str] = []
  for part in parts[:-1]:
    if part.isdigit() and path and path[-1] in _CONTAINERS:
      path[-1] = f"{path[-1]}_{part}"
    else:
      path.append(part)
  if not path:
    return None
  kind = _MODULE_KINDS.get(path[-1])
  leaf = _LEAF_NAMES.get(kind, {}).get(parts[-1])
  if leaf is None:
    return None
  return tuple(path) + (leaf,), kind


def path_to_torch_key(path: tuple[str, ...]) -> str:
  """Flax param path -> diffusers `UNet2DModel` name (no prefix); inverse of the above."""
  *modules, leaf = path
  kind = _MODULE_KINDS[modules[-1]]
  torch_leaf = {v: k for k, v in _LEAF_NAMES[kind].items()}[leaf]
  names = [_CONTAINER_RE.sub(r"\1.\2", m) for m in modules]
  return ".".join(names + [torch_leaf])


# Axis order that turns a reference kernel into a Flax one: conv OIHW -> HWIO (no flip),
# linear (out, in) -> (in, out). Other leaves keep their layout.
_TO_FLAX_AXES = {"conv": (2, 3, 1, 0), "dense": (1, 0)}


def torch_to_flax_layout(array: np.ndarray, kind: str, leaf: str) -> np.ndarray:
  """Reference tensor layout -> Flax: conv OIHW -> HWIO (no flip), linear (out, in) -> (in, out)."""
  axes = _TO_FLAX_AXES.get(kind) if leaf == "kernel" else None
  return array if axes is None else array.transpose(axes)


def torch_shape(flax_shape: tuple[int, ...], kind: str, leaf: str) -> tuple[int, ...]:
  """The reference (PyTorch) shape of a param whose Flax shape is `flax_shape`."""
  axes = _TO_FLAX_AXES.get(kind) if leaf == "kernel" else None
  if axes is None:
    return tuple(flax_shape)
  return tuple(flax_shape[i] for i in np.argsort(axes))


@functools.lru_cache(maxsize=None)
def _abstract_params(config: UNetConfig | VAEConfig):
  size = config.downsample_factor
  x = jax.ShapeDtypeStruct((1, size, size, config.in_channels), jnp.float32)
  if isinstance(config, VAEConfig):
    return jax.eval_shape(lambda x: VAE(config).init(jax.random.key(0), x), x)["params"]
  unet = UNet(config)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  return jax.eval_shape(lambda x, t: unet.init(jax.random.key(0), x, t), x, t)["params"]


def abstract_params(config: UNetConfig | VAEConfig,
                    halves: Optional[Sequence[str]] = None) -> dict:
  """The param tree of `config` as ShapeDtypeStructs (computed without allocating).

  halves: for a VAE, only the entries of these halves ("encoder": encoder + quant_conv,
  "decoder": post_quant_conv + decoder); None for the whole tree.
  """
  tree = flax.core.unfreeze(_abstract_params(config))
  if halves is None:
    return tree
  if not isinstance(config, VAEConfig) or set(halves) - set(HALVES):
    raise ValueError(f"halves {halves!r}: only a VAE has halves, {tuple(HALVES)}")
  keep = {name for half in halves for name in HALVES[half]}
  return {name: subtree for name, subtree in tree.items() if name in keep}


def param_count(config: UNetConfig | VAEConfig, halves: Optional[Sequence[str]] = None) -> int:
  return sum(int(np.prod(leaf.shape))
             for leaf in jax.tree.leaves(abstract_params(config, halves)))


def _flat(tree: Mapping) -> dict[tuple[str, ...], Any]:
  return flax.traverse_util.flatten_dict(flax.core.unfreeze(tree))


def _raise_mismatch(what: str, missing: list[str], unexpected: list[str],
                    wrong_shape: list[str], wrong_dtype: list[str] = ()) -> None:
  if not (missing or unexpected or wrong_shape or wrong_dtype):
    return
  lines = [what]
  for title, items in (("missing (in the model, not in the weights)", missing),
                       ("unexpected (in the weights, not in the model)", unexpected),
                       ("shape mismatch", wrong_shape),
                       ("not a float dtype", wrong_dtype)):
    if items:
      lines.append(f"{len(items)} {title}:")
      lines += [f"  {item}" for item in items]
  raise ParamsMismatchError("\n".join(lines))


def _is_float_dtype(dtype) -> bool:
  return jnp.issubdtype(dtype, jnp.floating)


def check_params(params: Mapping, config: UNetConfig | VAEConfig,
                 halves: Optional[Sequence[str]] = None) -> None:
  """Raises ParamsMismatchError unless `params` has exactly the tree and shapes of `config`
  (of these halves of a VAE)."""
  want = _flat(abstract_params(config, halves))
  have = _flat(params)
  fmt = "/".join
  _raise_mismatch(
      f"params do not match the model config {config}. Were they made for another config?"
      " (pass config=... to match the weights)",
      missing=sorted(fmt(p) for p in want.keys() - have.keys()),
      unexpected=sorted(fmt(p) for p in have.keys() - want.keys()),
      wrong_shape=sorted(f"{fmt(p)}: params {tuple(np.shape(have[p]))}, config {want[p].shape}"
                         for p in want.keys() & have.keys()
                         if tuple(np.shape(have[p])) != want[p].shape),
      wrong_dtype=sorted(f"{fmt(p)}: {jnp.result_type(have[p])}" for p in have
                         if not _is_float_dtype(jnp.result_type(have[p]))))


def params_from_torch(state_dict: Mapping[str, Any], config: UNetConfig | VAEConfig,
                      halves: Optional[Sequence[str]] = None) -> dict:
  """diffusers state dict (numpy arrays, any float dtype) -> Flax params: a `UNet2DModel`'s
  for a UNetConfig, an `AutoencoderKL`'s (of these halves) for a VAEConfig.

  Keys may carry the `decoder_unet.` prefix of `ConsistencyDecoderVAE`. Strict: raises one
  ParamsMismatchError listing every missing key, unexpected key, shape mismatch and non-float
  tensor. Every name and shape (and, for the converter's lazy files, dtype) is checked
  *before* any tensor is read, so a file that declares a tensor of the wrong size is refused
  without reading it. Arrays are then read and cast to `config.param_dtype` one at a time.
  """
  plan = _plan(state_dict, config, halves)
  out: dict[tuple[str, ...], jax.Array] = {}
  wrong_dtype, wrong_shape = [], []
  for key, (path, kind, want_torch) in plan.items():
    array = np.asarray(state_dict[key])
    if not _is_float_dtype(array.dtype):
      wrong_dtype.append(f"{key}: {array.dtype}")
      continue
    if array.shape != want_torch:  # a plain mapping whose value differs from its .shape
      wrong_shape.append(f"{key}: {tuple(array.shape)}, the model needs {want_torch}")
      continue
    out[path] = jnp.asarray(torch_to_flax_layout(array, kind, path[-1]), dtype=config.param_dtype)
  _raise_mismatch(f"weights do not match the model config {config}:", [], [], wrong_shape,
                  wrong_dtype)
  return flax.traverse_util.unflatten_dict(out)


def _numpy_dtype(value):
  """The numpy dtype of an array-like without converting it, or None (checked on reading)."""
  try:
    return np.dtype(value.dtype)
  except (AttributeError, TypeError):
    return None


def _plan(state_dict: Mapping[str, Any], config, halves) -> dict:
  """key -> (Flax path, kind, reference shape) for every tensor, checked without reading any
  data: raises ParamsMismatchError listing every problem at once."""
  want = _flat(abstract_params(config, halves))
  specs = getattr(state_dict, "specs", None)  # LazyTensors: declared (shape, dtype)
  if specs is None:
    specs = {k: (tuple(np.shape(v)), _numpy_dtype(v)) for k, v in state_dict.items()}
  plan, present = {}, set()
  unexpected, wrong_shape, wrong_dtype = [], [], []
  for key, (shape, dtype) in specs.items():
    mapped = torch_key_to_path(key)
    if mapped is None or mapped[0] not in want:
      unexpected.append(key)
      continue
    path, kind = mapped
    if path in present:
      unexpected.append(f"{key} (a second tensor for {path_to_torch_key(path)})")
      continue
    present.add(path)
    want_torch = torch_shape(want[path].shape, kind, path[-1])
    if dtype is not None and not _is_float_dtype(dtype):
      wrong_dtype.append(f"{key}: {dtype}")
    elif tuple(shape) != want_torch:
      wrong_shape.append(f"{key}: the weights declare {tuple(shape)}, the model needs"
                         f" {want_torch}")
    else:
      plan[key] = (path, kind, want_torch)
  missing = sorted(path_to_torch_key(p) for p in want.keys() - present)
  _raise_mismatch(f"weights do not match the model config {config}:",
                  missing, sorted(unexpected), wrong_shape, wrong_dtype)
  return plan


def random_params(config: UNetConfig | VAEConfig, seed: int = 0,
                  halves: Optional[Sequence[str]] = None) -> dict:
  """Random weights for `config`, drawn on the host without compiling the model.

  For smoke tests and benchmarks only: kernels ~ N(0, 1/fan_in) (activations keep their
  scale through the network), norm scales 1, biases 0, the time-embedding table N(0, 1).
  `UNet.init` gives Flax's initialisers instead but compiles a forward pass (10 s+ on CPU).
  """
  rng = np.random.default_rng(seed)
  dtype = jnp.dtype(config.param_dtype)

  def draw(path, leaf):
    if path[-1] == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in)
    elif path[-1] == "embedding":
      value = rng.standard_normal(leaf.shape, np.float32)
    elif path[-1] == "scale":
      value = np.ones(leaf.shape, np.float32)
    else:
      value = np.zeros(leaf.shape, np.float32)
    return jnp.asarray(value, dtype)
  flat = _flat(abstract_params(config, halves))
  return flax.traverse_util.unflatten_dict({p: draw(p, leaf) for p, leaf in flat.items()})


def unwrap_variables(params):
  # Accept Flax's `{"params": tree}` variables dict as well as the bare tree.
  if hasattr(params, "keys") and set(params.keys()) == {"params"}:
    return params["params"]
  return params
