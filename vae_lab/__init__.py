"""vae_lab: train, track and compare autoencoders (AE, VAE, conv AE, conv VAE)."""

__version__ = "0.1.0"
