"""The step's products on oneDNN (`sct_edge/model/products.py`) equal torch's, forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch.profiler import profile

from sct_edge.model import products
from sct_edge.model.products import accumulate_linear, linear, product, torch_products, transposed_product


def ops_called(fn) -> set[str]:
    with profile() as prof:
        fn()
    return {event.key for event in prof.key_averages()}


def test_linear_is_x_times_w_transposed_for_any_layout_of_w(products_route):
    g = torch.Generator().manual_seed(0)
    x, w, add = torch.randn(37, 19, generator=g), torch.randn(23, 19, generator=g), torch.randn(37, 23, generator=g)
    expected = x.double() @ w.double().T
    for weight in (w, w.T.contiguous().T, torch.randn(23, 40, generator=g)[:, 3:22]):  # row-major, column-major, sliced
        expected = x.double() @ weight.double().T
        torch.testing.assert_close(linear(x, weight).double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x, weight, add=add).double(), expected + add.double(), rtol=1e-5, atol=1e-5)
    x_cols = torch.randn(19, 37, generator=g).T  # a left operand that is not row-major gets copied, not refused
    torch.testing.assert_close(linear(x_cols, w).double(), x_cols.double() @ w.double().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("m, n, k", [(64, 5, 40), (64, 40, 5)])  # copies a (the smaller) or b
def test_transposed_product_is_a_transposed_times_b(products_route, m, n, k):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(m, n, generator=g), torch.randn(m, k, generator=g)
    expected = a.double().T @ b.double()
    torch.testing.assert_close(transposed_product(a, b).double(), expected, rtol=1e-5, atol=1e-5)
    b_t = b.T.contiguous()
    torch.testing.assert_close(transposed_product(a, b, b_t).double(), expected, rtol=1e-5, atol=1e-5)


def test_routed_products_run_on_onednn_and_the_rest_on_torch(monkeypatch):
    if not products.onednn_available():
        pytest.skip("torch's oneDNN has no AVX-512 kernels here")
    products.use_onednn(True)
    big = torch.randn(128, 128), torch.randn(128, 128)
    assert "mkldnn::_linear_pointwise" in ops_called(lambda: linear(*big))
    assert "mkldnn::_linear_pointwise" not in ops_called(lambda: linear(torch.randn(8, 8), torch.randn(8, 8)))
    assert "mkldnn::_linear_pointwise" not in ops_called(lambda: linear(*(t.double() for t in big)))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's dtype decides, as for any torch product
        assert product(*big).dtype == torch.bfloat16
    with torch_products():
        assert not products.uses_onednn()
        assert "mkldnn::_linear_pointwise" not in ops_called(lambda: linear(*big))
    assert products.uses_onednn()


def test_product_gradients_equal_autograd_of_the_plain_expression(products_route):
    """x wᵀ + add on a 3-D x, with w a factor's transposed view (x U is product(x, U.T)) or row-major."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 11, 17, generator=g)
    for w_source in (torch.randn(17, 13, generator=g), torch.randn(13, 17, generator=g)):
        add = torch.randn(3, 11, 13, generator=g)
        leaves = [t.clone().requires_grad_() for t in (x, w_source, add)]
        refs = [t.double().clone().requires_grad_() for t in (x, w_source, add)]
        weight = leaves[1].T if w_source.shape[0] == 17 else leaves[1]
        ref_weight = refs[1].T if w_source.shape[0] == 17 else refs[1]
        out = product(leaves[0], weight, leaves[2])
        expected = refs[2] + refs[0] @ ref_weight.T
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
        grad = torch.randn(out.shape, generator=g)
        out.backward(grad)
        expected.backward(grad.double())
        for leaf, ref in zip(leaves, refs, strict=True):
            assert leaf.grad.stride() == leaf.stride()  # in the parameter's own layout: autograd copies nothing
            torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)


def test_accumulate_linear_sums_into_acc_in_place(products_route):
    g = torch.Generator().manual_seed(4)
    acc, x, w = torch.randn(64, 48, generator=g), torch.randn(64, 40, generator=g), torch.randn(48, 40, generator=g)
    expected = acc.double() + x.double() @ w.double().T
    assert accumulate_linear(acc, x, w) is acc
    torch.testing.assert_close(acc.double(), expected, rtol=1e-5, atol=1e-5)


def test_a_row_major_weight_summed_over_several_backward_passes_keeps_its_layout(products_route):
    """The loss's chunks: one head weight, one backward a chunk, the gradients summed into .grad."""
    g = torch.Generator().manual_seed(5)
    # vocabulary × rank, large enough for oneDNN: its gradient comes back as a transposed view
    w = torch.randn(2048, 16, generator=g).requires_grad_()
    ref = w.detach().double().requires_grad_()
    for _ in range(3):
        x, grad = torch.randn(64, 16, generator=g), torch.randn(64, 2048, generator=g)
        product(x, w).backward(grad)
        (x.double() @ ref.T).backward(grad.double())
    assert w.grad.stride() == w.stride()
    torch.testing.assert_close(w.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)


def test_product_function_passes_gradcheck_in_float64():
    g = torch.Generator().manual_seed(3)
    x, w, add = (torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True)
                 for s in ((5, 4), (3, 4), (5, 3)))
    w_t = torch.randn(4, 3, dtype=torch.float64, generator=g, requires_grad=True)  # w as a transposed view
    assert torch.autograd.gradcheck(lambda x, w, add: products._Product.apply(x, w, add), (x, w, add))
    assert torch.autograd.gradcheck(lambda x, w_t: products._Product.apply(x, w_t.T, None), (x, w_t))
