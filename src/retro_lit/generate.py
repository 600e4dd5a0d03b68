"""Sampling from a RETRO model with live retrieval (paper §2.4): every time a chunk of M tokens completes,
its neighbours are looked up, encoded once (the model's cache keeps them), and decoding goes on.

Model level (no files): `generate(model, prompt_ids, retrieve, ...)`, where `retrieve(chunk (B, M)) ->
neighbours (B, K, R)` is any callable. Workspace level: `IndexRetriever` builds `retrieve` from a
`RetroIndex` (embed the chunk text, search faiss, read neighbour + continuation tokens) and remembers
the last lookup for `--show_retrieval`. The command: `retro-lit generate` (`generate_text`).

When `retrieve` is called: the neighbours of chunk u are first read at position (u+1)*M - 1, the chunk's
last token. So `retrieve` runs for chunk u right before that token is fed to the model: in the prefill for
every complete chunk of the prompt, then as soon as a sampled token completes a chunk. A chunk completed
by the very last sampled token is not looked up, since no later prediction reads it.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from retro_lit.checkpoint import load_checkpoint, precision_context
from retro_lit.embedder import resolve_device
from retro_lit.index import RetroIndex
from retro_lit.tokenizer import workspace_tokenizer
from retro_lit.verify import checked_workspace
from retro_lit.workspace import RetroError

log = logging.getLogger(__name__)

Retrieve = Callable[[Tensor], Tensor]  # chunk tokens (B, M) -> neighbour tokens (B, K, R), -1 = none
OnRetrieval = Callable[[int, Tensor, Tensor], None]  # (chunk index u, chunk (B, M), neighbours (B, K, R))


# ----------------------------------------------------------------------------- sampling

def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """Next token ids (B,) from logits (B, V): greedy when temperature <= 0, else softmax(logits / temperature)
    restricted to the top_k most likely tokens and to the smallest set whose probability reaches top_p."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature  # (B, V)
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) >= top_p  # mass before this token already >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)  # (B,)


# ----------------------------------------------------------------------------- model-level generation

class ChunkNeighbors:
    """The neighbours retrieved so far, one (B, K, R) tensor per completed chunk, fetched once each."""

    def __init__(self, retrieve: Retrieve | None, chunk_len: int, on_retrieval: OnRetrieval | None = None):
        self.retrieve, self.chunk_len, self.on_retrieval = retrieve, chunk_len, on_retrieval
        self.chunks: list[Tensor] = []

    def update(self, tokens: Tensor) -> Tensor | None:
        """Retrieve for the chunks of tokens (B, T) completed since the last call -> (B, n, K, R) or None."""
        if self.retrieve is None:
            return None
        M, first = self.chunk_len, len(self.chunks)
        for u in range(first, tokens.shape[1] // M):
            chunk = tokens[:, u * M:(u + 1) * M]  # (B, M)
            found = torch.as_tensor(self.retrieve(chunk), dtype=torch.long).to(tokens.device)  # (B, K, R)
            if found.dim() != 3 or found.shape[0] != tokens.shape[0]:
                raise ValueError(f"retrieve must return (B, K, R) neighbour tokens, got shape {tuple(found.shape)}")
            if found.shape[2] != 2 * M:
                raise ValueError(f"retrieve must return neighbours of expected R = 2M = {2 * M} tokens (chunk + "
                                 f"continuation), got R = {found.shape[2]}")
            if self.on_retrieval is not None:
                self.on_retrieval(u, chunk, found)
            self.chunks.append(found)
        return torch.stack(self.chunks[first:], dim=1) if len(self.chunks) > first else None  # (B, n, K, R)

    def all(self) -> Tensor | None:
        return torch.stack(self.chunks, dim=1) if self.chunks else None  # (B, L, K, R)


def new_cache_or_none(model: nn.Module, batch_size: int, max_len: int):
    """model.new_cache(...) (float32: one-token attention over a long prefix is fastest in float32 on CPUs,
    even under bf16 autocast), or None for models without a KV cache (generation then recomputes)."""
    try:
        return model.new_cache(batch_size, max_len)
    except (NotImplementedError, AttributeError):
        log.info("%s has no KV cache: generation recomputes the whole prefix at every token", type(model).__name__)
        return None


@torch.inference_mode()
def generate(model: nn.Module, prompt_ids: Tensor, retrieve: Retrieve | None = None, max_new_tokens: int = 64,
             temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             use_cache: bool = True, on_retrieval: OnRetrieval | None = None, progress: bool = False) -> Tensor:
    """Sample `max_new_tokens` after `prompt_ids` (T0,) or (B, T0) -> tokens (B, T0 + max_new_tokens).

    retrieve: chunk (B, M) -> neighbours (B, K, R) (-1 = no token), called once per completed chunk, live;
        None generates with retrieval OFF.
    temperature <= 0 is greedy; top_k / top_p restrict sampling; seed makes sampling reproducible.
    use_cache: KV cache for self-attention and cached encoded neighbours; a model whose `new_cache` or cached
        forward raises NotImplementedError (e.g. RETRO-fit) falls back to recomputing the prefix.
    on_retrieval(u, chunk, neighbours) is called after each lookup. progress: a tqdm bar with ETA.
    """
    device = next(model.parameters()).device
    tokens = (prompt_ids[None] if prompt_ids.dim() == 1 else prompt_ids).to(device=device, dtype=torch.long)  # (B, T0)
    if tokens.shape[1] == 0:
        raise ValueError("generate needs a prompt of at least one token")
    B, T0 = tokens.shape
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
    neighbors = ChunkNeighbors(retrieve, model.chunk_len, on_retrieval)
    cache = new_cache_or_none(model, B, T0 + max_new_tokens) if use_cache else None
    new = tokens  # the tokens the model has not seen yet: the prompt, then one token at a time
    for _ in tqdm(range(max_new_tokens), desc="generate", unit="tok", disable=not progress, leave=False):
        completed = neighbors.update(tokens)  # (B, n, K, R) for chunks completed by `new`, or None
        logits = None
        if cache is not None:
            try:
                logits = model(new, completed, cache=cache)[:, -1]  # (B, V)
            except NotImplementedError:
                log.info("%s does not decode with a cache: recomputing the prefix", type(model).__name__)
                cache = None
        if logits is None:
            logits = model(tokens, neighbors.all())[:, -1]  # (B, V), the whole prefix again
        new = sample_next(logits, temperature, top_k, top_p, generator)[:, None]  # (B, 1)
        tokens = torch.cat([tokens, new], dim=1)  # (B, T + 1)
    return tokens


# ----------------------------------------------------------------------------- workspace level

class IndexRetriever:
    """`retrieve` for `generate` from a `RetroIndex`: embed each chunk's text, search faiss for k neighbours
    (skipping `exclude_docs`), return their [neighbour, continuation] tokens (B, K, R). `last` holds the
    last lookup (`retro_lit.index.Retrieved`: ids, distances, tokens, doc ids, doc names and sources)."""

    def __init__(self, index, k: int, exclude_docs: list[int] | None = None):
        self.index, self.k, self.exclude_docs = index, k, exclude_docs
        self.last = None

    def __call__(self, chunk: Tensor) -> Tensor:
        self.last = self.index.search(chunk.detach().cpu(), k=self.k, exclude_docs=self.exclude_docs)
        return torch.as_tensor(self.last.tokens, dtype=torch.long)  # (B, K, R)


def format_retrieval(u: int, chunk: Tensor, found, tokenizer, chunk_len: int) -> str:
    """Readable report of one lookup: the query chunk, then each neighbour's distance, document (and the addition
    it came with, for a document added after the build), chunk id and text."""
    def text(ids) -> str:
        return repr(tokenizer.decode([int(t) for t in ids if t >= 0]))

    lines = []
    for b in range(chunk.shape[0]):
        where = f"chunk {u} (tokens {u * chunk_len}-{(u + 1) * chunk_len - 1})" + (f", sample {b}" if chunk.shape[0] > 1 else "")
        lines.append(f"[retrieval] {where}: {text(chunk[b].tolist())}")
        for j in range(found.ids.shape[1]):
            if found.ids[b, j] < 0:
                lines.append(f"  {j + 1}. (none)")
                continue
            neighbor, continuation = found.tokens[b, j, :chunk_len], found.tokens[b, j, chunk_len:]
            source = found.doc_sources[b][j]  # "train", or the addition that brought the document
            lines.append(f"  {j + 1}. distance {found.distances[b, j]:.4f}  doc {found.doc_ids[b, j]} "
                         f"{found.doc_names[b][j]!r}{'' if source == 'train' else f' (added: {source})'}  "
                         f"chunk {found.ids[b, j]}")
            lines.append(f"     neighbor:     {text(neighbor)}")
            lines.append(f"     continuation: {text(continuation)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the command

def generate_text(
    ckpt_path: str,
    workspace: str,
    prompt: str,
    max_new_tokens: int = 128,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    neighbors: int | None = None,
    show_retrieval: bool = False,
    retrieval: bool = True,
    quiet: bool = False,
    cache: bool = True,
    device: str = "auto",
    precision: str = "32",
) -> None:
    """Sample text from a RETRO checkpoint with live retrieval; prints the prompt and its continuation.

    Args:
        ckpt_path: RetroLM checkpoint (.ckpt).
        workspace: built workspace: tokenizer, chunk database and faiss index.
        prompt: prompt text, or @file to read it from a file.
        max_new_tokens: tokens to sample.
        temperature: softmax temperature; 0 is greedy.
        top_k: sample among the k most likely tokens.
        top_p: nucleus sampling mass.
        seed: sampling seed.
        neighbors: neighbours per chunk (default: the training K, else 2).
        show_retrieval: print every lookup: query chunk, neighbours, distances, source documents.
        retrieval: live retrieval; --no_retrieval generates with retrieval OFF.
        quiet: no progress bar.
        cache: KV cache and cached neighbour encodings; --no_cache recomputes the whole prefix at every token (slow;
            for checks).
        device: auto, cpu or cuda[:i].
        precision: 32 or bf16 (autocast).
    """
    if max_new_tokens < 0 or (neighbors is not None and neighbors <= 0):
        raise RetroError("--max_new_tokens must be >= 0 and --neighbors > 0")
    torch_device = resolve_device(device)
    model, data_hparams = load_checkpoint(ckpt_path, torch_device)
    ws = checked_workspace(workspace)
    if ws.chunk_len != model.chunk_len:
        raise RetroError(f"the checkpoint has chunk_len {model.chunk_len}, workspace {workspace} has {ws.chunk_len}")
    if prompt.startswith("@"):
        if not Path(prompt[1:]).is_file():
            raise RetroError(f"--prompt {prompt}: no such file")
        prompt = Path(prompt[1:]).read_text(encoding="utf-8")
    lm_tokenizer = workspace_tokenizer(ws)
    prompt_ids = torch.tensor(lm_tokenizer.encode(prompt), dtype=torch.long)
    if len(prompt_ids) == 0:
        raise RetroError("--prompt is empty after tokenization")
    retriever = None
    if retrieval:
        k = neighbors or int(data_hparams.get("num_neighbors", 2))
        retriever = IndexRetriever(RetroIndex(ws.root, ws.chunk_len, device=str(torch_device)), k)

    def print_lookup(u: int, chunk: Tensor, found: Tensor) -> None:
        print(format_retrieval(u, chunk, retriever.last, lm_tokenizer, ws.chunk_len), flush=True)

    on_retrieval = print_lookup if retriever is not None and show_retrieval else None
    with precision_context(precision, torch_device):
        tokens = generate(model, prompt_ids, retriever, max_new_tokens, temperature, top_k, top_p, seed,
                          use_cache=cache, on_retrieval=on_retrieval,
                          progress=not quiet and not show_retrieval and sys.stderr.isatty())
    print(lm_tokenizer.decode(tokens[0].tolist()))
