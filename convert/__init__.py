"""Readers for the published Consistency Decoder weight files, none of which needs torch.

`read_weights(paths)` detects each file's format from its content and returns diffusers
`UNet2DModel` names -> numpy arrays (plus any extra items such as the SD VAE encoder).
"""

from jaxconsdec.convert.diffusers_config import read_config
from jaxconsdec.convert.errors import WeightFileError
from jaxconsdec.convert.formats import (PARTS, SourceInfo, VAEWeights, Weights, layout_of,
                                        read_vae_weights, read_weights)

__all__ = ["WeightFileError", "SourceInfo", "Weights", "VAEWeights", "PARTS", "layout_of",
           "read_config", "read_vae_weights", "read_weights"]
