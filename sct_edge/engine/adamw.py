"""AdamW on one block's tensors at a time, with per-component learning rates.

The optimizer state lives in the store, so there is no `torch.optim.Optimizer` holding the whole model:
`adamw_update` runs torch's own functional AdamW (the fused CPU/GPU kernel, the same arithmetic as
`torch.optim.AdamW(fused=True)`) on the tensors of one shard, which is what lets the scheduler apply the
update as soon as that block's gradients are complete.

Groups: spectral factors (U, s, V) take `lr_spectral`; dense parameters (norms, dense matrices) take
`lr_dense`. Weight decay applies to dense matrices and to s, never to U and V (retraction would undo it)
nor to RMSNorm gains.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim.adamw import adamw


@dataclass
class OptimConfig:
    lr_spectral: float = 3e-3
    lr_dense: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float | None = None  # global-norm clipping; None disables it


def is_spectral(name: str) -> bool:
    return name.endswith((".U", ".s", ".V"))


def is_orthonormal_factor(name: str) -> bool:
    return name.endswith((".U", ".V"))


def param_group(name: str, config: OptimConfig) -> tuple[float, float]:
    """(learning rate, weight decay) of the parameter called `name`."""
    lr = config.lr_spectral if is_spectral(name) else config.lr_dense
    decays = name.endswith(".s") or (name.endswith(".weight") and "norm" not in name.rsplit(".", 2)[-2])
    return lr, config.weight_decay if decays else 0.0


def torch_param_groups(named_params: list[tuple[str, Tensor]], config: OptimConfig) -> list[dict]:
    """The same grouping as `param_group`, in `torch.optim` form, for in-memory reference training."""
    groups: dict[tuple[float, float], list[Tensor]] = {}
    for name, p in named_params:
        groups.setdefault(param_group(name, config), []).append(p)
    return [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in groups.items()]


def adamw_update(
    params: dict[str, Tensor],
    grads: dict[str, Tensor],
    exp_avg: dict[str, Tensor],
    exp_avg_sq: dict[str, Tensor],
    step: int,
    config: OptimConfig,
    lr_scale: float = 1.0,
    grad_scale: float = 1.0,
) -> None:
    """One AdamW step, in place, on the named tensors of one shard; `step` counts from 1.

    `grad_scale` multiplies the gradients first (global-norm clipping). Moments kept in a narrower dtype
    (the profile's state dtype) are widened for the update and narrowed back in place.
    """
    by_group: dict[tuple[float, float], list[str]] = {}
    for name in params:
        by_group.setdefault(param_group(name, config), []).append(name)
    for (lr, weight_decay), names in by_group.items():
        ps = [params[n] for n in names]
        gs = [grads[n] * grad_scale if grad_scale != 1.0 else grads[n] for n in names]
        m1 = [exp_avg[n] if exp_avg[n].dtype == params[n].dtype else exp_avg[n].to(params[n].dtype) for n in names]
        m2 = [exp_avg_sq[n] if exp_avg_sq[n].dtype == params[n].dtype else exp_avg_sq[n].to(params[n].dtype)
              for n in names]
        # torch increments the step tensors itself before using them.
        steps = [torch.tensor(float(step - 1)) for _ in names]
        adamw(ps, gs, m1, m2, [], steps, fused=ps[0].device.type in ("cpu", "cuda"), amsgrad=False,
              beta1=config.beta1, beta2=config.beta2, lr=lr * lr_scale, weight_decay=weight_decay,
              eps=config.eps, maximize=False)
        for n, a, b in zip(names, m1, m2, strict=True):
            if a is not exp_avg[n]:
                exp_avg[n].copy_(a)
                exp_avg_sq[n].copy_(b)
