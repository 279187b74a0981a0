"""jaxconsdec against diffusers' `ConsistencyDecoderVAE` (PyTorch) on the same weights, the
same latents and the same injected noise: what `jaxconsdec parity` measures.

The reference is diffusers itself. A diffusers `ConsistencyDecoderVAE` folder is read by its
`from_pretrained`, so diffusers reads the file. Any other layout the converter takes
(OpenAI's TorchScript file, a `UNet2DModel` file, the raw layout) has no diffusers loader: its
tensors, as stored, under the diffusers names the converter maps them to, are loaded into
diffusers' model with `load_state_dict(strict=True)`. The report says which.

Per block: the first UNet call of diffusers' float32 decode is recorded (its input and each
block's output, by forward hooks); jaxconsdec's UNet runs on that same input and hands back
its blocks' outputs (`UNet` sows them as "intermediates"). So a block's error is that
block's and the ones before it, never the sampler's. End to end: both `decode`s from the
same latents with the same noise, diffusers' `randn_tensor` replaced by the noise for the
call. Errors are ||x - ref|| / ||ref|| in float64; the reference is always diffusers in
float32. For a lower precision, diffusers' own error in that dtype is reported beside
jaxconsdec's.

torch and diffusers are imported only here, and only when a comparison runs: the optional
dependency `jaxconsdec[parity]`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import numpy as np

from jaxconsdec.config import SD_LATENT_MEAN, SD_LATENT_STD, SD_SCALING_FACTOR, UNetConfig

# The parity suite's bounds (docs/parity.md). bf16/fp16 compute is bounded end to end only:
# its per-block errors are stated, since rounding to 8 bits grows with depth by design.
BOUNDS = {"float32": {"block": 1e-5, "decode": 1e-4},
          "bfloat16": {"block": None, "decode": 3e-2},
          "float16": {"block": None, "decode": 3e-2}}
SCHEDULE = (1.0, 0.5)  # diffusers' decode: 2 steps, timesteps 1008 and 512
MISSING = ("jaxconsdec parity runs diffusers (PyTorch) beside jaxconsdec: install them with"
           " pip install 'jaxconsdec[parity]' (install the torch build you want first)")


class ParityError(ValueError):
  """The weights or options cannot be compared with diffusers (said why, and what to do)."""


@dataclasses.dataclass
class Row:
  dtype: str
  part: str           # "time_embedding", "down_blocks_0", ..., "unet", "decode"
  jaxconsdec: float   # jaxconsdec in `dtype` against diffusers in float32
  diffusers: Optional[float]  # diffusers in `dtype` against itself in float32 (not for fp32)
  bound: Optional[float]

  @property
  def within(self) -> bool:
    return self.bound is None or self.jaxconsdec <= self.bound


def rel_err(value, reference) -> float:
  """||value - reference|| / ||reference||, in float64."""
  a = np.asarray(value, np.float64)
  b = np.asarray(reference, np.float64)
  if a.shape != b.shape:
    raise AssertionError(f"shapes differ: {a.shape} against {b.shape}")
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def import_reference():
  """(torch, diffusers), or ParityError saying how to install them."""
  try:
    import diffusers
    import torch
  except ImportError:
    raise ParityError(MISSING) from None
  return torch, diffusers


def check_comparable(config: UNetConfig) -> None:
  """diffusers' ConsistencyDecoderVAE decodes SD 1.x/2.x latents with fixed statistics."""
  sd = (config.latent_channels == 4 and config.shift_factor == 0.0
        and np.allclose(config.scaling_factor, SD_SCALING_FACTOR)
        and np.allclose(config.latent_mean, SD_LATENT_MEAN)
        and np.allclose(config.latent_std, SD_LATENT_STD))
  if not sd:
    raise ParityError(
        "diffusers' ConsistencyDecoderVAE decodes only SD 1.x/2.x latents (4 channels, scaling"
        f" {SD_SCALING_FACTOR}, its own fixed statistics); these weights are a decoder for"
        f" {config.latent_channels}-channel latents (scaling {config.scaling_factor}, shift"
        f" {config.shift_factor}), which it cannot run")


def reference_model(sources: Sequence[str], config: UNetConfig, device: str):
  """diffusers' ConsistencyDecoderVAE in float32 on `device`, with the weights in `sources`,
  and how they were read."""
  torch, diffusers = import_reference()
  folder = os.path.dirname(os.path.abspath(sources[0]))
  meta = os.path.join(folder, "config.json")
  if len(sources) == 1 and _class_name(meta) == "ConsistencyDecoderVAE":
    variant = "fp16" if sources[0].endswith(".fp16.safetensors") else None
    vae = diffusers.ConsistencyDecoderVAE.from_pretrained(folder, variant=variant,
                                                          torch_dtype=torch.float32)
    how = "diffusers' ConsistencyDecoderVAE.from_pretrained"
  else:
    from jaxconsdec.convert import read_weights
    tensors = read_weights(list(sources), config).unet
    n = len(config.block_out_channels)
    vae = diffusers.ConsistencyDecoderVAE(
        # The SD encoder is not used here; small, but with 4 levels: diffusers' decode
        # upsamples the latents by 2 ** (levels - 1).
        encoder_block_out_channels=(8, 8, 8, 8), encoder_layers_per_block=1,
        encoder_norm_num_groups=8,
        decoder_block_out_channels=config.block_out_channels,
        decoder_layers_per_block=config.layers_per_block,
        decoder_norm_num_groups=config.norm_num_groups, decoder_norm_eps=config.norm_eps,
        decoder_in_channels=config.in_channels, decoder_out_channels=config.out_channels,
        decoder_num_train_timesteps=config.num_train_timesteps,
        decoder_down_block_types=("ResnetDownsampleBlock2D",) * n,
        decoder_up_block_types=("ResnetUpsampleBlock2D",) * n)
    state = {k: torch.from_numpy(np.asarray(tensors[k], np.float32)) for k in tensors}
    vae.decoder_unet.load_state_dict(state, strict=True)
    how = "jaxconsdec's reader (tensors as stored, diffusers' names), load_state_dict(strict)"
  return vae.to(device=device, dtype=torch.float32).eval(), how


def _class_name(path: str) -> Optional[str]:
  try:
    with open(path, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError):
    return None
  return meta.get("_class_name") if isinstance(meta, dict) else None


@contextlib.contextmanager
def injected_noise(noises, device):
  """diffusers' decode and scheduler draw through their modules' `randn_tensor`, in step
  order: for the call, they get `noises` instead, in the dtype and on the device asked."""
  import torch
  from diffusers.models.autoencoders import consistency_decoder_vae as vae_module
  from diffusers.schedulers import scheduling_consistency_decoder as sched_module
  queue = [torch.from_numpy(np.asarray(n, np.float32)) for n in noises]

  def draw(shape, generator=None, device=None, dtype=None, **kwargs):
    if not queue:
      raise AssertionError("diffusers drew more noise than the schedule's steps")
    return queue.pop(0).to(device=device, dtype=dtype).reshape(shape)

  saved = (vae_module.randn_tensor, sched_module.randn_tensor)
  vae_module.randn_tensor = sched_module.randn_tensor = draw
  try:
    yield
  finally:
    vae_module.randn_tensor, sched_module.randn_tensor = saved
  if queue:
    raise AssertionError("diffusers drew less noise than the schedule's steps")


def block_names(config: UNetConfig) -> list[str]:
  levels = len(config.block_out_channels)
  return (["time_embedding"] + [f"down_blocks_{i}" for i in range(levels)] + ["mid_block"]
          + [f"up_blocks_{i}" for i in range(levels)])


@contextlib.contextmanager
def recording(unet, names: list[str]):
  """Records the first call's input and each named block's output of a diffusers UNet."""
  record = {}

  def keep(name):
    def hook(module, args, output):
      if name not in record:
        out = output[0] if isinstance(output, tuple) else output  # down blocks: (h, skips)
        record[name] = out.detach().float().cpu().numpy()
    return hook

  def keep_input(module, args):
    if "input" not in record:
      x = args[0].detach().float().cpu().numpy()
      t = np.asarray(args[1].detach().cpu()).reshape(-1)  # diffusers passes one timestep
      record["input"] = (x, np.broadcast_to(t, x.shape[:1]).astype(np.int32))
  handles = [unet.register_forward_pre_hook(keep_input)]
  for name in names:
    module = unet.get_submodule(name.replace("_blocks_", "_blocks."))
    handles.append(module.register_forward_hook(keep(name)))
  try:
    yield record
  finally:
    for h in handles:
      h.remove()


def _nhwc(x: np.ndarray) -> np.ndarray:
  return x.transpose(0, 2, 3, 1) if x.ndim == 4 else x


def _timed(run: Callable[[], np.ndarray], repeats: int) -> tuple[np.ndarray, float, float]:
  """run()'s result, its first call's seconds (compilation included) and the median of
  `repeats` more."""
  start = time.perf_counter()
  out = run()
  first = time.perf_counter() - start
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    out = run()
    times.append(time.perf_counter() - start)
  return out, first, statistics.median(times) if times else first


@contextlib.contextmanager
def true_float32():
  """The reference computes in float32 proper: no TF32 on GPUs, for the call only."""
  import torch
  saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  try:
    yield
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def compare(params, config: UNetConfig, vae, latents: np.ndarray, noises: Sequence[np.ndarray],
            *, dtypes: Sequence[str] = ("float32",), jax_device=None, torch_device: str = "cpu",
            repeats: int = 2, say: Callable[[str], None] = lambda line: None) -> dict:
  """Rows of errors and each side's times, for each dtype. `vae`: `reference_model`'s.
  latents: raw SD latents (B, 4, h, w); noises: one (B, 3, 8h, 8w) array per step."""
  with true_float32():
    return _compare(params, config, vae, latents, noises, dtypes, jax_device, torch_device,
                    repeats, say)


def _compare(params, config, vae, latents, noises, dtypes, jax_device, torch_device, repeats,
             say) -> dict:
  import jax
  import torch

  from jaxconsdec.models.unet import UNet
  from jaxconsdec.sampler import decode

  check_comparable(config)
  names = block_names(config)
  device = jax_device or jax.devices()[0]
  params = jax.device_put(params, device)
  sync = torch.cuda.synchronize if torch_device.startswith("cuda") else (lambda: None)

  def torch_decode(model, dtype):
    z = torch.from_numpy(latents).to(device=torch_device, dtype=dtype)

    def run():
      with injected_noise(noises, torch_device), torch.inference_mode():
        out = model.decode(z).sample
      sync()
      return out.float().cpu().numpy()
    return run

  torch_dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}
  rows, times = [], {}
  say(f"diffusers, float32, on {torch_device}")
  with recording(vae.decoder_unet, names) as ref_blocks:
    ref, torch_first, torch_time = _timed(torch_decode(vae, torch.float32), repeats)
  unet_in, unet_t = ref_blocks["input"]
  with torch.inference_mode():
    t = torch.from_numpy(unet_t).to(torch_device)
    ref_unet = vae.decoder_unet(torch.from_numpy(unet_in).to(torch_device), t).sample
  ref_unet = ref_unet.float().cpu().numpy()

  for dtype in dtypes:
    cfg = config.replace(dtype=dtype)
    bounds = BOUNDS[dtype]
    say(f"jaxconsdec, {dtype}, on {device}")
    apply = jax.jit(lambda p, x, t: UNet(cfg).apply({"params": p}, x, t,
                                                    mutable=["intermediates"]))
    with jax.default_device(device):
      out, state = apply(params, _nhwc(unet_in), unet_t)
      got = {k.removesuffix("_output"): np.asarray(v[0], np.float32)
             for k, v in state["intermediates"].items()}
      got["unet"] = np.asarray(out, np.float32)

      def jax_run():
        return np.asarray(decode(params, latents, 0, config=cfg, schedule=SCHEDULE,
                                 noise=noises, clamp=False))
      image, jax_first, jax_time = _timed(jax_run, repeats)

    theirs = {}
    if dtype != "float32":
      say(f"diffusers, {dtype}, on {torch_device}")
      low = copy.deepcopy(vae).to(dtype=torch_dtypes[dtype])
      with recording(low.decoder_unet, names) as theirs:
        low_image, torch_first, torch_low_time = _timed(torch_decode(low, torch_dtypes[dtype]),
                                                        repeats)
      with torch.inference_mode():
        x = torch.from_numpy(unet_in).to(device=torch_device, dtype=torch_dtypes[dtype])
        theirs["unet"] = low.decoder_unet(x, t).sample.float().cpu().numpy()
      del low
    for name in names + ["unet"]:
      want = ref_unet if name == "unet" else ref_blocks[name]
      rows.append(Row(dtype, name, rel_err(got[name], _nhwc(want)),
                      rel_err(theirs[name], want) if theirs else None, bounds["block"]))
    rows.append(Row(dtype, "decode", rel_err(image, ref),
                    rel_err(low_image, ref) if theirs else None, bounds["decode"]))
    times[dtype] = {"jaxconsdec_s": jax_time, "jaxconsdec_first_s": jax_first,
                    "diffusers_s": torch_time if dtype == "float32" else torch_low_time}
  return {"rows": [dataclasses.asdict(r) | {"within": r.within} for r in rows],
          "times": times, "passed": all(r.within for r in rows),
          "jax_device": str(device), "torch_device": torch_device, "repeats": repeats}


def markdown(report: dict) -> str:
  """The report as the tables docs/parity.md shows."""
  def e(x):
    return "" if x is None else f"{x:.2e}"
  lines = [f"weights: `{report['weights']}` ({report['torch_weights']})",
           f"latents: {report['latents']}, shape {tuple(report['latent_shape'])};"
           f" jax {report['versions']['jax']} on {report['jax_device']}, torch"
           f" {report['versions']['torch']} (diffusers {report['versions']['diffusers']}) on"
           f" {report['torch_device']}", "",
           "| dtype | part | jaxconsdec vs diffusers fp32 | diffusers in dtype vs fp32 | bound |"
           " within |", "|---|---|---|---|---|---|"]
  for r in report["rows"]:
    lines.append(f"| {r['dtype']} | {r['part']} | {e(r['jaxconsdec'])} | {e(r['diffusers'])}"
                 f" | {e(r['bound']) or 'stated'} | {'yes' if r['within'] else '**no**'} |")
  lines += ["", "| dtype | jaxconsdec s/decode | (first call, compiling) | diffusers s/decode |",
            "|---|---|---|---|"]
  for dtype, t in report["times"].items():
    lines.append(f"| {dtype} | {t['jaxconsdec_s']:.3f} | {t['jaxconsdec_first_s']:.1f} |"
                 f" {t['diffusers_s']:.3f} |")
  return "\n".join(lines) + "\n"
