"""Adam as `torch.optim.Adam(fused=True)` computes it, without `torch.optim.Optimizer`.

The first `Optimizer.step` of a process imports `torch._dynamo` (1.6 s on a 2-core CPU, about
as long as a 10-epoch Fashion-MNIST run's whole evaluation), and every step then costs about
0.13 ms of Python around the kernel (`benchmarks/RESULTS.md` §0r). vae_lab never compiles its
optimizer, so its steps call torch's fused Adam kernel directly (`torch_compat.fused_adam_`):
the same arithmetic, the same per-tensor state (`step`, `exp_avg`, `exp_avg_sq`, as in
`torch.optim.Adam.state`), and weights equal to torch.optim's to the last bit
(tests/test_torch_compat.py).

    adam = FusedAdam([{"params": [...], "lr": 1e-3}, ...])
    ... param.grad = ...; adam.step(); adam.zero_grad()
"""

from __future__ import annotations

import torch

from vae_lab.training.torch_compat import fused_adam_

BETAS = (0.9, 0.999)  # torch.optim.Adam's defaults
EPS = 1e-8


class FusedAdam:
    """Param groups (`{"params": [tensor, ...], "lr": float}`) updated from each tensor's `.grad`."""

    def __init__(self, param_groups: list[dict]):
        self.param_groups = [{"params": list(group["params"]), "lr": float(group["lr"])} for group in param_groups]
        self.state: dict[torch.Tensor, dict[str, torch.Tensor]] = {}  # per tensor, once it has taken a step

    def zero_grad(self) -> None:
        for group in self.param_groups:
            for param in group["params"]:
                param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            by_kind: dict[tuple, list[torch.Tensor]] = {}  # the kernel takes one device and dtype at a time
            for param in group["params"]:
                if param.grad is not None:
                    by_kind.setdefault((param.device, param.dtype), []).append(param)
            for params in by_kind.values():
                states = [self._state(param) for param in params]
                tensors = [_in_memory_order(param, param.grad, state["exp_avg"], state["exp_avg_sq"])
                           for param, state in zip(params, states)]
                fused_adam_(*map(list, zip(*tensors)), [state["step"] for state in states],
                            lr=group["lr"], beta1=BETAS[0], beta2=BETAS[1], eps=EPS)

    def _state(self, param: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state.get(param)
        if state is None:  # as torch.optim.Adam(fused=True) starts a tensor's state
            state = self.state[param] = {
                "step": torch.zeros((), dtype=torch.float32, device=param.device),
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format)}
        return state


def _in_memory_order(param: torch.Tensor, grad: torch.Tensor, *moments: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A tensor, its gradient and its moments as the kernel must have them. The kernel updates
    them element by element in memory order: a gradient laid out unlike its tensor would be
    read in the wrong order (so it is copied into the tensor's layout), and tensors that share
    one dense non-contiguous layout (a transposed weight, `steps.StackedStep`) are handed over
    as contiguous views of the same memory, which it would otherwise copy and copy back."""
    if grad.stride() != param.stride():
        grad = torch.empty_like(param, memory_format=torch.preserve_format).copy_(grad)
    tensors = (param, grad, *moments)
    if param.is_contiguous() or any(tensor.stride() != param.stride() for tensor in moments):
        return tensors
    order = sorted(range(param.dim()), key=lambda dim: -param.stride(dim))
    views = tuple(tensor.permute(order) for tensor in tensors)
    return views if views[0].is_contiguous() else tensors
