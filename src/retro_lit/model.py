"""The RETRO model: a decoder with chunked cross-attention (CCA) to encoded retrieved neighbours.

Borgeaud et al. 2022, "Improving language models by retrieving from trillions of tokens",
arXiv 2112.04426, §2.4-2.5 and Appendix B (Algorithm 1). Torch only; nothing here knows about
Lightning, faiss or files. This file is the architecture; the kernels it calls to run it faster or in less
memory (the fused GELU-linear and linear cross-entropy, bf16 attention routing) are in `retro_lit.kernels`,
each equal to the plain PyTorch expression it replaces.

Dimension legend (shared by every file of retro_lit):
    B  batch                       T  sequence length (n)
    M  chunk length (m)            L  chunks in a sequence (l = T // M)
    K  neighbours per chunk (k)    R  retrieved tokens per neighbour (r = 2M: chunk + continuation)
    D  decoder width               E  encoder width
    H  heads                       Dh head width (d_k)
Neighbour tensors are token ids of shape (B, L, K, R), with -1 wherever there is no token
(a missing neighbour, a missing continuation, padding after a document's end).

Paper facts honoured here (Algorithm 1):
    for each decoder layer p:  H <- ATTN(H)
                               if p is the first CCA layer: E <- ENCODER(neighbours, H)
                               if p is a CCA layer:         H <- CCA(H, E)
                               H <- FFW(H)
  * CCA causality: the neighbours of chunk u are attended by the last token of chunk u and the first
    M-1 tokens of chunk u+1; the first M-1 tokens of the sequence attend to nothing.
  * CCA attends jointly over the K neighbours x R tokens of its chunk.
  * Relative positions in CCA: rotary embeddings (RoPE) with the attending token at position M-1+i
    (i = its index in the attending chunk) and neighbour token j at position j. The neighbour chunk
    then lines up with chunk u and its continuation with chunk u+1, so q.k depends only on the offset
    (M-1+i) - j, the paper's d(i, i') up to a constant. Applied once, to q and k (lucidrains applies
    the offset twice).
  * The encoder is bidirectional, shared over all neighbours and chunks, and cross-attends to the
    decoder states of its own chunk (same RoPE alignment: neighbour token j vs chunk token j).

`ca_layers` are 0-based layer indices, as in labml.ai's implementation: the paper's "CCA every 3rd
layer from layer 6" in a 12-layer model is ca_layers={5, 8, 11}.

Departures from the paper (README, "Departures from the paper"); the paper-exact setting is each default:
  * `cca_init="induction"` (default "normal"): the first CCA layer starts as an induction head over the
    neighbours, with smeared keys (`ChunkedCrossAttention(key_smear=True)`), and the encoder and the decoder
    blocks up to it start as the identity (`induction_init`): a copying path at step 0.
  * `cca_sink=True` (default False): a null key per CCA head, learned logit and zero value, so that a token no
    neighbour fits reads nothing.
  * `tie_embeddings=True` (default False): needed by the induction init.
  * Rotary positions in CCA and the encoder (always), for the paper's relative positions (above).
  The data's departures (random neighbours, the copy warm-up) are `RetroDataModule`'s.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from retro_lit.kernels import can_compile, gelu_linear, linear_cross_entropy, short_attention


@dataclass(kw_only=True)
class EncoderConfig:
    """The neighbour encoder, and the norm, init and rotary settings of the layers trained from scratch: the fields
    that `RetroConfig` and `RetroFitConfig` (retrofit.py) share. Their subclasses keep them flat, so the keys stay
    `model.config.enc_n_layer` and `model.retrofit.enc_n_layer`. Keyword-only: each subclass's own fields then
    come first in its signature, hence in --help and --print_config."""

    flag_prefix: ClassVar[str]  # where the CLI puts the fields (`model.config`): errors name the flag

    enc_n_layer: int = 2
    """Neighbour-encoder layers."""
    enc_cross_layers: tuple[int, ...] = (0,)
    """0-based encoder layers that cross-attend to the decoder (or RETRO-fitted LM) states of their chunk."""
    enc_d_model: int | None = None
    """Encoder width E (default: the decoder's d_model, or the LM's width)."""
    enc_n_head: int | None = None
    """Encoder heads (default: the decoder's n_head, or the LM's)."""
    enc_head_dim: int | None = None
    """Encoder head width (default: the decoder's head_dim, or the LM's)."""
    enc_d_ff: int | None = None
    """Encoder feed-forward width (default: the decoder's d_ff; 4 * E when RETRO-fitting)."""
    recompute_encoder: bool = True
    """Recompute encoder activations in the backward (K*R/M = 4x the decoder's tokens at k=2): about
    15% more compute for a large cut in training memory."""
    norm_eps: float = 1e-5
    """RMSNorm epsilon (RETRO-fit: of the new layers)."""
    init_std: float = 0.02
    """Std of the normal init; residual projections get std / sqrt(2 * n_layer) (GPT-2). RETRO-fit: of the new
    layers, with enc_n_layer, and the CCA output projections start at zero."""
    rope_base: float = 10000.0
    """Rotary embedding base (RETRO-fit: of the encoder and CCA)."""

    def __post_init__(self):
        self.enc_cross_layers = tuple(sorted(set(int(i) for i in self.enc_cross_layers)))
        if any(not 0 <= i < self.enc_n_layer for i in self.enc_cross_layers):
            raise ValueError(f"`{self.flag_prefix}.enc_cross_layers` {list(self.enc_cross_layers)} must lie in "
                             f"[0, enc_n_layer={self.enc_n_layer})")


@dataclass
class RetroConfig(EncoderConfig):
    """A RETRO model trained from scratch: the decoder's fields, then the encoder's (`EncoderConfig`)."""

    flag_prefix: ClassVar[str] = "model.config"

    vocab_size: int = 8192
    """Size of the LM vocabulary (linked from the data in the CLI)."""
    chunk_size: int = 64
    """Chunk length M: tokens per retrieval chunk (linked from the data in the CLI)."""
    d_model: int = 512
    """Decoder width D."""
    n_layer: int = 6
    """Decoder layers."""
    n_head: int = 8
    """Attention heads H (decoder and, by default, encoder)."""
    head_dim: int = 64
    """Head width Dh (d_k); n_head * head_dim need not equal d_model."""
    d_ff: int = 2048
    """Hidden width of the decoder's feed-forward layers."""
    cca_layers: tuple[int, ...] = (2, 5)
    """0-based decoder layers that hold chunked cross-attention; empty for a retrieval-free baseline."""
    dropout: float = 0.0
    """Dropout on residual branches and attention weights."""
    tie_embeddings: bool = False
    """Share the token embedding with the output head."""
    cca_init: Literal["normal", "induction"] = "normal"
    """How CCA starts. `induction`: the first CCA layer starts as an induction head over the neighbours (where
    neighbour token j-1 equals the current token, it votes for token j) and the layers in front of it as the
    identity, so copies pay from step 0 (`induction_init`; docs/retrieval.md). Needs tie_embeddings."""
    cca_sink: bool = False
    """Give every CCA head a null key with a learned logit and a zero value, so a token that none of its neighbours
    fits can read nothing (attention sinks, as in gpt-oss): retrieval then costs little where it has nothing to
    offer (docs/retrieval.md)."""

    def __post_init__(self):
        self.cca_layers = tuple(sorted(set(int(i) for i in self.cca_layers)))
        for name in ("vocab_size", "chunk_size", "d_model", "n_layer", "n_head", "head_dim", "d_ff"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`model.config.{name}` must be positive, got {getattr(self, name)}")
        if any(not 0 <= i < self.n_layer for i in self.cca_layers):
            raise ValueError(f"`model.config.cca_layers` {list(self.cca_layers)} must lie in [0, n_layer={self.n_layer})")
        if self.cca_layers and self.enc_n_layer <= 0:
            raise ValueError("`model.config.enc_n_layer` must be positive when cca_layers is not empty")
        super().__post_init__()
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`model.config.dropout` must be in [0, 1), got {self.dropout}")
        if self.cca_init not in ("normal", "induction"):
            raise ValueError(f"`model.config.cca_init` must be normal or induction, got {self.cca_init!r}")
        if self.cca_init == "induction" and not (self.cca_layers and self.tie_embeddings):
            raise ValueError("`model.config.cca_init: induction` needs cca_layers and tie_embeddings: true "
                             "(the tied head turns the copied token's embedding into a vote for it)")
        widths = (self.n_head * self.head_dim, self.enc_d_model or self.d_model)
        if self.cca_init == "induction" and widths != (self.d_model, self.d_model):
            raise ValueError(f"`model.config.cca_init: induction` starts CCA as identity maps, so it needs n_head * "
                             f"head_dim and enc_d_model equal to d_model ({self.d_model}); got {self.n_head} * "
                             f"{self.head_dim} = {widths[0]} and enc_d_model {widths[1]}: change them or use "
                             "cca_init: normal")


# ----------------------------------------------------------------------------- building blocks

def rope_cos_sin(positions: Tensor, head_dim: int, base: float) -> tuple[Tensor, Tensor]:
    """cos/sin tables for rotary embeddings at integer `positions` (...,) -> (..., Dh) each; dims i and
    i + Dh/2 share an angle (the "rotate half" layout of GPT-NeoX and Llama)."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq  # (..., Dh/2)
    angles = torch.cat((angles, angles), dim=-1)  # (..., Dh)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the pairs (x[i], x[i + Dh/2]) of x (..., S, Dh) by the angles of positions (S, Dh), in x's
    dtype: contiguous halves and no float32 round trip keep this elementwise work cheap under bf16."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention through SDPA. Queries come from x, keys and values from `context`
    (x itself for self-attention); both may carry rotary positions."""

    def __init__(self, d_model: int, n_head: int, head_dim: int, d_context: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = n_head, head_dim, dropout
        self.query = nn.Linear(d_model, n_head * head_dim, bias=False)
        self.key_value = nn.Linear(d_context or d_model, 2 * n_head * head_dim, bias=False)
        self.out = nn.Linear(n_head * head_dim, d_model, bias=False)

    def heads(self, x: Tensor) -> Tensor:
        return x.view(*x.shape[:-1], self.n_head, self.head_dim).transpose(-3, -2)  # (N, H, S, Dh)

    def project_kv(self, context: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
        k, v = self.key_value(context).chunk(2, dim=-1)
        k, v = self.heads(k), self.heads(v)  # (N, H, S, Dh)
        return (apply_rope(k, *rope) if rope else k), v

    def attend(self, x: Tensor, k: Tensor, v: Tensor, rope: tuple[Tensor, Tensor] | None,
               mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        q = self.heads(self.query(x))  # (N, H, S, Dh)
        q = apply_rope(q, *rope) if rope else q
        dtype = torch.promote_types(q.dtype, k.dtype)  # a float32 KV cache keeps decoding attention in float32
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)  # (no-ops outside decoding)
        mask = mask.to(dtype) if mask is not None and mask.is_floating_point() else mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(-3, -2).flatten(-2).type_as(x))  # (N, S, D)

    def forward(self, x: Tensor, context: Tensor | None = None, q_rope=None, k_rope=None,
                mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        k, v = self.project_kv(x if context is None else context, k_rope)
        return self.attend(x, k, v, q_rope, mask, is_causal)


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float):
        super().__init__()
        self.up, self.down, self.drop = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model), nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = self.up(x)  # (..., d_ff)
        return self.drop(gelu_linear(h, self.down.weight, self.down.bias))  # (..., D)


def safe_key_mask(valid: Tensor) -> tuple[Tensor, Tensor]:
    """Turn a key-validity mask (N, S) into an SDPA mask (N, 1, 1, S) that never leaves a row empty
    (an all-masked row makes SDPA return NaN); also return which rows had any valid key (N,)."""
    has_any = valid.any(-1)
    mask = valid | ~has_any[:, None]  # rows with no key attend to everything; their output is zeroed
    return mask[:, None, None, :], has_any


# ----------------------------------------------------------------------------- neighbour encoder

class EncoderLayer(nn.Module):
    def __init__(self, d_model: int, d_ff: int, n_head: int, head_dim: int, d_cond: int, cross: bool,
                 dropout: float, norm_eps: float):
        super().__init__()
        self.norm_attn = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = Attention(d_model, n_head, head_dim, dropout=dropout)
        self.norm_cross = nn.RMSNorm(d_model, eps=norm_eps) if cross else None
        self.cross = Attention(d_model, n_head, head_dim, d_context=d_cond, dropout=dropout) if cross else None
        self.norm_ff = nn.RMSNorm(d_model, eps=norm_eps)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, cond: Tensor, rope_r, rope_kr, rope_m, mask: Tensor | None) -> Tensor:
        """x (N, R, E) neighbours, cond (N/K, M, d_cond) the states of their chunks."""
        x = x + self.drop(self.attn(self.norm_attn(x), q_rope=rope_r, k_rope=rope_r, mask=mask))
        if self.cross is not None:  # the K neighbours of a chunk read the same states: one (K*R)-long query
            queries = self.norm_cross(x).view(len(cond), -1, x.shape[-1])  # (N/K, K*R, E)
            x = x + self.drop(self.cross(queries, cond, q_rope=rope_kr, k_rope=rope_m).view_as(x))
        return x + self.ff(self.norm_ff(x))


class NearestNeighborEncoder(nn.Module):
    """Bidirectional transformer over each retrieved neighbour [N, F] (R = 2M tokens), shared over
    neighbours and chunks, cross-attending to the decoder states of the chunk that retrieved it."""

    def __init__(self, chunk_len: int, n_layers: int, d_model: int, d_ff: int, n_heads: int, d_k: int,
                 ca_layers: set[int] | tuple[int, ...] = (0,), *, d_input: int | None = None,
                 d_cond: int | None = None, dropout: float = 0.0, norm_eps: float = 1e-5,
                 rope_base: float = 10000.0, recompute: bool = True):
        super().__init__()
        self.recompute, self.n_layers, self.d_ff, self.n_heads = recompute, n_layers, d_ff, n_heads
        self.ca_layers, self.dropout, self.norm_eps = tuple(sorted(ca_layers)), dropout, norm_eps
        if any(not 0 <= i < n_layers for i in ca_layers):
            raise ValueError(f"encoder ca_layers {sorted(ca_layers)} must lie in [0, n_layers={n_layers})")
        self.chunk_len, self.d_model, self.rope_base, self.head_dim = chunk_len, d_model, rope_base, d_k
        self.d_input = d_input or d_model
        # decoder token embeddings (width d_input) are shared; project them if widths differ.
        # The decoder states it cross-attends to have width d_cond (default d_input; RETRO-fit differs)
        self.proj_in = nn.Linear(self.d_input, d_model, bias=False) if self.d_input != d_model else nn.Identity()
        self.layers = nn.ModuleList(
            EncoderLayer(d_model, d_ff, n_heads, d_k, d_cond or self.d_input, i in set(ca_layers), dropout, norm_eps)
            for i in range(n_layers))
        self.norm_out = nn.RMSNorm(d_model, eps=norm_eps)

    def compile_layers(self) -> None:
        """`torch.compile` each layer in place (parameter names, hence checkpoints, are unchanged). The encoder
        sees K*R/M = 4x the decoder's tokens (k = 2); fusing its norms, rotary embeddings, casts and residual
        adds around the matmuls makes a bf16 CPU training step ~1.3x faster (benchmarks/train_step.py). fp32 on
        CPU gains nothing (matmul-bound). The decoder stays eager: compiled, its sublayers ran slower here,
        and its decoding cache has data-dependent shapes."""
        if not can_compile():
            raise ValueError("model.compile on CPU needs a C++ compiler (g++ or clang++, or $CXX); none was found")
        for layer in self.layers:
            layer.compile()

    def encode(self, neighbors: Tensor, h: Tensor, embed: nn.Module) -> tuple[Tensor, Tensor]:
        """neighbors (B, L, K, R) token ids (-1 = none), h (B, L*M, d_cond) the states of their chunks, embed the
        token embedding -> memory (B, L, K*R, E), valid (B, L, K*R)."""
        B, L, K, R = neighbors.shape
        if R != 2 * self.chunk_len:  # CCA's rotary positions put the continuation at M..2M-1
            raise ValueError(f"expected R = 2M = {2 * self.chunk_len} tokens per neighbour (chunk + continuation), "
                             f"got R = {R}")
        valid = neighbors >= 0  # (B, L, K, R)
        emb = embed(neighbors.clamp(min=0)).view(B * L * K, R, -1)  # (B*L*K, R, d_input)
        encoded = self(emb, valid.view(B * L * K, R), h.reshape(B * L, self.chunk_len, -1))  # (B*L*K, R, E)
        return encoded.view(B, L, K * R, -1), valid.view(B, L, K * R)

    def forward(self, neighbors: Tensor, valid: Tensor, cond: Tensor) -> Tensor:
        """neighbors: embedded neighbour tokens (N, R, d_input) with N = B*L*K, the K neighbours of a chunk
        consecutive; valid: (N, R) bool; cond: decoder states of each chunk (N/K, M, d_cond). Returns (N, R, E).
        The chunk's states are projected once for its K neighbours (not expanded K-fold)."""
        N, R, _ = neighbors.shape
        pos_r = torch.arange(R, device=neighbors.device)
        rope_r = rope_cos_sin(pos_r, self.head_dim, self.rope_base)  # neighbour token j at position j
        rope_kr = tuple(t.repeat(N // len(cond), 1) for t in rope_r)  # ... in each of the K neighbours
        rope_m = rope_cos_sin(pos_r[: cond.shape[1]], self.head_dim, self.rope_base)  # chunk token j at j
        mask = None if bool(valid.all()) else safe_key_mask(valid)[0]  # (N, 1, 1, R)
        x = self.proj_in(neighbors)  # (N, R, E)
        with short_attention(x):
            for layer in self.layers:
                if self.recompute and torch.is_grad_enabled():  # save only layer inputs; redo in backward
                    x = checkpoint(layer, x, cond, rope_r, rope_kr, rope_m, mask, use_reentrant=False,
                                   context_fn=lambda: (contextlib.nullcontext(), short_attention(x)))
                else:
                    x = layer(x, cond, rope_r, rope_kr, rope_m, mask)
        return self.norm_out(x)


# ----------------------------------------------------------------------------- chunked cross-attention

class ChunkedCrossAttention(nn.Module):
    """CCA: token p attends to the encoded neighbours of chunk u = (p + 1) // M - 1 (none if u < 0).
    key_smear: the key of neighbour token j mixes in token j-1's with a learned weight (a built-in previous-token
    head: the induction-head match "n_{j-1} == x_p, read n_j" becomes one attention step).
    sink: one more key per head, with a learned logit and a zero value, so a query that no neighbour fits can
    attend to nothing and add nothing (softmax's weights must otherwise land on some neighbour)."""

    def __init__(self, d_model: int, n_head: int, head_dim: int, chunk_len: int, d_memory: int,
                 dropout: float = 0.0, rope_base: float = 10000.0, key_smear: bool = False, sink: bool = False):
        super().__init__()
        self.chunk_len, self.head_dim, self.rope_base = chunk_len, head_dim, rope_base
        self.attn = Attention(d_model, n_head, head_dim, d_context=d_memory, dropout=dropout)
        self.key_smear = nn.Parameter(torch.zeros(1)) if key_smear else None  # weight sigmoid(.) on token j's key
        self.sink = nn.Parameter(torch.zeros(n_head)) if sink else None  # (H,) logit of the null key

    def project(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys/values of encoded neighbours (B, Lc, K*R, E) -> each (B, Lc, H, K*R, Dh); neighbour
        token j at rotary position j (R = 2M tokens per neighbour)."""
        R = 2 * self.chunk_len
        rope = rope_cos_sin(torch.arange(memory.shape[2], device=memory.device) % R, self.head_dim, self.rope_base)
        if self.key_smear is None:
            return self.attn.project_kv(memory, rope)
        k, v = self.attn.key_value(memory).chunk(2, dim=-1)  # (B, Lc, K*R, H*Dh)
        prev = F.pad(k.unflatten(2, (-1, R))[..., :-1, :], (0, 0, 1, 0)).flatten(2, 3)  # token j-1's key; 0 at j = 0
        a = torch.sigmoid(self.key_smear).to(k.dtype)
        return apply_rope(self.attn.heads(a * k + (1 - a) * prev), *rope), self.attn.heads(v)

    def with_sink(self, k: Tensor, v: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Append the null key: k, v (N, H, S, Dh) -> (N, H, S+1, Dh) with a zero key and value; the boolean mask
        (N, 1, 1, S) -> an additive one (N, H, 1, S+1) whose last column is the learned logit."""
        N, H = k.shape[0], k.shape[1]
        k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
        bias = torch.zeros(mask.shape, dtype=k.dtype, device=k.device).masked_fill_(~mask, float("-inf"))
        sink = self.sink.to(k.dtype).view(1, H, 1, 1).expand(N, H, 1, 1)
        return k, v, torch.cat([bias.expand(N, H, 1, -1), sink], dim=-1)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], valid: Tensor, start: int = 0, first_chunk: int = 0) -> Tensor:
        """x: (B, t, D) states at absolute positions start..start+t-1; kv: projected neighbours of
        chunks first_chunk..first_chunk+Lc-1, each (B, Lc, H, K*R, Dh); valid: (B, Lc, K*R) bool.
        Returns the CCA output (B, t, D), zero where a token has nothing to attend to."""
        B, t, D = x.shape
        M, Lc = self.chunk_len, valid.shape[1]
        first = max(start, M - 1)  # the first M-1 positions of the sequence attend to nothing
        if first >= start + t:
            return torch.zeros_like(x)
        # shift by M-1: position p is token (p + 1) % M of the attending chunk of chunk (p + 1) // M - 1
        lead, u0 = (first + 1) % M, (first + 1) // M - 1
        span = x[:, first - start:]  # (B, ta, D)
        ta = span.shape[1]
        n_blocks = math.ceil((lead + ta) / M)
        if n_blocks == 1:  # one attending chunk (e.g. one generated token): no padding needed
            queries, q_pos = span, torch.arange(lead, lead + ta, device=x.device)  # (B, ta, D)
        else:  # pad to whole attending chunks, then one batched attention over all of them
            tail = n_blocks * M - lead - ta
            queries = torch.cat([span.new_zeros(B, lead, D), span, span.new_zeros(B, tail, D)], dim=1)
            queries, q_pos = queries.view(B * n_blocks, M, D), torch.arange(M, device=x.device)  # (B*Lb, M, D)
        # the projected neighbours each attending chunk reads; chunks without memory read nothing
        chunk = torch.arange(u0, u0 + n_blocks, device=x.device) - first_chunk  # (Lb,)
        has_memory = (chunk >= 0) & (chunk < Lc)
        chunk = chunk.clamp(0, Lc - 1)
        k, v = (t_[:, chunk].flatten(0, 1) for t_ in kv)  # (B*Lb, H, K*R, Dh)
        mask, has_any = safe_key_mask((valid[:, chunk] & has_memory[None, :, None]).flatten(0, 1))  # (N, 1, 1, S)
        if self.sink is not None:
            k, v, mask = self.with_sink(k, v, mask)
        q_rope = rope_cos_sin(q_pos + M - 1, self.head_dim, self.rope_base)  # attending token i at M-1+i
        with short_attention(queries):
            out = self.attn.attend(queries, k, v, q_rope, mask=mask)  # (B*Lb, M or ta, D)
        out = out * has_any[:, None, None].to(out.dtype)
        out = out.reshape(B, -1, D)[:, lead: lead + ta] if n_blocks > 1 else out  # (B, ta, D)
        return torch.cat([x.new_zeros(B, first - start, D), out], dim=1)  # left-pad: (B, t, D)


# ----------------------------------------------------------------------------- decoder

@dataclass
class RetroCache:
    """Incremental-decoding state: self-attention keys/values, the decoder states that condition the
    encoder, the encoded neighbours of every chunk retrieved so far and their per-layer CCA projections."""
    keys: list[Tensor]  # per layer (B, H, T_max, Dh)
    values: list[Tensor]
    cond: Tensor  # (B, T_max, D) decoder states at the first CCA layer
    memory: list[Tensor] = field(default_factory=list)  # per chunk (B, 1, K*R, E)
    valid: list[Tensor] = field(default_factory=list)  # per chunk (B, 1, K*R)
    cca_kv: dict[int, list[tuple[Tensor, Tensor]]] = field(default_factory=dict)  # layer -> per chunk k, v
    length: int = 0


class DecoderBlock(nn.Module):
    """Pre-norm block: self-attention, then (in CCA layers) chunked cross-attention, then feed-forward."""

    def __init__(self, d_model: int, n_head: int, head_dim: int, d_ff: int, chunk_len: int, cca: bool,
                 d_memory: int, dropout: float, norm_eps: float, rope_base: float, key_smear: bool = False,
                 cca_sink: bool = False):
        super().__init__()
        self.norm_attn = nn.RMSNorm(d_model, eps=norm_eps)
        self.attn = Attention(d_model, n_head, head_dim, dropout=dropout)
        self.norm_cca = nn.RMSNorm(d_model, eps=norm_eps) if cca else None
        self.cca = ChunkedCrossAttention(d_model, n_head, head_dim, chunk_len, d_memory, dropout, rope_base,
                                         key_smear, cca_sink) if cca else None
        self.norm_ff = nn.RMSNorm(d_model, eps=norm_eps)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def self_attend(self, x: Tensor, rope, cache: RetroCache | None, layer: int) -> Tensor:
        h = self.norm_attn(x)
        if cache is None:
            return x + self.drop(self.attn(h, q_rope=rope, k_rope=rope, is_causal=True))
        k, v = self.attn.project_kv(h, rope)  # (B, H, t, Dh)
        start, t = cache.length, x.shape[1]
        cache.keys[layer][:, :, start:start + t] = k
        cache.values[layer][:, :, start:start + t] = v
        k, v = cache.keys[layer][:, :, :start + t], cache.values[layer][:, :, :start + t]  # (B, H, start+t, Dh)
        mask = None
        if start > 0 and t > 1:  # new token i (absolute start+i) sees keys 0..start+i
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
        return x + self.drop(self.attn.attend(h, k, v, rope, mask=mask, is_causal=start == 0 and t > 1))

    def cross_attend(self, x: Tensor, memory: tuple[Tensor, Tensor] | None, start: int,
                     cache: RetroCache | None, layer: int) -> Tensor:
        if cache is None:
            if memory is None:  # retrieval OFF: CCA is the identity
                return x
            encoded, valid = memory
            return x + self.drop(self.cca(self.norm_cca(x), self.cca.project(encoded), valid))
        projected = cache.cca_kv.setdefault(layer, [])
        projected.extend(self.cca.project(m) for m in cache.memory[len(projected):])  # new chunks only
        M, t = self.cca.chunk_len, x.shape[1]
        lo, hi = max((start + 1) // M - 1, 0), min((start + t) // M, len(projected))  # chunks attended
        if hi <= lo:
            return x
        k, v = (torch.cat(parts, dim=1) for parts in zip(*projected[lo:hi]))  # (B, hi-lo, H, K*R, Dh)
        valid = torch.cat(cache.valid[lo:hi], dim=1)  # (B, hi-lo, K*R)
        return x + self.drop(self.cca(self.norm_cca(x), (k, v), valid, start=start, first_chunk=lo))


# ----------------------------------------------------------------------------- init and optimizer groups

# the projections that write into the residual stream, by parameter name
RESIDUAL_PROJECTIONS = ("attn.out.weight", "cross.out.weight", "ff.down.weight")


def init_weights(module: nn.Module, std: float) -> None:
    """nanoGPT init of every Linear and Embedding in `module`: weights normal(0, std), biases zero."""
    def init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    module.apply(init)


def scale_residual_projections(module: nn.Module, std: float, n_layer: int) -> None:
    """GPT-2: re-draw the residual projections of `module` at std / sqrt(2 * n_layer), so that the residual
    stream's variance does not grow with depth."""
    for name, p in module.named_parameters():
        if name.endswith(RESIDUAL_PROJECTIONS):
            nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * n_layer))


def induction_init(model: RetroModel, scale: float = 1.7, out_scale: float = 0.05, sink: float = 10.0) -> None:
    """Start the first CCA layer as an induction head over the neighbours (`cca_init: induction`). Its query is the
    current token x_p (q = scale * I), the smeared key of neighbour token j is mostly token j-1 (weight
    sigmoid(-4) on token j), its value is token j (v = I), and the tied output head turns that value into a vote
    for n_j (out = out_scale * I): where n_{j-1} == x_p, CCA predicts x_{p+1} = n_j. For token identities to reach
    it unmixed, the encoder and the decoder blocks up to that layer start as the identity (zero residual
    projections). A match scores ~4 scale^2 after rotary, so scale = 1.7 makes it win over K*R = 64-128 keys.
    With `cca_sink`, the null key starts at logit `sink`: above the log-sum-exp of a query that matches nothing
    (~5-8 at init), below that of a match (~18-25), so queries without a match start reading nothing.
    Measured in docs/retrieval.md (Training levers, row K)."""
    first = model.ca_layers[0]
    in_front = ("encoder.", *(f"blocks.{i}." for i in range(first + 1)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(in_front) and name.endswith(RESIDUAL_PROJECTIONS) and ".cca." not in name:
                p.zero_()
        cca = model.blocks[first].cca
        half = cca.attn.key_value.weight.shape[0] // 2
        keys, values = cca.attn.key_value.weight[:half], cca.attn.key_value.weight[half:]
        for weight, value in ((cca.attn.query.weight, scale), (keys, scale), (values, 1.0), (cca.attn.out.weight, out_scale)):
            weight.copy_(value * torch.eye(*weight.shape))
        cca.key_smear.fill_(-4.0)
        if cca.sink is not None:
            cca.sink.fill_(sink)


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT grouping of the trainable parameters: matrices (p.dim() >= 2) decay; norms and biases do not."""
    params = {id(p): p for p in module.parameters() if p.requires_grad}.values()
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


class RetroModel(nn.Module):
    """RETRO decoder. Signature of the original retro_transformer quick-start; `ca_layers` 0-based."""

    def __init__(self, n_vocab: int, d_model: int, n_layers: int, chunk_len: int, n_heads: int, d_k: int,
                 d_ff: int, encoder: NearestNeighborEncoder | None, ca_layers: set[int] | tuple[int, ...] = (3, 5),
                 *, dropout: float = 0.0, tie_embeddings: bool = False, norm_eps: float = 1e-5,
                 init_std: float = 0.02, rope_base: float = 10000.0, cca_init: str = "normal", cca_sink: bool = False):
        super().__init__()
        self.ca_layers = tuple(sorted(ca_layers))
        if any(not 0 <= i < n_layers for i in self.ca_layers):
            raise ValueError(f"ca_layers {list(self.ca_layers)} must lie in [0, n_layers={n_layers})")
        if self.ca_layers and encoder is None:
            raise ValueError("a RetroModel with ca_layers needs a NearestNeighborEncoder")
        if self.ca_layers and encoder.d_input != d_model:
            raise ValueError(f"the encoder reads decoder states of width {encoder.d_input}, but d_model={d_model}")
        if self.ca_layers and encoder.chunk_len != chunk_len:
            raise ValueError(f"the encoder's chunk_len {encoder.chunk_len} differs from the model's {chunk_len}")
        self.chunk_len, self.d_model, self.head_dim, self.rope_base = chunk_len, d_model, d_k, rope_base
        self.token_emb = nn.Embedding(n_vocab, d_model)
        self.drop = nn.Dropout(dropout)
        d_memory = encoder.d_model if self.ca_layers else d_model
        self.blocks = nn.ModuleList(
            DecoderBlock(d_model, n_heads, d_k, d_ff, chunk_len, i in self.ca_layers, d_memory, dropout, norm_eps,
                         rope_base, key_smear=cca_init == "induction" and self.ca_layers[:1] == (i,), cca_sink=cca_sink)
            for i in range(n_layers))
        self.encoder = encoder if self.ca_layers else None
        self.norm_out = nn.RMSNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, n_vocab, bias=False)
        self.config = RetroConfig(  # the same model as a config: checkpoints and the Lightning stack use it
            vocab_size=n_vocab, chunk_size=chunk_len, d_model=d_model, n_layer=n_layers, n_head=n_heads,
            head_dim=d_k, d_ff=d_ff, cca_layers=self.ca_layers, dropout=dropout, tie_embeddings=tie_embeddings,
            norm_eps=norm_eps, init_std=init_std, rope_base=rope_base, cca_init=cca_init, cca_sink=cca_sink,
            **self._encoder_fields(encoder))
        init_weights(self, init_std)
        scale_residual_projections(self, init_std, n_layers)
        if tie_embeddings:
            self.lm_head.weight = self.token_emb.weight
        if cca_init == "induction":
            induction_init(self)

    @classmethod
    def from_config(cls, c: RetroConfig) -> RetroModel:
        encoder = NearestNeighborEncoder(
            c.chunk_size, c.enc_n_layer, c.enc_d_model or c.d_model, c.enc_d_ff or c.d_ff, c.enc_n_head or c.n_head,
            c.enc_head_dim or c.head_dim, c.enc_cross_layers, d_input=c.d_model, dropout=c.dropout,
            norm_eps=c.norm_eps, rope_base=c.rope_base, recompute=c.recompute_encoder) if c.cca_layers else None
        return cls(c.vocab_size, c.d_model, c.n_layer, c.chunk_size, c.n_head, c.head_dim, c.d_ff, encoder,
                   c.cca_layers, dropout=c.dropout, tie_embeddings=c.tie_embeddings, norm_eps=c.norm_eps,
                   init_std=c.init_std, rope_base=c.rope_base, cca_init=c.cca_init, cca_sink=c.cca_sink)

    def _encoder_fields(self, encoder: NearestNeighborEncoder | None) -> dict:
        if not self.ca_layers:
            return {}
        return dict(enc_n_layer=encoder.n_layers, enc_cross_layers=encoder.ca_layers, enc_d_model=encoder.d_model,
                    enc_n_head=encoder.n_heads, enc_head_dim=encoder.head_dim, enc_d_ff=encoder.d_ff,
                    recompute_encoder=encoder.recompute)

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, neighbors: Tensor | None = None, cache: RetroCache | None = None) -> Tensor:
        """input_ids (B, T) -> logits (B, T, V). neighbors (B, L, K, R) or None (retrieval OFF).
        With a cache, input_ids are the new tokens and neighbors those of the chunks they complete."""
        return self.lm_head(self.hidden_states(input_ids, neighbors, cache))  # (B, T, V)

    def loss(self, input_ids: Tensor, targets: Tensor, neighbors: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean next-token cross-entropy over targets != -100, and the per-token nll (B, T) without
        grad, computed without materialising the (B, T, V) logits (see `kernels.linear_cross_entropy`)."""
        h = self.hidden_states(input_ids, neighbors)  # (B, T, D)
        loss, nll = linear_cross_entropy(h.flatten(0, 1), self.lm_head.weight, targets.flatten())
        return loss, nll.view_as(targets)

    def hidden_states(self, input_ids: Tensor, neighbors: Tensor | None = None, cache: RetroCache | None = None) -> Tensor:
        """The final normalised decoder states (B, T, D), before the output head."""
        T = input_ids.shape[1]
        start = cache.length if cache is not None else 0
        rope = rope_cos_sin(torch.arange(start, start + T, device=input_ids.device), self.head_dim, self.rope_base)
        x = self.drop(self.token_emb(input_ids))  # (B, T, D)
        memory, encoded = None, False
        for i, block in enumerate(self.blocks):
            x = block.self_attend(x, rope, cache, i)
            if block.cca is not None:
                if not encoded:  # Algorithm 1: encode at the first CCA layer, after its self-attention
                    memory, encoded = self.encode_neighbors(x, neighbors, start, cache), True
                x = block.cross_attend(x, memory, start, cache, i)
            x = x + block.ff(block.norm_ff(x))
        if cache is not None:
            cache.length += T
        return self.norm_out(x)

    def encode_neighbors(self, h: Tensor, neighbors: Tensor | None, start: int,
                         cache: RetroCache | None) -> tuple[Tensor, Tensor] | None:
        """Encode the neighbours of the chunks that complete in this call, each conditioned on its
        chunk's decoder states h (B, t, D). Without a cache, returns (memory (B, L, K*R, E), valid
        (B, L, K*R)) or None; with one, appends them to cache.memory / cache.valid."""
        M, T = self.chunk_len, h.shape[1]
        if cache is not None:
            cache.cond[:, start:start + T] = h
            h = cache.cond[:, : start + T]
        first_new, n_done = start // M, (start + T) // M  # chunks first_new..n_done-1 complete now
        if neighbors is None or n_done == first_new:
            if cache is not None and cache.memory and n_done > len(cache.memory):
                raise ValueError("retrieval is on for this cache: pass the neighbors of every chunk that completes")
            return None
        n = n_done - first_new if cache is not None else min(n_done, neighbors.shape[1])
        if cache is not None and len(cache.memory) != first_new:
            raise ValueError("retrieval was off for earlier chunks of this cache; it cannot be switched on midway")
        if cache is not None and neighbors.shape[1] != n:
            raise ValueError(f"expected neighbors for the {n} chunk(s) completed by these tokens, got {neighbors.shape[1]}")
        memory, valid = self.run_encoder(neighbors[:, :n], h[:, first_new * M: (first_new + n) * M])
        if cache is None:
            return memory, valid
        cache.memory.extend(memory.split(1, dim=1))
        cache.valid.extend(valid.split(1, dim=1))
        return None

    def run_encoder(self, neighbors: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """neighbors (B, L, K, R) token ids, h (B, L*M, D) -> memory (B, L, K*R, E), valid (B, L, K*R)."""
        return self.encoder.encode(neighbors, h, self.token_emb)

    # -- utilities ----------------------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> RetroCache:
        """Preallocated cache for up to max_len tokens. The default float32 keeps one-token attention over
        a long prefix in float32, which on CPUs is several times faster than bf16 (a bf16 cache works)."""
        p = self.token_emb.weight
        attn = self.blocks[0].attn
        kv_shape = (batch_size, attn.n_head, max_len, attn.head_dim)
        dtype = dtype or p.dtype
        return RetroCache(keys=[p.new_zeros(kv_shape, dtype=dtype) for _ in self.blocks],
                          values=[p.new_zeros(kv_shape, dtype=dtype) for _ in self.blocks],
                          cond=p.new_zeros(batch_size, max_len, self.d_model, dtype=dtype))

    def param_groups(self, weight_decay: float) -> list[dict]:
        """nanoGPT grouping: matrices (p.dim() >= 2) decay; norms and biases do not."""
        return decay_groups(self, weight_decay)

    def num_params(self) -> dict[str, int]:
        """Parameter counts: embedding (+ head unless tied), decoder blocks, encoder, total."""
        count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
        embedding = self.token_emb.weight.numel()
        head = 0 if self.lm_head.weight is self.token_emb.weight else self.lm_head.weight.numel()
        encoder = count(self.encoder.parameters()) if self.encoder is not None else 0
        total = count({id(p): p for p in self.parameters()}.values())
        return {"embedding": embedding + head, "decoder": total - embedding - head - encoder,
                "encoder": encoder, "total": total}
