"""The Flax models: the decoder UNet, the SD VAE, and the layers they share."""
