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


# Elements a chunk when moments are widened (or gradients scaled) a piece at a time: small enough that the
# float32 copies stay in cache between being written and read, large enough that the per-call overhead of
# the fused kernel (tens of microseconds) is noise. A multiple of the kernel's vector width: its scalar tail
# rounds differently, so only aligned chunks give the whole tensor's bits.
CHUNK_ELEMENTS = 1 << 18


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
    (the profile's state dtype) are widened for the update and narrowed back in place. Either of those runs
    `CHUNK_ELEMENTS` at a time through reused buffers, so no tensor-sized copy is ever allocated; the
    arithmetic is element-wise, so the result is bit-for-bit the same as on whole tensors.
    """
    by_group: dict[tuple[float, float], list[str]] = {}
    for name in params:
        by_group.setdefault(param_group(name, config), []).append(name)
    for (lr, weight_decay), names in by_group.items():
        hyper = {"fused": params[names[0]].device.type in ("cpu", "cuda"), "amsgrad": False, "beta1": config.beta1,
                 "beta2": config.beta2, "lr": lr * lr_scale, "weight_decay": weight_decay, "eps": config.eps,
                 "maximize": False}
        whole = [n for n in names if not _needs_copies(exp_avg[n], params[n], grad_scale)]
        if whole:
            adamw([params[n] for n in whole], [grads[n] for n in whole], [exp_avg[n] for n in whole],
                  [exp_avg_sq[n] for n in whole], [], _step_tensors(step, len(whole)), **hyper)
        chunked = [n for n in names if n not in whole]
        if chunked:
            _adamw_in_chunks([params[n] for n in chunked], [grads[n] for n in chunked],
                             [exp_avg[n] for n in chunked], [exp_avg_sq[n] for n in chunked], step, grad_scale, hyper)


def _needs_copies(m: Tensor, p: Tensor, grad_scale: float) -> bool:
    """Whether the update has to copy: moments narrower than the parameter, or gradients to scale."""
    return m.dtype != p.dtype or grad_scale != 1.0


def _step_tensors(step: int, count: int) -> list[Tensor]:
    # torch increments the step tensors itself before using them.
    return [torch.tensor(float(step - 1)) for _ in range(count)]


def _adamw_in_chunks(
    ps: list[Tensor], gs: list[Tensor], m1: list[Tensor], m2: list[Tensor], step: int, grad_scale: float, hyper: dict
) -> None:
    """AdamW a chunk at a time: gradients scaled and moments widened into buffers of the parameters' dtype,
    reused for every chunk, then the moments narrowed back. A tensor that is not contiguous (none of the
    store's are) cannot be cut into flat chunks and is copied whole instead."""
    longest = min(CHUNK_ELEMENTS, max(p.numel() for p in ps))
    buffers = {}
    for p, g, m, v in zip(ps, gs, m1, m2, strict=True):
        if not all(t.is_contiguous() for t in (p, g, m, v)):
            g = g * grad_scale if grad_scale != 1.0 else g
            wide_m, wide_v = m.to(p.dtype), v.to(p.dtype)
            adamw([p], [g], [wide_m], [wide_v], [], _step_tensors(step, 1), **hyper)
            m.copy_(wide_m)
            v.copy_(wide_v)
            continue
        if p.dtype not in buffers:
            buffers[p.dtype] = [torch.empty(longest, dtype=p.dtype, device=p.device) for _ in range(3)]
        g_buf, m_buf, v_buf = buffers[p.dtype]
        flat = [t.view(-1) for t in (p, g, m, v)]
        narrow = m.dtype != p.dtype
        for start in range(0, p.numel(), CHUNK_ELEMENTS):
            stop = min(start + CHUNK_ELEMENTS, p.numel())
            pc, gc, mc, vc = (t[start:stop] for t in flat)
            size = stop - start
            if grad_scale != 1.0:
                gc = torch.mul(gc, grad_scale, out=g_buf[:size])
            if narrow:
                mc, vc = m_buf[:size].copy_(mc), v_buf[:size].copy_(vc)
            adamw([pc], [gc], [mc], [vc], [], _step_tensors(step, 1), **hyper)
            if narrow:
                flat[2][start:stop].copy_(mc)
                flat[3][start:stop].copy_(vc)
