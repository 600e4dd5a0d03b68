"""Speed and memory kernels under the RETRO model (model.py, retrofit.py). Each one computes a plain PyTorch
expression, faster or in less memory, and is exact in the sense that it does that arithmetic, with no
approximation: at most the float rounding differs. `tests/test_kernels.py` holds each to its expression,
values and gradients, in float32 and bf16. Torch and the standard library only; nothing here knows RETRO.

gelu_linear(h, w, b) = F.linear(F.gelu(h), w, b), the second half of every feed-forward layer.
    For: the backward keeps only h and recomputes gelu(h), so the d_ff-wide GELU output is never stored, and
    unlike activation checkpointing no matmul is redone. Exact: the forward is that expression (in autocast's
    dtype), the backward the matmuls autograd would run and aten's own gelu_backward.
linear_cross_entropy(x, w, targets) = F.cross_entropy(x @ w.T, targets, ignore_index=-100), plus the per-row nll.
    For: the output head and loss without the (N, V) logits: rows go through one reused (slice, V) buffer,
    each slice's gradient (softmax - onehot) computed right in the forward. Exact: the logits come from the
    same matmul in the same dtype, softmax runs in float32, and log-sum-exp = top - log(max prob) is an
    identity (which, unlike log p[target], cannot underflow).
add_to_float32(total, x): total += x.float().
    For: a mixed-dtype add_ is ~5x slower on CPU; x is converted a block of rows at a time. Exact: widening
    bf16 to float32 loses nothing, so this is the same add.
short_attention(x): a context around the short attentions (encoder, CCA).
    For: under bf16 on CPU, SDPA's flash kernel is 2-4x slower at these key lengths than its math kernel kept in
    bf16; inside, F.scaled_dot_product_attention runs that math kernel. Elsewhere it does nothing. Exact: SDPA's
    own reference kernel, with scores held in bf16 instead of float32 (bf16 rounding, nothing else).
can_compile(): whether torch.compile's inductor can build kernels on this machine (for `model.compile`).
"""

from __future__ import annotations

import contextlib
import os
import shutil

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype autocast would compute x's matmuls in (x's own dtype outside autocast). The autograd functions
    below run with autocast off and cast explicitly to it."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


# ----------------------------------------------------------------------------- feed-forward

class GeluLinear(torch.autograd.Function):
    """linear(gelu(h), weight, bias) that keeps only h for the backward and recomputes gelu(h) there."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor, dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(h, weight, bias)
        ctx.dtype, ctx.h_dtype = dtype, h.dtype
        return F.linear(F.gelu(h.to(dtype)), weight.to(dtype), bias.to(dtype))

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        h, weight, bias = ctx.saved_tensors
        h, grad_out = h.to(ctx.dtype), grad_out.to(ctx.dtype)
        grad_gelu = grad_out @ weight.to(ctx.dtype)  # (..., d_ff)
        grad_w = grad_out.flatten(0, -2).T @ F.gelu(h).flatten(0, -2)  # (D, d_ff)
        grad_h = torch.ops.aten.gelu_backward(grad_gelu, h).to(ctx.h_dtype)
        return grad_h, grad_w.to(weight.dtype), grad_out.flatten(0, -2).sum(0).to(bias.dtype), None


def gelu_linear(h: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """h (..., d_ff), weight (D, d_ff), bias (D,) -> linear(gelu(h), weight, bias) (..., D), in autocast's dtype."""
    dtype = compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):
        return GeluLinear.apply(h, weight, bias, dtype)


# ----------------------------------------------------------------------------- attention

@contextlib.contextmanager
def short_attention(x: Tensor):
    """Run the short attentions (encoder: R keys, CCA: K*R keys) inside this. Under bf16 on CPU, SDPA's flash
    kernel is 2-4x slower there than its math kernel kept in bf16 (benchmarks/README.md): route SDPA to the
    math kernel and let it skip its float32 copies of q, k, v (a global torch setting, hence set and restored
    here, in eager code: torch.compile'd layers called inside bake it in). Scores and probabilities are then
    held in bf16, as in any bf16 model without a fused kernel; matmuls accumulate and softmax reduces in
    float32. Elsewhere (GPU, float32, float32 KV caches) this changes nothing."""
    if x.device.type != "cpu" or compute_dtype(x) != torch.bfloat16:
        yield
        return
    allowed = torch.backends.cuda.fp16_bf16_reduction_math_sdp_allowed()  # (the setting is not CUDA-only)
    torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(allowed)


def can_compile() -> bool:
    """Whether torch.compile's inductor can build kernels here: Triton on CUDA, or a C++ compiler on CPU
    (g++, clang++ or $CXX)."""
    compilers = [cxx for cxx in (os.environ.get("CXX"), "g++", "clang++") if cxx]
    return torch.cuda.is_available() or any(shutil.which(cxx) for cxx in compilers)


# ----------------------------------------------------------------------------- loss

def add_to_float32(total: Tensor, x: Tensor, rows: int = 2048) -> None:
    """total (float32) += x, converting x a block of rows at a time: a mixed-dtype add_ is ~5x slower here."""
    if x.dtype == total.dtype:
        total.add_(x)
        return
    block = total.new_empty(min(rows, len(x)), *x.shape[1:])
    for lo in range(0, len(x), rows):
        part = x[lo:lo + rows]
        total[lo:lo + rows].add_(block[:len(part)].copy_(part))


class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (x @ weight.T) against targets, without ever holding the (N, V) logits.

    Works through slices of rows; each slice's gradient w.r.t. x and weight is computed right in the
    forward (softmax - onehot), so the backward only scales them: no recomputation, and the memory of
    one (slice, V) block instead of several (N, V) tensors. Also returns the per-row nll (no grad)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, targets: Tensor, slice_rows: int, dtype: torch.dtype):
        N, V = x.shape[0], weight.shape[0]
        keep = targets != -100
        count = keep.sum().clamp(min=1)
        scale = (keep / count)[:, None]  # (N, 1) d mean-loss / d nll
        w = weight.to(dtype)
        grad_x, grad_w = torch.empty_like(x), torch.zeros_like(weight, dtype=torch.float32)
        nll = torch.empty(N, dtype=torch.float32, device=x.device)
        # (S, V) and (V, D) buffers reused by every slice, updated in place: each fresh (S, V) tensor would be
        # a large allocation, freshly paged in by the OS
        S = min(slice_rows, N)
        probs = x.new_empty(S, V, dtype=torch.float32)
        low = probs if dtype == torch.float32 else x.new_empty(S, V, dtype=dtype)  # probs in the matmul dtype
        grad_w_slice = torch.empty_like(w)  # (V, D)
        for lo in range(0, N, S):
            xs, ts, ss = x[lo:lo + S].to(dtype), targets[lo:lo + S].clamp(min=0), scale[lo:lo + S]
            n, rows = len(xs), torch.arange(len(xs), device=x.device)
            p = probs[:n]
            q = p if low is probs else low[:n]
            torch.mm(xs, w.T, out=q)  # logits (n, V)
            if q is not p:
                p.copy_(q)
            target_logit, top = p[rows, ts], p.amax(-1)
            torch.softmax(p, -1, out=p)  # in place; one fused pass, several times faster than exp_ + sum
            # log-sum-exp = top - log(max prob): exact, and the max prob (>= 1/V) cannot underflow as p[target] can
            nll[lo:lo + n] = (top - p.amax(-1).log() - target_logit) * (ss[:, 0] > 0)
            p[rows, ts] -= 1  # softmax - onehot = d nll / d logits; the scale goes on the (n, D) side below
            if q is not p:
                q.copy_(p)
            grad_x[lo:lo + n] = (q @ w) * ss
            torch.mm(q.T, (xs * ss).to(dtype), out=grad_w_slice)
            add_to_float32(grad_w, grad_w_slice)
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        ctx.mark_non_differentiable(nll)
        return nll.sum() / count, nll

    @staticmethod
    def backward(ctx, grad_loss: Tensor, grad_nll: Tensor):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None


def linear_cross_entropy(x: Tensor, weight: Tensor, targets: Tensor, slice_rows: int = 256) -> tuple[Tensor, Tensor]:
    """x (N, D), weight (V, D), targets (N,) with -100 = ignore -> (mean loss, per-row nll (N,))."""
    dtype = compute_dtype(x)
    with torch.autocast(x.device.type, enabled=False):
        return LinearCrossEntropy.apply(x, weight, targets, slice_rows, dtype)
