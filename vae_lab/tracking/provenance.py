"""Where a run came from: the command and commit (MLflow's source tags), the machine and library
versions, and the data it trained on (MLflow dataset inputs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import torch

from vae_lab import names
from vae_lab.tracking import mlflow_compat
from vae_lab.tracking.uris import project_root


def dataset_inputs(data) -> list:
    """MLflow dataset inputs of each split of `data` (vae_lab.data.ImageData): name, digest, source
    and shape, with the split as its context. Computed once per data object."""
    if "mlflow_datasets" not in data.derived:
        import mlflow.data
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        source = mlflow_compat.local_dataset_source(data.source or data.name)
        inputs = []
        for split, context in names.DATASET_CONTEXTS.items():
            if split == "val" and not data.has_val:
                continue
            images, labels = data.split(split)
            dataset = mlflow.data.from_numpy(images.cpu().numpy(), targets=labels.cpu().numpy(),
                                             source=source, name=data.name)
            inputs.append(DatasetInput(mlflow_compat.dataset_entity(dataset), tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]))
        data.derived["mlflow_datasets"] = inputs
    return data.derived["mlflow_datasets"]


def git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_root(), capture_output=True,
                                text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


def source_tags() -> dict[str, str]:
    """MLflow's own source tags (the UI's Source column): the command that made the run, and the commit."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    command = f"python -m {spec.name}" if spec is not None and spec.name else Path(sys.argv[0] or "python").name
    tags = {"mlflow.source.name": command, "mlflow.source.type": "LOCAL"}
    commit = git_commit()
    if commit:
        tags[names.GIT_COMMIT_TAG] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags


def environment_tags(device: torch.device) -> dict[str, str]:
    tags = {
        names.DEVICE_TAG: str(device),
        "torch_version": torch.__version__,
        "mlflow_version": mlflow.__version__,
        **source_tags(),
    }
    if device.type == "cuda":
        tags[names.DEVICE_NAME_TAG] = torch.cuda.get_device_name(device)
    return tags
