"""The PyTorch side of the parity suite: diffusers models built from a UNetConfig, fresh
random weights, the original OpenAI sampling loop written in torch, and the error metric."""

from __future__ import annotations

import flax
import numpy as np
import torch
from diffusers import UNet2DModel
from diffusers.models.autoencoders.consistency_decoder_vae import ConsistencyDecoderVAE
from diffusers.schedulers.scheduling_consistency_decoder import ConsistencyDecoderScheduler

from jaxconsdec.config import UNetConfig
from jaxconsdec.weights import torch_key_to_path, torch_to_flax_layout

# The reference computes in true float32: no TF32 on GPUs, no reduced matmul precision.
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_float32_matmul_precision("highest")


def rel_err(jax_out, torch_out) -> float:
  """||jax - torch|| / ||torch||, in float64."""
  a = np.asarray(jax_out, dtype=np.float64)
  b = torch_out.detach().double().numpy() if isinstance(torch_out, torch.Tensor) else np.asarray(
      torch_out, dtype=np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def unet2d_kwargs(cfg: UNetConfig) -> dict:
  n = len(cfg.block_out_channels)
  return dict(
      in_channels=cfg.in_channels, out_channels=cfg.out_channels,
      block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
      norm_num_groups=cfg.norm_num_groups, norm_eps=cfg.norm_eps,
      num_train_timesteps=cfg.num_train_timesteps,
      down_block_types=("ResnetDownsampleBlock2D",) * n,
      up_block_types=("ResnetUpsampleBlock2D",) * n,
      add_attention=False, resnet_time_scale_shift="scale_shift",
      time_embedding_type="learned", downsample_padding=1)


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
  """Fresh random weights. Norm scales/biases and all biases are made non-trivial (the
  default 1/0 would hide a swapped scale and bias), conv and linear weights keep torch's
  default fan-in scaling so activations stay O(1) through the depth."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      elif p.dim() >= 2 and "time_proj" not in name:
        fan_in = p[0].numel()
        p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / fan_in) ** 0.5)
      else:  # the learned time table
        p.copy_(torch.randn(p.shape, generator=gen))
  return module.eval()


def diffusers_unet(cfg: UNetConfig, seed: int) -> UNet2DModel:
  torch.manual_seed(seed)
  return randomize_(UNet2DModel(**unet2d_kwargs(cfg)), seed)


def diffusers_vae(cfg: UNetConfig, seed: int) -> ConsistencyDecoderVAE:
  """A ConsistencyDecoderVAE whose decoder_unet has `cfg`'s shape; a small SD encoder."""
  n = len(cfg.block_out_channels)
  torch.manual_seed(seed)
  vae = ConsistencyDecoderVAE(
      encoder_block_out_channels=(16, 16, 16, 16), encoder_layers_per_block=1,
      encoder_norm_num_groups=8,
      decoder_block_out_channels=cfg.block_out_channels,
      decoder_layers_per_block=cfg.layers_per_block,
      decoder_norm_num_groups=cfg.norm_num_groups, decoder_norm_eps=cfg.norm_eps,
      decoder_in_channels=cfg.in_channels, decoder_out_channels=cfg.out_channels,
      decoder_num_train_timesteps=cfg.num_train_timesteps,
      decoder_down_block_types=("ResnetDownsampleBlock2D",) * n,
      decoder_up_block_types=("ResnetUpsampleBlock2D",) * n)
  randomize_(vae.decoder_unet, seed)
  return vae.eval()


def diffusers_vae_decode(vae: ConsistencyDecoderVAE, latents: np.ndarray, noises,
                         monkeypatch) -> torch.Tensor:
  """diffusers' `ConsistencyDecoderVAE.decode` with injected noise: its decode and its
  scheduler each draw through their module's `randn_tensor`, in step order."""
  from diffusers.models.autoencoders import consistency_decoder_vae as vae_module
  from diffusers.schedulers import scheduling_consistency_decoder as sched_module
  queue = [torch.from_numpy(n) for n in noises]
  fake = lambda shape, **kw: queue.pop(0)
  monkeypatch.setattr(vae_module, "randn_tensor", fake)
  monkeypatch.setattr(sched_module, "randn_tensor", fake)
  with torch.no_grad():
    out = vae.decode(torch.from_numpy(latents)).sample
  assert not queue, "diffusers drew fewer noises than given"
  return out


def diffusers_autoencoder(cfg, seed: int):
  """A diffusers AutoencoderKL with `cfg`'s (a VAEConfig's) shape and fresh random weights."""
  from diffusers import AutoencoderKL
  n = len(cfg.block_out_channels)
  torch.manual_seed(seed)
  vae = AutoencoderKL(
      in_channels=cfg.in_channels, out_channels=cfg.out_channels,
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
      latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
      scaling_factor=cfg.scaling_factor,
      shift_factor=cfg.shift_factor if cfg.shift_factor else None,
      use_quant_conv=cfg.use_quant_conv, use_post_quant_conv=cfg.use_post_quant_conv,
      mid_block_add_attention=cfg.mid_block_add_attention)
  return randomize_(vae, seed)


def state_dict_numpy(module: torch.nn.Module, prefix: str = "") -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()
          if k.startswith(prefix)}


def flax_params_of(module: torch.nn.Module) -> dict:
  """Params of any diffusers sub-module (a ResnetBlock2D, say), through the project's one
  key mapping: module-relative names map to module-relative Flax paths."""
  flat = {}
  for key, value in state_dict_numpy(module).items():
    path, kind = torch_key_to_path(key)
    flat[path] = torch_to_flax_layout(value, kind, path[-1])
  return flax.traverse_util.unflatten_dict(flat)


def nchw(x) -> torch.Tensor:
  """NHWC numpy/JAX -> NCHW torch float32."""
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(x: torch.Tensor) -> np.ndarray:
  return x.detach().numpy().transpose(0, 2, 3, 1)


def _round_timesteps(timesteps, total_timesteps, n_distilled_steps, truncate_start=True):
  # openai/consistencydecoder, verbatim in substance.
  space = torch.div(total_timesteps, n_distilled_steps, rounding_mode="floor")
  rounded = (torch.div(timesteps, space, rounding_mode="floor") + 1) * space
  if truncate_start:
    rounded[rounded == total_timesteps] -= space
  else:
    rounded[rounded == total_timesteps] -= space
    rounded[rounded == 0] += space
  return rounded


def original_timesteps(schedule) -> list[int]:
  ts = _round_timesteps(torch.arange(0, 1024), 1024, 64, truncate_start=False)
  return [int(ts[int((1024 - 1) * s)].item()) for s in schedule]


SD_MEANS = (0.38862467, 0.02253063, 0.07381133, -0.0171294)  # SPEC section 2
SD_STDS = (0.9654121, 1.0440036, 0.76147926, 0.77022034)


@torch.no_grad()
def original_decode(unet: UNet2DModel, latents: torch.Tensor, schedule, noises,
                    clamp: bool = True, scaling: float = 0.18215, shift: float = 0.0,
                    means=SD_MEANS, stds=SD_STDS) -> torch.Tensor:
  """OpenAI's ConsistencyDecoder.__call__ loop in torch (fp32), with injected noise.

  The original's UNet is the TorchScript module; here it is the diffusers UNet2DModel with
  the same weights. Tables: diffusers' scheduler, built with torch like the original's. The
  latent normalisation is the original's, `(latents * 0.18215 - means) / stds`, generalised
  to another VAE's latents as `((latents - shift) * scaling - means) / stds` (TRAINING.md 3).
  """
  sched = ConsistencyDecoderScheduler()
  means = torch.tensor(means, dtype=torch.float32)[None, :, None, None]
  stds = torch.tensor(stds, dtype=torch.float32)[None, :, None, None]
  z = ((latents - shift) * scaling - means) / stds
  z = torch.nn.functional.interpolate(z, mode="nearest", scale_factor=8)
  x = torch.zeros((z.shape[0], 3, z.shape[2], z.shape[3]))
  for t, noise in zip(original_timesteps(schedule), noises):
    x = sched.sqrt_alphas_cumprod[t] * x + sched.sqrt_one_minus_alphas_cumprod[t] * noise
    out = unet(torch.cat([sched.c_in[t] * x, z], dim=1), torch.tensor([t] * z.shape[0])).sample
    x = sched.c_out[t] * out[:, :3] + sched.c_skip[t] * x
    if clamp:
      x = x.clamp(-1, 1)
  return x
