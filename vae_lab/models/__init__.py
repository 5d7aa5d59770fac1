"""What a researcher varies in the model: `posterior` (q(z|x) and its `sample`, the
reparameterization), `autoencoders` (the interface and the built-in families), `priors` (p(z):
standard normal, mixture, VampPrior, and the KL to it), `losses` (reconstruction NLL, the KL
schedule, free bits), `objectives` (what training minimizes: ELBO, IWAE), `registry` (where
families, priors and objectives are registered) and `components` (a config's family, prior and
objective, checked and built).

Your own family, prior or objective subclasses `Autoencoder`, `Prior` or `Objective` (the
README's 'Your own components').
"""

from vae_lab.models.autoencoders import Autoencoder
from vae_lab.models.objectives import Draws, Objective
from vae_lab.models.posterior import Posterior
from vae_lab.models.priors import Prior
from vae_lab.models.registry import register_model, register_objective, register_prior

__all__ = ["Autoencoder", "Draws", "Objective", "Posterior", "Prior", "register_model", "register_objective",
           "register_prior"]
