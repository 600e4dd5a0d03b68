"""Lightning data for RETRO: `RetroDataset` reads one chunk-aligned training sequence and its pre-computed
neighbors from a workspace's memmaps; `RetroDataModule` builds the workspace once (`prepare_data`) and opens
it on every process (`setup`).

Shapes use the legend of `model.py`: `T` sequence length, `M` chunk length, `L = T // M` chunks,
`K` neighbors, `R = 2M` retrieved tokens per neighbor (the neighbor chunk and its continuation).
"""

import logging
import os
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from retro_lit.build import build_workspace
from retro_lit.tokenizer import tokenizer_vocab_size, workspace_tokenizer
from retro_lit.verify import checked_workspace
from retro_lit.workspace import SPLITS, RetroError, open_workspace

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


class RetroSample(NamedTuple):
    """One sequence; the default collate stacks a list of them into the same tuple of `(B, ...)` tensors."""

    input_ids: torch.Tensor  # (T,) int64 LM tokens
    targets: torch.Tensor  # (T,) the next token, -100 where the next token is padding
    neighbors: torch.Tensor  # (L, K, R) retrieved tokens, -1 = no token
    target_bytes: torch.Tensor  # (T,) UTF-8 bytes each target token stands for, 0 where ignored


class RetroDataset(Dataset):
    """The sequences of one split: sequence `s` is chunks `first + s*L ... first + (s+1)*L - 1` of the split.

    Only paths and sizes are kept, so the dataset pickles cheaply to DataLoader workers; each worker opens the
    workspace's memmaps on its first `__getitem__`.
    """

    def __init__(self, workspace: str | Path, split: str, seq_len: int, num_neighbors: int,
                 copy_neighbor_rate: float = 0.0, seed: int = 0, random_neighbor_rate: float = 0.0):
        self.workspace = Path(workspace)
        self.split, self.seq_len, self.num_neighbors = split, seq_len, num_neighbors
        self.copy_neighbor_rate, self.random_neighbor_rate, self.seed = copy_neighbor_rate, random_neighbor_rate, seed
        ws = open_workspace(self.workspace)
        if seq_len % ws.chunk_len:
            raise RetroError(f"seq_len {seq_len} is not a multiple of the workspace chunk_len {ws.chunk_len}")
        self.chunk_len = ws.chunk_len
        self.chunks_per_seq = seq_len // ws.chunk_len  # L
        self.first, self.end = (int(i) for i in ws.split_range(split))
        ws.neighbors(split, num_neighbors, seq_len)  # fail here, not in a loader worker, if they were not built
        self._opened = None  # (workspace, neighbor ids, pad id, token bytes), opened once per process

    def __len__(self) -> int:
        return (self.end - self.first) // self.chunks_per_seq

    def __getstate__(self) -> dict:
        # never ship open memmaps to a worker: pickling an np.memmap copies its data
        return {**self.__dict__, "_opened": None}

    def _open(self):
        if self._opened is None:
            ws = open_workspace(self.workspace)
            neighbor_ids = ws.neighbors(self.split, self.num_neighbors, self.seq_len)  # (chunks of split, K)
            token_bytes = np.asarray(workspace_tokenizer(ws).token_bytes, dtype=np.int64)  # (V,)
            self._opened = ws, neighbor_ids, ws.pad_id, token_bytes
        return self._opened

    def __getitem__(self, s: int) -> RetroSample:
        if not 0 <= s < len(self):
            raise IndexError(f"sequence {s} out of range for split {self.split!r} of {len(self)} sequences")
        ws, neighbor_ids, pad_id, token_bytes = self._open()
        L = self.chunks_per_seq
        first = self.first + s * L
        tokens = np.asarray(ws.chunks[first : first + L], dtype=np.int64).reshape(-1)  # (T,)
        # the target of the last position is the first token of the next chunk, if the split has one
        after = int(ws.chunks[first + L, 0]) if first + L < self.end else pad_id
        targets = np.append(tokens[1:], after)  # (T,)
        ignored = targets == pad_id
        target_bytes = np.where(ignored, 0, token_bytes[targets])  # (T,)
        targets[ignored] = IGNORE_INDEX
        ids = np.asarray(neighbor_ids[s * L : (s + 1) * L])  # (L, K) global chunk ids, -1 = none
        if self.random_neighbor_rate > 0:
            ids = self._with_random(ws, ids, first, s)
        neighbors = ws.neighbor_tokens(ids)  # (L, K, R)
        if self.copy_neighbor_rate > 0:
            neighbors = self._with_copies(ws, neighbors, first, s)
        return RetroSample(
            torch.from_numpy(tokens),
            torch.from_numpy(targets),
            torch.as_tensor(neighbors, dtype=torch.int64),
            torch.from_numpy(target_bytes.astype(np.int64)),
        )


    def _with_random(self, ws, ids: np.ndarray, first: int, s: int) -> np.ndarray:
        """Useless neighbours: for a `random_neighbor_rate` share of the chunks, all K neighbours are random chunks
        of the split instead of the retrieved ones, so that the model learns when to ignore what it retrieved
        (without them a model that learned to copy over-trusts neighbours that hold nothing to copy). A draw from
        a document of the training window (or of the chunk after it, which holds the last target) is dropped
        (-1), as retrieval excludes them. Seeded by (seed, sequence), apart from the copy warm-up's draws."""
        rng = np.random.default_rng((self.seed, s, 1))
        L = self.chunks_per_seq
        rows = np.flatnonzero(rng.random(L) < self.random_neighbor_rate)
        drawn = rng.integers(self.first, self.end, size=(len(rows), ids.shape[1]))  # (n, K)
        window_docs = ws.chunk_doc[first: min(first + L + 1, self.end)]
        drawn[np.isin(ws.chunk_doc[drawn], window_docs)] = -1
        ids = ids.copy()
        ids[rows] = drawn
        return ids

    def _with_copies(self, ws, neighbors: np.ndarray, first: int, s: int) -> np.ndarray:
        """Copy warm-up: for a `copy_neighbor_rate` share of the chunks, the last neighbour slot holds the
        sequence's own text, [chunk, continuation], aligned for half of them and shifted by up to M/2 tokens
        either way for the others (clipped to its document). Natural neighbours at this scale rarely repeat the
        next chunk, so the copying pathway forms slowly; aligned copies teach it fast (by position), shifted ones
        make it match content, and the retrieved neighbours teach when to ignore a neighbour. Seeded by (seed,
        sequence): reproducible."""
        rng = np.random.default_rng((self.seed, s))
        M, L = self.chunk_len, self.chunks_per_seq
        flat = ws.chunks.reshape(-1)  # (n_chunks * M,)
        neighbors = neighbors.copy()
        for u in np.flatnonzero(rng.random(L) < self.copy_neighbor_rate):
            chunk = first + int(u)
            doc = int(ws.chunk_doc[chunk])
            doc_lo, doc_hi = int(ws.doc_offsets[doc]) * M, int(ws.doc_offsets[doc + 1]) * M  # token span
            shift = int(rng.integers(-(M // 2), M // 2 + 1)) if rng.random() < 0.5 else 0
            start = chunk * M + shift
            lo, hi = max(start, doc_lo), min(start + 2 * M, doc_hi)
            copy = np.full(2 * M, -1, dtype=np.int64)  # (R,)
            copy[lo - start: hi - start] = flat[lo:hi]
            copy[copy == ws.pad_id] = -1
            neighbors[u, -1] = copy
        return neighbors


def _default_num_workers(devices: int) -> int:
    """Loader workers per device: the CPUs this process may use, shared by the devices, one kept for compute."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, min(4, cpus // max(1, devices) - 1))


class RetroDataModule(L.LightningDataModule):
    """RETRO sequences with pre-computed neighbors, from a workspace built once from a corpus."""

    def __init__(
        self,
        workspace: str,
        corpus: str | None = None,
        tokenizer: str = "bpe:8192",
        chunk_size: int = 64,
        seq_len: int = 512,
        num_neighbors: int = 2,
        embedder: str | None = None,
        index: str = "auto",
        split: tuple[float, float, float] = (0.9, 0.05, 0.05),
        seed: int = 0,
        dedup_threshold: float | None = 0.8,
        copy_neighbor_rate: float = 0.0,
        random_neighbor_rate: float = 0.0,
        batch_size: int = 8,
        num_workers: int | None = None,
        predict_split: str = "test",
        prepare_data_per_node: bool = True,
    ):
        """
        Args:
            workspace: Folder of the chunk database (built by `prepare_data` when `corpus` is given).
            corpus: Source documents: a text file, a folder, JSONL/Parquet, a saved HF dataset, `python-stdlib[:pkgs]`
                or `shakespeare`; None uses an already built workspace as it is.
            tokenizer: LM tokenizer spec: `bpe:N` (trained on the train split), `bytes`, `smollm2` or a path.
            chunk_size: Chunk length M in tokens (the paper's m = 64).
            seq_len: Training sequence length T in tokens; a multiple of `chunk_size`.
            num_neighbors: Neighbors K retrieved per chunk (the paper's k = 2).
            embedder: Frozen BERT for the retrieval keys (a name or path); None for the database default.
            index: faiss index factory string, or `auto` to choose by database size.
            split: Train, validation and test fractions of the documents.
            seed: Seed of the document split and of the copy warm-up's and random neighbours' draws; the training
                order follows the run's `seed_everything` (this seed without one).
            dedup_threshold: Leave out training documents whose 13-gram Jaccard similarity to a validation or test
                document is at least this (the paper's hygiene, MinHash estimate); None keeps them all.
            copy_neighbor_rate: Share of training chunks whose last neighbour is replaced by a copy of their own
                text and continuation, aligned or shifted (copy warm-up, docs/retrieval.md); 0 trains on retrieved
                neighbours only. Validation and test always use the retrieved neighbours.
            random_neighbor_rate: Share of training chunks whose K neighbours are random chunks of the train split
                (from other documents) instead of the retrieved ones: teaches a model that copies when to ignore a
                neighbour (docs/retrieval.md). Validation and test always use the retrieved neighbours.
            batch_size: Global batch size, divided evenly among the devices.
            num_workers: DataLoader workers per device; None picks from the CPUs available.
            predict_split: Split that `predict` runs on.
            prepare_data_per_node: Build the workspace once per node (local disks); set False on a filesystem
                shared by all nodes so that only global rank 0 builds it.
        """
        super().__init__()
        if chunk_size <= 0 or seq_len <= 0 or seq_len % chunk_size:
            raise ValueError(f"data.seq_len ({seq_len}) must be a positive multiple of data.chunk_size ({chunk_size})")
        if num_neighbors <= 0:
            raise ValueError(f"data.num_neighbors must be positive, got {num_neighbors}")
        for name, rate in (("copy_neighbor_rate", copy_neighbor_rate), ("random_neighbor_rate", random_neighbor_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"data.{name} must be in [0, 1], got {rate}")
        if batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        if predict_split not in SPLITS:
            raise ValueError(f"data.predict_split must be one of {SPLITS}, got {predict_split!r}")
        self.save_hyperparameters()
        self.prepare_data_per_node = prepare_data_per_node
        self.datasets: dict[str, RetroDataset] = {}
        self.per_device_batch_size = batch_size

    @property
    def vocab_size(self) -> int:
        """LM vocabulary size, known from the tokenizer spec alone (linked to the model before any build)."""
        return tokenizer_vocab_size(self.hparams.tokenizer)

    @property
    def chunk_size(self) -> int:
        return self.hparams.chunk_size

    def prepare_data(self) -> None:
        """Build or resume the workspace (one process per node, or one in all with `prepare_data_per_node=False`)."""
        hp = self.hparams
        if hp.corpus is None:
            return  # setup() checks that the workspace exists and matches
        log.info("prepare_data: building or resuming workspace %s (pid %d)", hp.workspace, os.getpid())
        build_workspace(
            hp.workspace,
            hp.corpus,
            tokenizer=hp.tokenizer,
            chunk_len=hp.chunk_size,
            embedder=hp.embedder,
            index=hp.index,
            num_neighbors=hp.num_neighbors,
            seq_len=hp.seq_len,
            split=tuple(hp.split),
            seed=hp.seed,
            dedup_threshold=hp.dedup_threshold,
        )

    def setup(self, stage: str | None = None) -> None:
        """Open the built workspace (never build) and make the datasets the stage needs."""
        world_size = self.trainer.world_size if self.trainer is not None else 1
        if self.hparams.batch_size % world_size:
            raise RetroError(
                f"data.batch_size ({self.hparams.batch_size}) must be divisible by the number of devices ({world_size})"
            )
        self.per_device_batch_size = self.hparams.batch_size // world_size
        self.check_workspace()
        wanted = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": (self.hparams.predict_split,),
        }.get(stage, SPLITS)
        for split in wanted:
            if split not in self.datasets:
                self.datasets[split] = self._dataset(split)

    def check_workspace(self) -> None:
        """Fail with one clear message if the workspace is missing, unfinished or built with other settings."""
        hp = self.hparams
        ws = checked_workspace(hp.workspace)  # raises RetroError when missing, incomplete or damaged
        if ws.chunk_len != hp.chunk_size:
            raise RetroError(
                f"workspace {hp.workspace} was built with chunk_len {ws.chunk_len}, but data.chunk_size is "
                f"{hp.chunk_size}; use another data.workspace or the same chunk size"
            )
        vocab_size = workspace_tokenizer(ws).vocab_size
        if vocab_size != self.vocab_size:
            raise RetroError(
                f"workspace {hp.workspace} has an LM vocabulary of {vocab_size}, but data.tokenizer "
                f"{hp.tokenizer!r} has {self.vocab_size}"
            )

    def neighbor_table(self, num_chunks: int = 4, split: str = "val") -> tuple[list[str], list[list]]:
        """Columns and rows for a log table: evenly spaced chunks of `split`, the text of each retrieved neighbor
        (chunk + continuation) and its L2 key distance to the chunk."""
        hp = self.hparams
        ws = open_workspace(hp.workspace)
        first, end = ws.split_range(split)
        picks = np.unique(np.linspace(first, end - 1, num_chunks).astype(np.int64))  # (n,) global chunk ids
        neighbor_ids = np.asarray(ws.neighbors(split, hp.num_neighbors, hp.seq_len)[picks - first])  # (n, K)
        neighbor_tokens = ws.neighbor_tokens(neighbor_ids)  # (n, K, R)
        keys = ws.embeddings_at(picks)  # (n, E)
        neighbor_keys = ws.embeddings_at(np.maximum(neighbor_ids, 0).reshape(-1)).reshape(*neighbor_ids.shape, -1)
        distances = np.linalg.norm(neighbor_keys - keys[:, None], axis=-1)  # (n, K)
        decode = workspace_tokenizer(ws).decode
        columns = ["chunk", "text"] + [f"{name}_{j}" for j in range(hp.num_neighbors) for name in ("neighbor", "l2")]
        rows = []
        for i, chunk in enumerate(picks):
            row = [int(chunk), decode(t for t in ws.chunks[chunk] if t != ws.pad_id)]
            for j in range(hp.num_neighbors):
                found = neighbor_ids[i, j] >= 0
                row += [decode(t for t in neighbor_tokens[i, j] if t >= 0) if found else "", float(distances[i, j]) if found else None]
            rows.append(row)
        return columns, rows

    def _dataset(self, split: str) -> RetroDataset:
        hp = self.hparams
        train = split == "train"
        ds = RetroDataset(hp.workspace, split, hp.seq_len, hp.num_neighbors, hp.copy_neighbor_rate if train else 0.0,
                          hp.seed, hp.random_neighbor_rate if train else 0.0)
        rank_zero_info(f"{split}: {len(ds)} sequences of {self.hparams.seq_len} tokens")
        if len(ds) == 0:
            raise RetroError(
                f"split {split!r} of {self.hparams.workspace} is shorter than one sequence of "
                f"{self.hparams.seq_len} tokens; use a larger corpus, split fraction or a shorter data.seq_len"
            )
        return ds

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        devices = self.trainer.num_devices if self.trainer is not None else 1
        workers = self.hparams.num_workers
        workers = _default_num_workers(devices) if workers is None else workers
        return DataLoader(
            self.datasets[split],
            batch_size=self.per_device_batch_size,
            shuffle=train,
            generator=self.shuffle_generator() if train else None,
            drop_last=train,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def shuffle_generator(self) -> torch.Generator:
        """The training order's own RNG, seeded from the run's seed (`seed_everything`, else `data.seed`). With the
        global RNG, a model whose initialisation draws more from it (RETRO against its baseline) would train on
        other batches; with this one every model of a seed sees the same sequences in the same order."""
        return torch.Generator().manual_seed(int(os.environ.get("PL_GLOBAL_SEED", self.hparams.seed)))

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.hparams.predict_split)
