"""Makes docs/eval_grid.png, the README's example of `jaxconsdec eval`: a crop of
scikit-image's astronaut through small RANDOMLY INITIALISED models (no real weights can be
downloaded here), so the decoded panels are noise. Run from the repository root."""

import os
import shutil
import tempfile

import skimage.data
from PIL import Image

import jaxconsdec as jcd
from jaxconsdec import checkpoint, cli


def main():
  with tempfile.TemporaryDirectory() as work:
    os.mkdir(f"{work}/photos")
    Image.fromarray(skimage.data.astronaut()[0:192, 96:288]).save(f"{work}/photos/astronaut.png")
    checkpoint.save(f"{work}/vae", vae_params=jcd.random_params(jcd.TINY_VAE, 0),
                    vae_config=jcd.TINY_VAE)
    checkpoint.save(f"{work}/cd", jcd.random_params(jcd.TINY, 0), jcd.TINY)
    code = cli.main(["eval", f"{work}/photos", "--weights", f"{work}/cd", "--vae",
                     f"{work}/vae", "-o", f"{work}/report"])
    assert code == 0, code
    shutil.copy(f"{work}/report/grids/astronaut.png", "docs/eval_grid.png")
  print("wrote docs/eval_grid.png")


if __name__ == "__main__":
  main()
