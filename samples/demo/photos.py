"""The demo's photos: real pictures that ship with scikit-image, split once into training and
held-out sets (a held-out photo is never cropped for training, by the encoder or the
decoder). Written as PNG files so that `jaxconsdec train` and `encode` read them as a user's."""

import os
import sys

import numpy as np
import skimage.data
from PIL import Image

HELD_OUT = ("astronaut", "chelsea", "coffee")
TRAINING = ("rocket", "hubble_deep_field", "retina", "immunohistochemistry",
            "motorcycle_left", "motorcycle_right", "camera", "coins", "brick", "grass",
            "gravel", "moon", "clock", "colorwheel", "horse", "page", "text", "logo")


def pixels(name: str) -> np.ndarray:
  if name.startswith("motorcycle_"):
    left, right, _ = skimage.data.stereo_motorcycle()
    image = left if name.endswith("left") else right
  else:
    image = getattr(skimage.data, name)()
  if image.dtype == bool:
    image = image.astype(np.uint8) * 255
  if image.ndim == 3 and image.shape[-1] == 4:  # the logo: RGBA on white
    alpha = image[..., 3:] / 255.0
    image = (image[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
  return image


def crop_to_multiple_of_8(pixels: np.ndarray) -> np.ndarray:
  """The centred largest part of an image whose sides divide by 8."""
  h, w = (s // 8 * 8 for s in pixels.shape[:2])
  top, left = (pixels.shape[0] - h) // 2, (pixels.shape[1] - w) // 2
  return pixels[top:top + h, left:left + w]


def write(folder: str, names) -> list[str]:
  os.makedirs(folder, exist_ok=True)
  paths = []
  for name in names:
    path = os.path.join(folder, f"{name}.png")
    Image.fromarray(pixels(name)).save(path)
    paths.append(path)
  return paths


if __name__ == "__main__":
  root = sys.argv[1]
  write(os.path.join(root, "train"), TRAINING)
  write(os.path.join(root, "held_out"), HELD_OUT)
