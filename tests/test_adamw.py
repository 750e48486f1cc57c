"""The store-backed AdamW step: torch's own AdamW arithmetic, and chunked copies that change no bit."""

import pytest
import torch
from torch.optim.adamw import adamw

import sct_edge.engine.adamw as adamw_module
from sct_edge.engine.adamw import OptimConfig, adamw_update

CONFIG = OptimConfig(lr_spectral=1e-2, lr_dense=3e-3, weight_decay=0.1)
SHAPES = {"layers.0.attn.q.U": (37, 4), "layers.0.attn.q.s": (4,), "layers.0.attn_norm.weight": (23,),
          "layers.0.mlp.down.weight": (5, 9)}


def _tensors(seed: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=gen) * scale for name, shape in SHAPES.items()}


def _state(state_dtype: torch.dtype):
    params, grads = _tensors(0), _tensors(1)
    exp_avg = {k: t.to(state_dtype) for k, t in _tensors(2, 0.01).items()}
    exp_avg_sq = {k: t.square().to(state_dtype) for k, t in _tensors(3, 0.01).items()}
    return params, grads, exp_avg, exp_avg_sq


def _whole_tensor_reference(params, grads, exp_avg, exp_avg_sq, step, grad_scale):
    """Each parameter alone through torch's fused AdamW, its moments widened whole and narrowed back."""
    for name, p in params.items():
        lr, decay = adamw_module.param_group(name, CONFIG)
        m, v = exp_avg[name].to(p.dtype), exp_avg_sq[name].to(p.dtype)
        adamw([p], [grads[name] * grad_scale], [m], [v], [], [torch.tensor(float(step - 1))], fused=True,
              amsgrad=False, beta1=CONFIG.beta1, beta2=CONFIG.beta2, lr=lr, weight_decay=decay, eps=CONFIG.eps,
              maximize=False)
        exp_avg[name].copy_(m)
        exp_avg_sq[name].copy_(v)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("grad_scale", [1.0, 0.37])
@pytest.mark.parametrize("chunk", [64, 1 << 18])
def test_chunked_update_is_bitwise_the_whole_tensor_update(monkeypatch, state_dtype, grad_scale, chunk):
    monkeypatch.setattr(adamw_module, "CHUNK_ELEMENTS", chunk)  # 64: many chunks, the last one ragged
    ours, reference = _state(state_dtype), _state(state_dtype)
    grads_before = {k: t.clone() for k, t in ours[1].items()}
    for step in (1, 2):
        adamw_update(*ours, step, CONFIG, grad_scale=grad_scale)
        _whole_tensor_reference(*reference, step, grad_scale)
    for mine, theirs in zip(ours, reference, strict=True):
        for name in SHAPES:
            assert mine[name].dtype == theirs[name].dtype
            assert torch.equal(mine[name], theirs[name]), name
    assert all(torch.equal(ours[1][k], grads_before[k]) for k in SHAPES)  # scaling never touches the gradients


def test_chunks_of_a_large_odd_tensor_on_two_threads_change_no_bit():
    """The fused kernel splits a whole tensor between threads and has a scalar tail; chunks of a multiple
    of its vector width land on the same bits."""
    torch.set_num_threads(2)  # conftest restores the process's setting
    gen = torch.Generator().manual_seed(7)
    n = 3 * adamw_module.CHUNK_ELEMENTS + 12_345
    ours = [{"x.U": torch.randn(n, generator=gen)} for _ in range(2)] + [
        {"x.U": torch.rand(n, generator=gen).mul(0.01).bfloat16()} for _ in range(2)]
    reference = [{k: t.clone() for k, t in d.items()} for d in ours]
    adamw_update(*ours, 4, CONFIG, grad_scale=0.8)
    _whole_tensor_reference(*reference, 4, 0.8)
    assert all(torch.equal(a["x.U"], b["x.U"]) for a, b in zip(ours, reference, strict=True))


def test_non_contiguous_tensors_take_the_whole_tensor_copy(monkeypatch):
    monkeypatch.setattr(adamw_module, "CHUNK_ELEMENTS", 64)
    ours, reference = _state(torch.bfloat16), _state(torch.bfloat16)
    name = "layers.0.mlp.down.weight"
    for state in (ours, reference):
        for tensors in state:
            tensors[name] = tensors[name].t()  # a transposed view, as an in-memory caller might pass
    adamw_update(*ours, 1, CONFIG, grad_scale=0.5)
    _whole_tensor_reference(*reference, 1, 0.5)
    assert all(torch.equal(a[name], b[name]) for a, b in zip(ours, reference, strict=True))


def test_float32_update_equals_torch_optim_adamw():
    params, grads, exp_avg, exp_avg_sq = _state(torch.float32)
    exp_avg = {k: torch.zeros_like(t) for k, t in params.items()}
    exp_avg_sq = {k: torch.zeros_like(t) for k, t in params.items()}
    module_params = {k: torch.nn.Parameter(t.clone()) for k, t in params.items()}
    groups = adamw_module.torch_param_groups(list(module_params.items()), CONFIG)
    optimizer = torch.optim.AdamW(groups, betas=(CONFIG.beta1, CONFIG.beta2), eps=CONFIG.eps, fused=True)
    for step in (1, 2, 3):
        for k, p in module_params.items():
            p.grad = grads[k] * step
        optimizer.step()
        adamw_update(params, {k: g * step for k, g in grads.items()}, exp_avg, exp_avg_sq, step, CONFIG)
    assert all(torch.equal(params[k], module_params[k].detach()) for k in SHAPES)
