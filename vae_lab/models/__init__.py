"""What a researcher varies in the model: `posterior` (q(z|x) and its `sample`, the
reparameterization), `autoencoders` (the families), `priors` (p(z): standard normal, mixture,
VampPrior, and the KL to it), `losses` (reconstruction NLL, the KL schedule, free bits)."""
