"""jaxconsdec: OpenAI's Consistency Decoder in JAX/Flax, with the SD VAE around it.

    params = jaxconsdec.params_from_torch(state_dict, jaxconsdec.CONSISTENCY_DECODER)
    images = jaxconsdec.decode(params, latents, jax.random.key(0))   # (B, 3, 8h, 8w) in [-1, 1]
    pixels = jaxconsdec.to_uint8(images)
    latents = jaxconsdec.encode(vae_params, images)                   # the other way
"""

from jaxconsdec.autoencoder import encode, vae_decode
from jaxconsdec.checkpoint import CheckpointError, load
from jaxconsdec.config import (CONSISTENCY_DECODER, FLUX_VAE, SD3_VAE, SD_VAE, SDXL_VAE, TINY,
                               TINY_VAE, UNetConfig, VAEConfig)
from jaxconsdec.images import save_png, to_uint8
from jaxconsdec.sampler import decode, example_keys, prepare_latents
from jaxconsdec.schedule import TABLES, timesteps_for
from jaxconsdec.training.loss import consistency_loss, denoising_loss
from jaxconsdec.models.unet import UNet
from jaxconsdec.models.vae import VAE
from jaxconsdec.weights import (ParamsMismatchError, abstract_params, check_params,
                                param_count, params_from_torch, random_params,
                                torch_key_to_path)
from jaxconsdec.xla_options import compiler_options

__version__ = "0.1.0"

__all__ = [
    "CONSISTENCY_DECODER", "TINY", "UNetConfig", "UNet", "decode", "example_keys",
    "VAEConfig", "SD_VAE", "SDXL_VAE", "SD3_VAE", "FLUX_VAE", "TINY_VAE", "VAE", "encode",
    "vae_decode", "consistency_loss", "denoising_loss",
    "prepare_latents", "TABLES", "timesteps_for", "to_uint8", "save_png",
    "ParamsMismatchError", "abstract_params", "check_params", "param_count",
    "params_from_torch", "random_params", "torch_key_to_path", "load", "CheckpointError",
    "compiler_options", "__version__",
]
