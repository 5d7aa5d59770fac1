"""Every use of a PyTorch name that is not public API, in one place. Each has a test in
tests/test_torch_compat.py that fails loudly when a PyTorch release changes it."""

from __future__ import annotations

import torch


def fused_adam_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor], *, lr: float, beta1: float,
                beta2: float, eps: float) -> None:
    """One Adam update of `params` in place, by the kernel `torch.optim.Adam(fused=True)` runs
    (`torch._fused_adam_`, after adding 1 to each step, as it does): no weight decay, amsgrad
    or maximize. Every tensor on one device, in one dtype."""
    torch._foreach_add_(steps, 1)
    torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, lr=lr, beta1=beta1, beta2=beta2,
                       weight_decay=0.0, eps=eps, amsgrad=False, maximize=False, grad_scale=None, found_inf=None)
