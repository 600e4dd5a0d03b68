"""Each kernel of retro_lit.kernels against the plain PyTorch expression it replaces: values and gradients, in
float32 and under bf16 autocast, on small CPU tensors."""
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from retro_lit.kernels import add_to_float32, can_compile, gelu_linear, linear_cross_entropy, short_attention

# tolerances: float32 kernels agree to rounding; under bf16 both sides round their matmul inputs the same way,
# so only the order of float32 accumulation differs
FP32 = dict(rtol=1e-5, atol=1e-6)
BF16 = dict(rtol=2e-2, atol=2e-3)


def leaves(*shapes, dtype=torch.float32):
    return [torch.randn(*s, dtype=dtype, requires_grad=True) for s in shapes]


def value_and_grads(fn, *inputs):
    """fn(*inputs) and the gradients of a fixed random projection of it w.r.t. each input."""
    out = fn(*inputs)
    g = torch.Generator().manual_seed(1)
    weights = torch.randn(out.shape, generator=g).to(out.dtype)
    grads = torch.autograd.grad((out * weights).float().sum(), inputs)
    return out.detach(), grads


def assert_same(got, want, tol):
    (out, grads), (ref_out, ref_grads) = got, want
    assert out.dtype == ref_out.dtype
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype
        torch.testing.assert_close(g.float(), r.float(), **tol)


# ----------------------------------------------------------------------------- gelu_linear

@pytest.mark.parametrize("precision", ["fp32", "bf16 autocast", "bf16 weights"])
def test_gelu_linear_matches_linear_of_gelu(precision):
    dtype = torch.bfloat16 if precision == "bf16 weights" else torch.float32
    w, b = leaves((8, 24), (8,), dtype=dtype)  # (D, d_ff), (D,)
    # h (B, T, d_ff) is the up-projection's output: bf16 under autocast
    h, = leaves((2, 5, 24), dtype=torch.float32 if precision == "fp32" else torch.bfloat16)

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16 autocast"):
            return value_and_grads(fn, h, w, b)

    reference = run(lambda h, w, b: F.linear(F.gelu(h), w, b))
    assert_same(run(gelu_linear), reference, FP32 if precision == "fp32" else BF16)


# ----------------------------------------------------------------------------- linear_cross_entropy

@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("slice_rows", [256, 8])  # one slice; several, the last one short (37 = 4 * 8 + 5)
def test_linear_cross_entropy_matches_cross_entropy_of_the_logits(autocast, slice_rows):
    N, D, V = 37, 16, 50
    x, w = leaves((N, D), (V, D))
    targets = torch.randint(0, V, (N,))
    targets[::5] = -100  # ignored rows: no loss, no gradient, nll 0

    def reference(x, w):
        logits = x @ w.T  # (N, V), in bf16 under autocast
        nll = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="none")
        return torch.cat([F.cross_entropy(logits.float(), targets, ignore_index=-100)[None], nll])

    def fused(x, w):
        loss, nll = linear_cross_entropy(x, w, targets, slice_rows=slice_rows)
        return torch.cat([loss[None], nll])

    def run(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = fn(x, w)
        return out.detach(), torch.autograd.grad(out[0], (x, w))  # the nll carries no gradient

    got, want = run(fused), run(reference)
    assert_same(got, want, BF16 if autocast else FP32)
    assert (got[0][1:][targets == -100] == 0).all()


def test_linear_cross_entropy_with_every_target_ignored_is_zero():
    x, w = leaves((6, 16), (50, 16))
    loss, nll = linear_cross_entropy(x, w, torch.full((6,), -100))
    loss.backward()
    assert loss.item() == 0 and (nll == 0).all()
    assert (x.grad == 0).all() and (w.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_add_to_float32_equals_adding_the_float_tensor(dtype):
    total, x = torch.randn(10, 6), torch.randn(10, 6).to(dtype)
    expected = total + x.float()
    add_to_float32(total, x, rows=3)  # blocks of 3, 3, 3 and 1 rows
    assert torch.equal(total, expected)


# ----------------------------------------------------------------------------- short_attention

def attention_inputs(dtype=torch.float32):
    q, k, v = leaves((3, 2, 8, 16), (3, 2, 20, 16), (3, 2, 20, 16), dtype=dtype)  # (N, H, S, Dh), K*R = 20 keys
    mask = torch.rand(3, 1, 1, 20) > 0.3
    mask[..., 0] = True  # no empty row (safe_key_mask's job in the model)
    return (q, k, v), mask


@pytest.mark.parametrize("precision", ["bf16 autocast", "bf16 tensors"])
def test_short_attention_under_bf16_is_sdpa_math(precision):
    """Bit for bit SDPA's math kernel with bf16 reductions allowed, and float32 math attention to bf16 rounding."""
    (q, k, v), mask = attention_inputs(torch.bfloat16 if precision == "bf16 tensors" else torch.float32)
    autocast = precision == "bf16 autocast"
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731

    def fast(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), short_attention(q):
            return sdpa(q, k, v)

    def math_bf16(q, k, v):
        allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), sdpa_kernel(SDPBackend.MATH):
                return sdpa(q, k, v)
        finally:
            torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)

    def math_fp32(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return sdpa(q.float(), k.float(), v.float()).to(torch.bfloat16)

    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    got = value_and_grads(fast, q, k, v)
    assert_same(got, value_and_grads(math_bf16, q, k, v), dict(rtol=0, atol=0))
    assert_same(got, value_and_grads(math_fp32, q, k, v), dict(rtol=2e-2, atol=1e-2))  # a bf16 ulp at 1 is 8e-3
    assert torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed() == allowed  # the global setting restored


def test_short_attention_changes_nothing_in_float32():
    (q, k, v), mask = attention_inputs()
    sdpa = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731

    def inside(q, k, v):
        with short_attention(q):
            return sdpa(q, k, v)

    got, want = value_and_grads(inside, q, k, v), value_and_grads(sdpa, q, k, v)
    assert torch.equal(got[0], want[0]) and all(torch.equal(g, r) for g, r in zip(got[1], want[1]))


def test_short_attention_restores_the_setting_after_an_error():
    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
    with pytest.raises(RuntimeError, match="inside"):
        with short_attention(torch.zeros(1, dtype=torch.bfloat16)):
            assert torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()
            raise RuntimeError("inside")
    assert torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed() == allowed


def test_can_compile_needs_cuda_or_a_cpp_compiler(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert not can_compile()
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name == "clang++" else None)
    assert can_compile()
