"""The PyTorch internals vae_lab relies on (vae_lab/training/torch_compat.py), against the real
PyTorch: a release that changes one fails here, by name."""

import numpy as np
import pytest
import torch

from conftest import run_in_fresh_process
from vae_lab.training.adam import FusedAdam


def two_models():
    torch.manual_seed(0)
    first = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    second = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    second.load_state_dict(first.state_dict())
    return first, second


def test_fused_adam_takes_the_steps_torch_optim_adam_fused_takes_to_the_last_bit():
    ours_model, theirs_model = two_models()
    head, tail = list(ours_model.parameters())[:2], list(ours_model.parameters())[2:]
    ours = FusedAdam([{"params": head, "lr": 1e-2}, {"params": tail, "lr": 3e-3}])
    theirs = torch.optim.Adam([{"params": list(theirs_model.parameters())[:2], "lr": 1e-2},
                               {"params": list(theirs_model.parameters())[2:], "lr": 3e-3}], fused=True)
    generator = torch.Generator().manual_seed(1)
    for _ in range(5):
        images = torch.randn(8, 6, generator=generator)
        for model, optimizer in ((ours_model, ours), (theirs_model, theirs)):
            optimizer.zero_grad()
            model(images).square().mean().backward()
            optimizer.step()
    for mine, reference in zip(ours_model.parameters(), theirs_model.parameters()):
        assert torch.equal(mine, reference)
    for mine, reference in zip(ours_model.parameters(), theirs_model.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(ours.state[mine][key], theirs.state[reference][key]), key
        assert ours.state[mine]["step"].dtype == theirs.state[reference]["step"].dtype


def test_a_tensor_without_a_gradient_keeps_its_value_and_takes_no_state():
    ours_model, _ = two_models()
    params = list(ours_model.parameters())
    adam = FusedAdam([{"params": params, "lr": 1e-2}])
    before = params[0].detach().clone()
    ours_model[2](torch.randn(4, 5)).sum().backward()  # only the last layer gets gradients
    adam.step()
    assert torch.equal(params[0], before) and params[0] not in adam.state
    assert float(adam.state[params[2]]["step"]) == 1.0


def test_fused_adam_steps_transposed_tensors_in_place_and_reads_any_gradient_layout():
    """The kernel reads its tensors in memory order: a weight stored transposed (as a stacked
    step keeps its linear layers) is stepped through contiguous views of its own memory, and a
    gradient laid out unlike its tensor is read by index, not by memory order."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(3, 7, 5, generator=generator)
    transposed = start.transpose(1, 2).contiguous().transpose(1, 2)  # [3, 7, 5], stored as [3, 5, 7]
    plain = start.clone()
    storage = transposed.data_ptr()
    ours, reference = FusedAdam([{"params": [transposed], "lr": 1e-2}]), FusedAdam([{"params": [plain], "lr": 1e-2}])
    for _ in range(4):
        grad = torch.randn(3, 5, 7, generator=generator).transpose(1, 2)  # the same layout as the weight
        transposed.grad, plain.grad = grad, grad.contiguous()
        ours.step()
        reference.step()
    assert transposed.data_ptr() == storage and transposed.stride() == (35, 1, 7)
    assert torch.equal(transposed, plain)
    assert torch.equal(ours.state[transposed]["exp_avg_sq"], reference.state[plain]["exp_avg_sq"])

    grads = [torch.randn(3, 5, 7, generator=generator).transpose(1, 2) for _ in range(3)]
    mixed, again = start.clone(), start.clone()  # contiguous; the first gets transposed gradients
    mixed_adam, again_adam = FusedAdam([{"params": [mixed], "lr": 1e-2}]), FusedAdam([{"params": [again], "lr": 1e-2}])
    for grad in grads:
        mixed.grad, again.grad = grad, grad.contiguous()
        mixed_adam.step()
        again_adam.step()
    assert torch.equal(mixed, again)


def test_plain_and_stacked_runs_never_import_torch_dynamo():
    """torch.optim's first step, torch.func's grad and torchvision's import all import
    torch._dynamo: 1.6 s of a process's start on a 2-core CPU, which vae_lab never uses."""
    run_in_fresh_process(
        "import sys, torch\n"
        "from vae_lab.config import load_config\n"
        "from vae_lab.data.datasets import load_data\n"
        "from vae_lab.train import train\n"
        "from vae_lab.training.run import run_trials\n"
        "from vae_lab.training.trial import TrialSpec\n"
        "overrides = ['data.name=digits', 'train.epochs=1', 'tracking.enabled=false', "
        "'train.progress=false', 'eval.enabled=false']\n"
        "config = load_config(None, overrides)\n"
        "train(config)\n"
        "specs = [TrialSpec(load_config(None, overrides + [f'train.seed={seed}'])) for seed in (0, 1)]\n"
        "outcomes = run_trials(specs, data=load_data(config.data), stacked=True)\n"
        "assert all(hasattr(outcome, 'metrics') for outcome in outcomes), outcomes\n"
        "from vae_lab.evaluation import figures\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n")


@pytest.mark.parametrize("shape, per_row", [((5, 1, 7, 6), 2), ((9, 3, 4, 4), 3), ((1, 1, 5, 5), 8), ((4, 3, 3, 5), 8)])
def test_image_grids_have_torchvision_s_pixels(tmp_path, shape, per_row):
    """vae_lab draws its grids without torchvision (its import brings torch._dynamo); the pixels
    are the ones torchvision.utils.save_image writes."""
    from PIL import Image
    from torchvision.utils import save_image as torchvision_save_image

    from vae_lab.evaluation.figures import save_image

    images = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    ours, theirs = tmp_path / "ours.png", tmp_path / "theirs.png"
    save_image(images, ours, nrow=per_row, padding=2, pad_value=1.0)
    torchvision_save_image(images, theirs, nrow=per_row, padding=2, pad_value=1.0)
    assert np.array_equal(np.asarray(Image.open(ours)), np.asarray(Image.open(theirs)))
