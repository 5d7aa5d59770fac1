"""The registry of datasets (`data.name`). Ours register exactly as a user's would
(`vae_lab.data.sources`); a function need not be registered to be used:
`data.name=my_package.data:my_scans` or `data.name=path/to/file.py:my_scans` name it directly
(`vae_lab.components`)."""

from vae_lab.components import Registry

DATASETS = Registry("dataset", "data.name")
register_dataset = DATASETS.register
