"""What a researcher varies in the model: `posterior` (q(z|x) and its `sample`, the
reparameterization), `autoencoders` (the interface and the built-in families), `priors` (p(z):
standard normal, mixture, VampPrior, and the KL to it), `losses` (reconstruction NLL, the KL
schedule, free bits), `registry` (where families and priors are registered) and `components`
(a config's family and prior, checked and built).

Your own family or prior subclasses `Autoencoder` or `Prior` (the README's 'Your own components').
"""

from vae_lab.models.autoencoders import Autoencoder
from vae_lab.models.posterior import Posterior
from vae_lab.models.priors import Prior
from vae_lab.models.registry import register_model, register_prior

__all__ = ["Autoencoder", "Posterior", "Prior", "register_model", "register_prior"]
