"""Chunked losses over the vocabulary equal the full ones: loss, input gradient, parameter gradients (the
cross-entropy of training, and the KL divergence to a teacher of import's distillation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sct_edge.model.accounting import chunk_tokens_for
from sct_edge.model.loss import IGNORE_INDEX, distill_loss_backward, lm_loss_backward
from sct_edge.model.spectral import spectral_apply


def head_and_data(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    dim, vocab, rank = 12, 50, 6
    norm = torch.randn(dim, dtype=dtype, generator=g).requires_grad_()
    U = torch.randn(vocab, rank, dtype=dtype, generator=g).requires_grad_()
    s = torch.randn(rank, dtype=dtype, generator=g).requires_grad_()
    V = torch.randn(dim, rank, dtype=dtype, generator=g).requires_grad_()
    h = torch.randn(3, 7, dim, dtype=dtype, generator=g)
    targets = torch.randint(0, vocab, (3, 7), generator=g)
    targets[0, :4] = IGNORE_INDEX  # a prompt carries no loss

    def logits_fn(rows):
        # The engine's head: final RMSNorm, then a tied spectral head ((h V) * s) Uᵀ.
        return spectral_apply(F.rms_norm(rows, (dim,), norm, 1e-5), V, s, U)

    return (norm, U, s, V), h, targets, logits_fn


@pytest.mark.parametrize("chunk", [1, 4, 5, 21, None])
def test_chunked_loss_and_gradients_equal_the_full_cross_entropy(chunk):
    params, h, targets, logits_fn = head_and_data(0)
    scale = 0.5
    full_h = h.clone().requires_grad_()
    full = F.cross_entropy(logits_fn(full_h).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX) * scale
    full.backward()
    want = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    loss, grad = lm_loss_backward(h, targets, logits_fn, scale, chunk)

    assert loss == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(grad, full_h.grad, rtol=1e-10, atol=1e-12)
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk", [1, 4, 21, None])
def test_chunked_distillation_loss_and_gradients_equal_the_full_kl_divergence(chunk):
    params, h, _, logits_fn = head_and_data(1)
    teacher_h = h + 0.3 * torch.randn(h.shape, dtype=h.dtype, generator=torch.Generator().manual_seed(2))
    scale = 0.25
    full_h = h.clone().requires_grad_()
    with torch.no_grad():
        teacher = logits_fn(teacher_h).flatten(0, 1).log_softmax(-1)
    student = logits_fn(full_h).flatten(0, 1).log_softmax(-1)
    full = (teacher.exp() * (teacher - student)).sum(-1).mean() * scale  # KL(p_teacher ‖ p_student), by hand
    full.backward()
    want = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    loss, grad = distill_loss_backward(h, teacher_h, logits_fn, scale, chunk)

    assert loss == pytest.approx(full.item(), rel=1e-12) and loss > 0
    torch.testing.assert_close(grad, full_h.grad, rtol=1e-10, atol=1e-12)
    for p, w in zip(params, want, strict=True):
        torch.testing.assert_close(p.grad, w, rtol=1e-10, atol=1e-12)
    for p in params:
        p.grad = None
    same, grad = distill_loss_backward(teacher_h, teacher_h, logits_fn, scale, chunk)  # the teacher itself
    assert abs(same) < 1e-12 and grad.abs().max() < 1e-12


def test_chunks_follow_the_logit_budget():
    assert chunk_tokens_for(49152) == 682 and chunk_tokens_for(128256) == 261
    assert chunk_tokens_for(10**9) == 1
