"""Writes a diffusers ConsistencyDecoderVAE folder of random weights, for `jaxconsdec parity`
where the released weights are not at hand (CI, a GPU machine without network): the
released architecture (621M, 4-channel SD latents) or the tiny test widths.

    python benchmarks/parity_weights.py /tmp/released            # released widths, float32
    python benchmarks/parity_weights.py /tmp/tiny --widths tiny
    jaxconsdec parity /tmp/released --size 64

Weights are diffusers' own initialisation, seeded, except that every bias and norm scale is
drawn too: left at 0 and 1 they would hide a swapped scale and bias.
"""

import argparse

import torch
from diffusers import ConsistencyDecoderVAE

TINY = {"decoder_block_out_channels": (32, 64, 64, 64), "decoder_layers_per_block": 2,
        "decoder_norm_num_groups": 8}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("folder")
  p.add_argument("--widths", choices=("released", "tiny"), default="released")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args()
  torch.manual_seed(args.seed)
  vae = ConsistencyDecoderVAE(**(TINY if args.widths == "tiny" else {}))
  gen = torch.Generator().manual_seed(args.seed)
  with torch.no_grad():
    for name, param in vae.named_parameters():
      if "norm" in name and name.endswith("weight"):
        param.copy_(1 + 0.2 * torch.randn(param.shape, generator=gen))
      elif name.endswith("bias"):
        param.copy_(0.1 * torch.randn(param.shape, generator=gen))
  vae.save_pretrained(args.folder, safe_serialization=True)
  count = sum(p.numel() for p in vae.decoder_unet.parameters())
  print(f"wrote {args.folder}: a ConsistencyDecoderVAE, {args.widths} widths, decoder UNet"
        f" {count:,} parameters, seed {args.seed}")


if __name__ == "__main__":
  main()
