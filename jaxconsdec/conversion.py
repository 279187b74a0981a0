"""PyTorch weight files into a jaxconsdec checkpoint: what `jaxconsdec convert` does, and
what the weights cache does the first time a name is used.

Nothing here knows about commands: what was found is told through `say`, and errors are the
readers' (`WeightFileError`) and the checkpoint's (`CheckpointError`).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

from jaxconsdec import __version__, checkpoint
from jaxconsdec.config import UNetConfig, VAEConfig

# Bumped whenever the same source file would convert to different params or configs, so
# that the weights cache converts it again instead of serving the old conversion.
CONVERTER_VERSION = 1


class ConversionError(ValueError):
  """The files given cannot make one checkpoint (an SD VAE file given with another)."""


def convert_files(sources: Sequence[str], output: str, *, dtype: str = "float32",
                  config: Optional[UNetConfig] = None,
                  vae_config: Optional[VAEConfig] = None, embedding: Optional[str] = None,
                  force: bool = False, should_stop: Callable[[], bool] = lambda: False,
                  say: Callable[[str], None] = lambda line: None) -> None:
  """Reads `sources` (the decoder's file, then for the raw layout its embedding file; or an
  SD VAE file alone), checks every tensor against the model, and writes the checkpoint at
  `output` atomically (see `checkpoint.save`). config/vae_config: the architectures, when
  the files do not describe themselves."""
  from jaxconsdec.convert import PARTS, layout_of, read_vae_weights, read_weights
  from jaxconsdec.weights import params_from_torch

  parts = PARTS[layout_of(sources[0])]
  params = unet_config = vae = vae_params = None
  found = []
  if "decoder" in parts:
    weights = read_weights(list(sources), config, embedding)
    unet_config = weights.config.replace(param_dtype=dtype)
    found = weights.sources
  if "vae" in parts:
    vae = read_vae_weights(sources[0], vae_config)
    found = found or [vae.source]
    if len(sources) > 1 and "decoder" not in parts:
      raise ConversionError(f"{sources[0]} is an SD VAE file: give it alone")
  for src in found:
    say(f"found {src.path}: format {src.format}, {src.tensor_count} tensors,"
        f" dtype {'/'.join(src.dtypes)}, {src.size:,} bytes")
  if unet_config is not None:
    say(f"decoder: {describe_config(unet_config)}")
    params = params_from_torch(weights.unet, unet_config)
  stored_vae_config = None
  if vae is not None:
    stored_vae_config = vae.config.replace(param_dtype=dtype)
    say(f"VAE ({' and '.join(vae.halves)}): {describe_vae(stored_vae_config)}")
    vae_params = params_from_torch(vae.tensors, stored_vae_config, vae.halves)
  provenance = {"sources": [s.to_json() for s in found],
                "converter": f"jaxconsdec {__version__}",
                "converter_version": CONVERTER_VERSION, "param_dtype": dtype}
  checkpoint.save(output, params, unet_config, provenance, vae_params=vae_params,
                  vae_config=stored_vae_config, vae_halves=vae.halves if vae else (),
                  force=force, should_stop=should_stop)


def describe_config(config: UNetConfig) -> str:
  return (f"widths {config.block_out_channels}, {config.layers_per_block} layers per block,"
          f" {config.latent_channels}-channel latents (scaling {config.scaling_factor},"
          f" shift {config.shift_factor})")


def describe_vae(config: VAEConfig) -> str:
  return (f"widths {config.block_out_channels}, {config.latent_channels}-channel latents"
          f" (scaling {config.scaling_factor}, shift {config.shift_factor})")
