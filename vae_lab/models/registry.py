"""The registries of model families, priors and training objectives. Ours register exactly as a
user's would:

    from vae_lab.models import Autoencoder, register_model

    @register_model("residual_vae")
    class ResidualVAE(Autoencoder): ...

A class need not be registered to be used: `model.name=my_package.models:ResidualVAE` or
`model.name=path/to/file.py:ResidualVAE` name it directly (`vae_lab.components`).
"""

from vae_lab.components import Registry

MODEL_FAMILIES = Registry("model", "model.name")
PRIORS = Registry("prior", "prior.name")
OBJECTIVES = Registry("objective", "loss.objective")

register_model = MODEL_FAMILIES.register
register_prior = PRIORS.register
register_objective = OBJECTIVES.register
