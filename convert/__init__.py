"""Readers for the published Consistency Decoder weight files, none of which needs torch.

`read_weights(paths)` detects each file's format from its content and returns diffusers
`UNet2DModel` names -> numpy arrays (plus any extra items such as the SD VAE encoder).
"""

from jaxconsdec.convert.diffusers_config import read_config
from jaxconsdec.convert.errors import WeightFileError
from jaxconsdec.convert.formats import SourceInfo, Weights, read_weights

__all__ = ["WeightFileError", "SourceInfo", "Weights", "read_config", "read_weights"]
