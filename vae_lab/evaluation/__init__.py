"""After training, on the test split: `metrics` (eval/*: IWAE NLL, active units, probes, PCA
baseline), `figures` and `artifacts` (images, latents, kl_per_dim), `latent_evolution` (the GIF)."""
