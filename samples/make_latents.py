"""Writes the sample latents shipped in samples/latents/ (run from the repository root).

They are the demo's three held-out photos (scikit-image's astronaut, chelsea and coffee,
never seen in training), each cropped to sides that divide by 8 and encoded by the small
frozen encoder that ships inside the demo model (samples/demo/model): raw latents, (4, h, w)
float32 .npy files. The README's first command decodes them with the demo model. They are
*not* Stable Diffusion latents: the released decoder cannot decode them, and the demo model
cannot decode SD latents.
"""

import os
import sys

import numpy as np

import jaxconsdec as jcd

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "demo"))
from photos import HELD_OUT, crop_to_multiple_of_8, pixels  # noqa: E402


def main():
  model = jcd.load(os.path.join(HERE, "demo", "model"))
  out = os.path.join(HERE, "latents")
  os.makedirs(out, exist_ok=True)
  for name in os.listdir(out):
    os.remove(os.path.join(out, name))
  for name in HELD_OUT:
    image = crop_to_multiple_of_8(pixels(name))
    latents = jcd.encode(model.vae_params, image[None], config=model.vae_config, layout="NHWC")
    np.save(os.path.join(out, f"{name}.npy"), np.asarray(latents[0]).transpose(2, 0, 1))


if __name__ == "__main__":
  main()
