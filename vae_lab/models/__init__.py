"""What a researcher varies in the model: `autoencoders` (the families, `Posterior` and its
`sample`, the reparameterization), `losses` (reconstruction NLL, KL, the KL schedule)."""
