"""`retro-lit diagnose`: can retrieval pay in this workspace, and does this checkpoint use it? (docs/retrieval.md)

- **Copyable share**, per split, from the precomputed neighbours `neighbors/k{K}_t{T}`: of the sampled chunks u
  whose document goes on, the share whose K neighbours (all R tokens: neighbour chunk + continuation) hold a run
  of at least `min_run` tokens of chunk u+1, the tokens the model predicts while it attends to chunk u's
  neighbours. A document's last chunk has no chunk u+1 and is left out of this share (counted apart). Beside it,
  the share of all sampled chunks whose neighbours hold such a run of chunk u itself (r(C) >= min_run / M, the
  leakage measure of `retro_lit.evaluate`).
- **CCA update norm**, per CCA layer of a checkpoint: RMS of the CCA output (the update added to the residual
  stream) over RMS of the residual stream it is added to, over the tokens that have neighbours to attend to.
- **bpb** of the checkpoint on the same text with retrieval ON (the precomputed neighbours), with random train
  chunks (with continuations) in their place, and OFF, scored like `retro-lit evaluate` (sliding windows).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from retro_lit.checkpoint import load_checkpoint, precision_context
from retro_lit.corpus import iter_documents
from retro_lit.evaluate import (PrecomputedNeighbors, RandomNeighbors, Scorer, capped, choose_neighbors,
                                evaluate_documents, longest_common_substring, workspace_documents)
from retro_lit.embedder import resolve_device
from retro_lit.retrofit import RetroFitModel
from retro_lit.tokenizer import workspace_tokenizer
from retro_lit.verify import checked_workspace
from retro_lit.workspace import SPLIT_ALIASES, SPLITS, RetroError, Workspace

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- copyable share

def copyable_share(ws: Workspace, split: str, ids: np.ndarray, min_run: int = 8, max_chunks: int | None = 20000,
                   seed: int = 0) -> dict:
    """Copyable share of one split (module docstring) from its neighbour ids (n_chunks_of_split, K), -1 = none,
    over at most max_chunks chunks drawn without replacement (seeded; all of them when None)."""
    first, end = ws.split_range(split)
    n, M = end - first, ws.chunk_len
    rows = np.arange(n)
    if max_chunks is not None and n > max_chunks:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=max_chunks, replace=False))
    own = ws.neighbor_tokens(first + rows)  # (N, R): chunk u, then chunk u+1 of its document (-1s if none)
    found = ws.neighbor_tokens(np.asarray(ids[rows]))  # (N, K, R)
    goes_on = (own[:, M:] >= 0).any(1)  # (N,)
    next_run = longest_common_substring(own[goes_on, M:], found[goes_on])  # (N',)
    self_run = longest_common_substring(own[:, :M], found)  # (N,)
    return {"chunks": len(rows), "with_continuation": int(goes_on.sum()),
            "continuation_share": float((next_run >= min_run).mean()) if goes_on.any() else math.nan,
            "chunk_share": float((self_run >= min_run).mean()) if len(rows) else math.nan}


# ----------------------------------------------------------------------------- CCA update norms

def cca_sublayers(model: nn.Module) -> dict[int, tuple[nn.Module, nn.Module]]:
    """{decoder layer: (the RMSNorm that reads the residual stream, the ChunkedCrossAttention after it)}."""
    if isinstance(model, RetroFitModel):  # a retrieval branch after each CCA layer of the frozen LM
        return {int(i): (branch.norm, branch.cca) for i, branch in model.branches.items()}
    return {i: (block.norm_cca, block.cca) for i, block in enumerate(model.blocks) if block.cca is not None}


def attending_tokens(valid: Tensor, T: int, chunk_len: int) -> Tensor:
    """(B, T) bool: tokens p whose chunk u = (p + 1) // M - 1 >= 0 has a neighbour token (valid (B, Lc, K*R))."""
    has_any = valid.any(-1)  # (B, Lc)
    u = (torch.arange(T, device=valid.device) + 1) // chunk_len - 1  # (T,)
    inside = (u >= 0) & (u < has_any.shape[1])
    return has_any[:, u.clamp(0, has_any.shape[1] - 1)] & inside  # (B, T)


class CCANorms:
    """Forward hooks on every CCA sublayer inside a `with`: sums of squares of the CCA update and of the residual
    stream it is added to, over the tokens that have neighbours to attend to (full forwards, no KV cache).
    `ratios()`: per layer, RMS(update) / RMS(residual stream); nan for a layer that saw no such token."""

    def __init__(self, model: nn.Module):
        self.sublayers = cca_sublayers(model)
        self.update_sq = dict.fromkeys(self.sublayers, 0.0)
        self.residual_sq = dict.fromkeys(self.sublayers, 0.0)
        self._residual: dict[int, Tensor] = {}
        self._handles = []

    def __enter__(self) -> CCANorms:
        for layer, (norm, cca) in self.sublayers.items():
            self._handles.append(norm.register_forward_pre_hook(partial(self._keep_residual, layer)))
            self._handles.append(cca.register_forward_hook(partial(self._add_update, layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _keep_residual(self, layer: int, module: nn.Module, args: tuple) -> None:
        self._residual[layer] = args[0]  # (B, T, D), the norm's input

    def _add_update(self, layer: int, module: nn.Module, args: tuple, update: Tensor) -> None:
        mask = attending_tokens(args[2], update.shape[1], module.chunk_len)  # args: (x, kv, valid (B, Lc, K*R))
        residual = self._residual.pop(layer)  # (B, T, D)
        self.update_sq[layer] += float(update.detach()[mask].double().square().sum())
        self.residual_sq[layer] += float(residual.detach()[mask].double().square().sum())

    def ratios(self) -> dict[int, float]:
        # the same tokens and width D on both sides: the ratio of RMS norms is that of root sums of squares
        return {layer: math.sqrt(self.update_sq[layer] / self.residual_sq[layer])
                if self.residual_sq[layer] else math.nan for layer in self.sublayers}


def diagnose_checkpoint(model: nn.Module, ws: Workspace, split: str, k: int, seq_len: int, max_tokens: int | None,
                        batch_size: int = 8, seed: int = 0) -> dict:
    """CCA update norms while scoring the split's first ~max_tokens tokens with its precomputed neighbours
    (`neighbors/k{k}_t{seq_len}`), and bpb with retrieval ON, with random train chunks, and OFF."""
    documents = capped(workspace_documents(ws, split), max_tokens)
    score = partial(evaluate_documents, documents=documents, token_bytes=workspace_tokenizer(ws).token_bytes, seq_len=seq_len,
                    chunk_len=ws.chunk_len, batch_size=batch_size)
    with CCANorms(model) as norms:
        on_off = score({"retrieval on": Scorer(model, k), "retrieval off": Scorer(model, None)},
                       neighbors_of=PrecomputedNeighbors(ws, split, k, k, seq_len))
    random = score({"random train chunks": Scorer(model, k)}, neighbors_of=RandomNeighbors(ws, k, seed))
    bpb = {name: m["bpb"] for result in (on_off, random) for name, m in result["models"].items()}
    return {"split": split, "n_tokens": on_off["n_tokens"], "cca_ratio": norms.ratios(),
            "bpb": {name: bpb[name] for name in ("retrieval on", "random train chunks", "retrieval off")}}


# ----------------------------------------------------------------------------- the command

def diagnose_workspace(
    workspace: str,
    ckpt_path: str | None = None,
    split: str = "test",
    num_neighbors: int | None = None,
    seq_len: int | None = None,
    min_run: int = 8,
    max_chunks: int = 20000,
    max_tokens: int = 16384,
    seed: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    precision: str = "32",
    json_path: str | None = None,
) -> dict:
    """Does retrieval pay: copyable share of the neighbours per split; with a checkpoint, CCA update norms and bpb
    with retrieval on, random neighbours and off. Returns the numbers (and writes them to --json_path).

    Args:
        workspace: built workspace with precomputed neighbours.
        ckpt_path: RetroLM checkpoint (.ckpt) for the CCA-norm and bpb diagnostics.
        split: split the checkpoint is scored on: test, validation or train.
        num_neighbors: K of the neighbour files neighbors/k{K}_t{T} (default: the checkpoint's, else the one built).
        seq_len: T of those files (default as --num_neighbors).
        min_run: shared tokens in a row that count as copyable.
        max_chunks: chunks sampled per split for the copyable share.
        max_tokens: tokens of --split scored with the checkpoint.
        seed: seed of the chunk sample and of the random neighbours.
        batch_size: windows per forward pass.
        device: auto, cpu or cuda[:i].
        precision: 32 or bf16 (autocast).
        json_path: also write the numbers to this JSON file.
    """
    for flag, value in (("min_run", min_run), ("max_chunks", max_chunks), ("max_tokens", max_tokens),
                        ("batch_size", batch_size)):
        if value <= 0:
            raise RetroError(f"--{flag} must be positive, got {value}")
    if SPLIT_ALIASES.get(split, split) not in SPLITS:
        raise RetroError(f"--split must be train, validation or test, got {split!r}")
    ws = checked_workspace(workspace)
    model, data_hparams = None, {}
    if ckpt_path:
        torch_device = resolve_device(device)
        model, data_hparams = load_checkpoint(ckpt_path, torch_device)
        if model.chunk_len != ws.chunk_len:
            raise RetroError(f"the checkpoint has chunk_len {model.chunk_len}, "
                             f"workspace {workspace} has {ws.chunk_len}")
    k, seq_len = built_neighbors(ws, num_neighbors or data_hparams.get("num_neighbors"),
                                 seq_len or data_hparams.get("seq_len"))
    result = {"workspace": str(workspace), "neighbors": f"k{k}_t{seq_len}", "min_run": min_run,
              "max_chunks": max_chunks, "seed": seed, "copyable": {}}
    for name in SPLITS:
        log.info("copyable share: %s", name)
        result["copyable"][name] = copyable_share(ws, name, ws.neighbors(name, k, seq_len), min_run, max_chunks, seed)
    if model is not None:
        log.info("CCA update norms and bpb: %s", split)
        with precision_context(precision, torch_device):
            found = diagnose_checkpoint(model, ws, split, k, seq_len, max_tokens, batch_size, seed)
        result.update(checkpoint=str(ckpt_path), precision=precision, **found)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


# ----------------------------------------------------------------------------- twin corpus

def write_twin_corpus(source: str, folder: Path, singles: str | None = None) -> int:
    """Every document of `source` twice, as `<name>` and `twin/<name>`, and every document of `singles` once, under
    a new `folder`; returns how many files. Built with near-duplicate removal off, a held-out file whose twin fell
    in the train split has an exact copy of each of its chunks in the database: what a model that reads its
    neighbours can copy. Held-out singles (and twins whose twin is held out too) have nothing to copy."""
    if folder.exists():
        shutil.rmtree(folder)
    names = [(doc, (doc.name, f"twin/{doc.name}")) for doc in iter_documents(source)]
    names += [(doc, (doc.name,)) for doc in iter_documents(singles)] if singles else []
    for doc, copies in names:
        for name in copies:
            path = folder / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(doc.text, encoding="utf-8")
    return sum(len(copies) for _, copies in names)


def twin_check(ckpt: str | Path, workspace: str | Path, precision: str = "32", device: str = "cpu",
               split: str = "val") -> dict:
    """Score a checkpoint on the held-out files of a twin-corpus workspace (`write_twin_corpus`), retrieval ON (its
    precomputed neighbours) and OFF: files whose twin is in the train split (the database), on their chunks with an
    exact copy among the neighbours (r(C) = 1), and files whose twin is not (nothing to copy: ON must not hurt).
    `split` is the validation files by default, where levers are compared; the test files score a chosen recipe."""
    split = SPLIT_ALIASES.get(split, split)
    if split not in ("val", "test"):
        raise RetroError(f"the twin check scores held-out files: split must be validation or test, got {split!r}")
    ws = checked_workspace(workspace)
    split_of = {d["name"]: d["split"] for d in ws.documents}
    twin_of = lambda name: name.removeprefix("twin/") if name.startswith("twin/") else f"twin/{name}"  # noqa: E731
    torch_device = resolve_device(device)
    model, data = load_checkpoint(str(ckpt), torch_device)
    k, seq_len = int(data["num_neighbors"]), int(data["seq_len"])
    neighbors_of, _ = choose_neighbors(ws, split, "precomputed", k, k, seq_len)
    scorers = {"on": Scorer(model, k), "off": Scorer(model, None)}
    groups = {"twin in database": [], "twin not in database": []}
    for doc in workspace_documents(ws, split):
        groups["twin in database" if split_of.get(twin_of(doc.name)) == "train" else "twin not in database"].append(doc)
    results = {}
    with precision_context(precision, torch_device):
        for group, docs in groups.items():
            results[group] = evaluate_documents(scorers, docs, neighbors_of, workspace_tokenizer(ws).token_bytes,
                                                seq_len, ws.chunk_len, leakage_k=k, alphas=(0.999,)) if docs else None
    copies, alone = results["twin in database"], results["twin not in database"]
    report = {"split": split, "docs": {group: len(docs) for group, docs in groups.items()}}
    if copies is not None:
        on, off = (copies["models"][m]["bpb_above_alpha"][0.999] for m in ("on", "off"))
        report |= {"exact_copy_chunk_share": 1 - copies["kept_fraction"][0.999], "exact_copy_bpb_on": on,
                   "exact_copy_bpb_off": off, "exact_copy_ratio": on / off}
    if alone is not None:
        on, off = alone["models"]["on"]["bpb"], alone["models"]["off"]["bpb"]
        report |= {"no_twin_bpb_on": on, "no_twin_bpb_off": off, "no_twin_relative": on / off - 1}
    return report


def built_neighbors(ws: Workspace, k: int | None, seq_len: int | None) -> tuple[int, int]:
    """(K, T) of the one built neighbour set `neighbors/k{K}_t{T}` matching k and seq_len (None: any)."""
    built = [tuple(int(part[1:]) for part in name.split("/")[1].split("_"))
             for name, info in ws.manifest["stages"].items() if name.startswith("neighbors/") and info.get("done")]
    matching = [(bk, bt) for bk, bt in built if k in (None, bk) and seq_len in (None, bt)]
    if len(matching) != 1:
        have = ", ".join(f"k{bk}_t{bt}" for bk, bt in built) or "none"
        raise RetroError(f"workspace {ws.root} has neighbour files {have}, not one set for K={k}, T={seq_len}: "
                           "pass --num_neighbors and --seq_len naming one")
    return matching[0]


def format_report(result: dict) -> str:
    """The numbers as Markdown tables: copyable share per split, then (with a checkpoint) CCA norms and bpb."""
    lines = [f"copyable share: chunks u whose neighbours ({result['neighbors']}) share >= {result['min_run']} tokens "
             "in a row with chunk u+1 (of the chunks that have one) or with chunk u itself (of all)",
             "| split | chunks sampled | with chunk u+1 | chunk u+1 copyable | chunk u copyable |",
             "|---|---|---|---|---|"]
    for split, c in result["copyable"].items():
        lines.append(f"| {split} | {c['chunks']} | {c['with_continuation']} | {c['continuation_share']:.1%} | "
                     f"{c['chunk_share']:.1%} |")
    if "cca_ratio" not in result:
        return "\n".join(lines)
    lines += ["", f"CCA update / residual stream (RMS), {result['split']} split, {result['n_tokens']} tokens",
              "| layer | ratio |", "|---|---|"]
    lines += [f"| {layer} | {ratio:.4f} |" for layer, ratio in result["cca_ratio"].items()] or ["| (no CCA layer) | |"]
    bpb = result["bpb"]
    lines += ["", f"bpb, {result['split']} split, the same tokens", "| neighbours | bpb | minus retrieval on |",
              "|---|---|---|"]
    lines += [f"| {name} | {value:.4f} | {value - bpb['retrieval on']:+.4f} |" for name, value in bpb.items()]
    return "\n".join(lines)
