"""The demo's photos: real pictures that ship with scikit-image, split once into training and
held-out sets (a held-out photo is never cropped for training, by the encoder or the
decoder). Written as PNG files so that `jaxconsdec train` and `encode` read them as a user's.

A third set, `unseen/`, holds photos from outside scikit-image (scikit-learn's and
matplotlib's sample pictures, `pip install scikit-learn matplotlib`) and two scikit-image
pictures no demo set uses: the demo's numbers on pictures unlike its training photos."""

import os
import sys

import numpy as np
import skimage.data
from PIL import Image

HELD_OUT = ("astronaut", "chelsea", "coffee")
UNSEEN = ("sklearn:china.jpg", "sklearn:flower.jpg", "matplotlib:grace_hopper.jpg",
          "matplotlib:Minduka_Present_Blue_Pack.png", "cell", "microaneurysms")
TRAINING = ("rocket", "hubble_deep_field", "retina", "immunohistochemistry",
            "motorcycle_left", "motorcycle_right", "camera", "coins", "brick", "grass",
            "gravel", "moon", "clock", "colorwheel", "horse", "page", "text", "logo")


def _packaged(name: str) -> np.ndarray:
  package, file = name.split(":")
  if package == "sklearn":
    import sklearn.datasets
    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), "images")
  else:
    import matplotlib
    folder = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data")
  with Image.open(os.path.join(folder, file)) as image:
    return np.asarray(image.convert("RGB"))


def file_name(name: str) -> str:
  return os.path.splitext(name.split(":")[-1])[0]


def pixels(name: str) -> np.ndarray:
  if ":" in name:
    return _packaged(name)
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
    path = os.path.join(folder, f"{file_name(name)}.png")
    image = pixels(name)
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, axis=-1)
    Image.fromarray(image).save(path)
    paths.append(path)
  return paths


if __name__ == "__main__":
  root = sys.argv[1]
  write(os.path.join(root, "train"), TRAINING)
  write(os.path.join(root, "held_out"), HELD_OUT)
  write(os.path.join(root, "unseen"), UNSEEN)
