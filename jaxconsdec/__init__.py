"""jaxconsdec: OpenAI's Consistency Decoder in JAX/Flax, with the SD VAE around it.

    params = jaxconsdec.params_from_torch(state_dict, jaxconsdec.CONSISTENCY_DECODER)
    images = jaxconsdec.decode(params, latents, jax.random.key(0))   # (B, 3, 8h, 8w) in [-1, 1]
    pixels = jaxconsdec.to_uint8(images)
    latents = jaxconsdec.encode(vae_params, images)                   # the other way

The public names are imported on first use (PEP 562), so `import jaxconsdec` and the
command's `--help` and `--version` do not start JAX; `jaxconsdec.decode` imports what it
needs the first time it is looked up.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> the module that defines it
_PUBLIC = {
    "encode": "autoencoder", "vae_decode": "autoencoder",
    "CheckpointError": "checkpoint", "load": "loading",
    **dict.fromkeys(("CONSISTENCY_DECODER", "FLUX_VAE", "SD3_VAE", "SD_VAE", "SDXL_VAE",
                     "TINY", "TINY_VAE", "UNetConfig", "VAEConfig"), "config"),
    "save_png": "images", "to_uint8": "images",
    "example_keys": "keys",
    "decode": "sampler", "prepare_latents": "sampler",
    "TABLES": "schedule", "timesteps_for": "schedule",
    "consistency_loss": "training.loss", "denoising_loss": "training.loss",
    "UNet": "models.unet", "VAE": "models.vae",
    **dict.fromkeys(("ParamsMismatchError", "abstract_params", "check_params", "param_count",
                     "params_from_torch", "random_params", "torch_key_to_path"), "weights"),
    "compiler_options": "xla_options",
}

__all__ = sorted(_PUBLIC) + ["__version__"]


def __getattr__(name: str):
  if name not in _PUBLIC:
    raise AttributeError(f"module 'jaxconsdec' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"jaxconsdec.{_PUBLIC[name]}"), name)
  globals()[name] = value  # looked up once
  return value


def __dir__():
  return sorted(set(globals()) | set(_PUBLIC))


if TYPE_CHECKING:  # what type checkers and IDEs see
  from jaxconsdec.autoencoder import encode, vae_decode
  from jaxconsdec.checkpoint import CheckpointError
  from jaxconsdec.loading import load
  from jaxconsdec.config import (CONSISTENCY_DECODER, FLUX_VAE, SD3_VAE, SD_VAE, SDXL_VAE,
                                 TINY, TINY_VAE, UNetConfig, VAEConfig)
  from jaxconsdec.images import save_png, to_uint8
  from jaxconsdec.keys import example_keys
  from jaxconsdec.models.unet import UNet
  from jaxconsdec.models.vae import VAE
  from jaxconsdec.sampler import decode, prepare_latents
  from jaxconsdec.schedule import TABLES, timesteps_for
  from jaxconsdec.training.loss import consistency_loss, denoising_loss
  from jaxconsdec.weights import (ParamsMismatchError, abstract_params, check_params,
                                  param_count, params_from_torch, random_params,
                                  torch_key_to_path)
  from jaxconsdec.xla_options import compiler_options
