"""RetroDataModule / RetroDataset on a tiny built workspace (in-process, no Trainer)."""

import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import make_corpus
from retro_lit.data import IGNORE_INDEX, RetroDataModule, RetroDataset, RetroSample
from retro_lit.tokenizer import workspace_tokenizer
from retro_lit.workspace import RetroError, open_workspace

M, K, T = 8, 2, 32
L = T // M


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_bert_path):
    tmp = tmp_path_factory.mktemp("data")
    corpus = make_corpus(tmp / "corpus", n_docs=40, words_per_doc=24, one_file_per_doc=True)
    kwargs = dict(workspace=str(tmp / "ws"), corpus=str(corpus), tokenizer="bytes", chunk_size=M, seq_len=T,
                  num_neighbors=K, embedder=str(tiny_bert_path), index="Flat", batch_size=4, num_workers=0)
    RetroDataModule(**kwargs).prepare_data()
    return kwargs


def test_vocab_size_needs_no_workspace(tmp_path):
    assert RetroDataModule(str(tmp_path / "none"), tokenizer="bytes").vocab_size == 257
    assert RetroDataModule(str(tmp_path / "none"), tokenizer="bpe:8192").vocab_size == 8192


def test_bad_arguments_raise_value_error(tmp_path):
    with pytest.raises(ValueError, match="data.seq_len"):
        RetroDataModule(str(tmp_path), chunk_size=8, seq_len=20)
    with pytest.raises(ValueError, match="data.num_neighbors"):
        RetroDataModule(str(tmp_path), num_neighbors=0)


def test_sample_layout(built):
    ws = open_workspace(built["workspace"])
    ds = RetroDataset(built["workspace"], "train", T, K)
    first, end = ws.split_range("train")
    assert len(ds) == (end - first) // L
    for s in (0, len(ds) - 1):
        sample = ds[s]
        assert isinstance(sample, RetroSample)
        assert [tuple(x.shape) for x in sample] == [(T,), (T,), (L, K, 2 * M), (T,)]
        assert all(x.dtype == torch.int64 for x in sample)
        chunks = np.asarray(ws.chunks[first + s * L : first + (s + 1) * L], dtype=np.int64)
        assert sample.input_ids.tolist() == chunks.reshape(-1).tolist()
        # targets: the next token, -100 where it is padding; bytes from the tokenizer, 0 where ignored
        following = np.append(chunks.reshape(-1)[1:], ws.chunks[first + (s + 1) * L, 0] if first + (s + 1) * L < end else ws.pad_id)
        expected = np.where(following == ws.pad_id, IGNORE_INDEX, following)
        assert sample.targets.tolist() == expected.tolist()
        kept = sample.targets != IGNORE_INDEX
        assert (sample.target_bytes[~kept] == 0).all()
        assert sample.target_bytes[kept].tolist() == workspace_tokenizer(ws).token_bytes[sample.targets[kept].numpy()].tolist()
        ids = ws.neighbors("train", K, T)[s * L : (s + 1) * L]
        assert sample.neighbors.tolist() == ws.neighbor_tokens(np.asarray(ids)).tolist()


def test_no_neighbor_from_the_sequence_documents(built):
    ws = open_workspace(built["workspace"])
    for split in ("train", "val"):
        ds = RetroDataset(built["workspace"], split, T, K)
        ids = ws.neighbors(split, K, T)
        for s in range(len(ds)):
            first = ds.first + s * L
            own_docs = set(ws.chunk_doc[first : first + L].tolist())
            found = ids[s * L : (s + 1) * L]
            found = found[found >= 0]
            assert not own_docs & set(ws.chunk_doc[found].tolist())


def test_dataset_pickles_without_memmaps(built):
    ds = RetroDataset(built["workspace"], "train", T, K)
    ds[0]  # opens the memmaps in this process
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._opened is None and len(pickle.dumps(ds)) < 2000
    assert clone[1].input_ids.tolist() == ds[1].input_ids.tolist()


def test_setup_and_loaders_with_workers(built):
    dm = RetroDataModule(**{**built, "corpus": None, "num_workers": 1})
    dm.setup("fit")
    assert set(dm.datasets) == {"train", "val"}
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, RetroSample) and batch.neighbors.shape == (4, L, K, 2 * M)
    dm.setup("test")
    assert len(next(iter(dm.test_dataloader())).input_ids) <= 4


def test_per_device_batch_size(built):
    dm = RetroDataModule(**{**built, "corpus": None, "batch_size": 8})
    dm.trainer = SimpleNamespace(world_size=2, num_devices=2)
    dm.setup("validate")
    assert dm.per_device_batch_size == 4 and dm.val_dataloader().batch_size == 4
    dm.trainer = SimpleNamespace(world_size=3, num_devices=3)
    with pytest.raises(RetroError, match="divisible by the number of devices"):
        dm.setup("validate")


def test_missing_workspace_fails_clearly(tmp_path):
    with pytest.raises(RetroError, match="no built workspace"):
        RetroDataModule(str(tmp_path / "missing"), tokenizer="bytes").setup("fit")


def test_other_chunk_size_is_refused(built):
    with pytest.raises(RetroError, match="chunk_len"):
        RetroDataModule(**{**built, "chunk_size": 4, "seq_len": T}).prepare_data()
    with pytest.raises(RetroError, match="data.chunk_size is 4"):
        RetroDataModule(**{**built, "corpus": None, "chunk_size": 4}).setup("fit")


def test_neighbor_table(built):
    columns, rows = RetroDataModule(**{**built, "corpus": None}).neighbor_table(3)
    assert columns == ["chunk", "text", "neighbor_0", "l2_0", "neighbor_1", "l2_1"]
    assert len(rows) == 3 and all(len(row) == len(columns) for row in rows)
    assert all(isinstance(row[1], str) and row[1] for row in rows)
    assert all(d is None or d >= 0 for row in rows for d in row[3::2])


def test_copy_warmup_puts_the_sequence_own_text_in_the_last_slot(built):
    ws = open_workspace(built["workspace"])
    plain = RetroDataset(built["workspace"], "train", T, K)
    copies = RetroDataset(built["workspace"], "train", T, K, copy_neighbor_rate=1.0, seed=3)
    flat = np.asarray(ws.chunks, dtype=np.int64).reshape(-1)
    for s in range(len(plain)):
        a, b = plain[s].neighbors, copies[s].neighbors  # (L, K, R)
        assert torch.equal(a[:, :-1], b[:, :-1])  # the other slots keep their retrieved neighbours
        for u in range(L):
            chunk = plain.first + s * L + u
            doc = ws.chunk_doc[chunk]
            got = b[u, -1].numpy()
            # the copy is a window of its own document, shifted by at most M/2 from [chunk u, chunk u+1]
            own = flat[ws.doc_offsets[doc] * M: ws.doc_offsets[doc + 1] * M]
            own = np.where(own == ws.pad_id, -1, own)
            offsets = [o for o in range(-(M // 2), M // 2 + 1)
                       if np.array_equal(got, window(own, (chunk - ws.doc_offsets[doc]) * M + o, 2 * M))]
            assert offsets, f"sequence {s} chunk {u}: not a shifted copy of its own text"
    assert torch.equal(copies[0].neighbors, copies[0].neighbors)  # seeded: the same draw every time
    val = RetroDataModule(**{**built, "copy_neighbor_rate": 1.0})
    val.setup("fit")
    assert val.datasets["val"].copy_neighbor_rate == 0.0 and val.datasets["train"].copy_neighbor_rate == 1.0


def test_random_neighbors_come_from_other_documents_of_the_split(built):
    ws = open_workspace(built["workspace"])
    plain = RetroDataset(built["workspace"], "train", T, K)
    randomised = RetroDataset(built["workspace"], "train", T, K, random_neighbor_rate=1.0, seed=3)
    train_ids = np.arange(*ws.split_range("train"))
    candidates = ws.neighbor_tokens(train_ids)  # (n, R): every neighbour a random draw can give
    changed = 0
    for s in range(len(plain)):
        first = plain.first + s * L
        window_docs = set(ws.chunk_doc[first: first + L + 1].tolist())
        got = randomised[s].neighbors.numpy()  # (L, K, R)
        changed += int((got != plain[s].neighbors.numpy()).any())
        for row in got.reshape(-1, 2 * M):
            if (row == -1).all():  # a draw from the window's documents, dropped
                continue
            sources = train_ids[(candidates == row).all(-1)]
            assert len(sources), "a random neighbour that is not a train chunk"
            assert set(ws.chunk_doc[sources].tolist()) - window_docs, "a random neighbour from the window's documents"
    assert changed > len(plain) // 2
    assert torch.equal(randomised[1].neighbors, randomised[1].neighbors)  # seeded
    half = RetroDataset(built["workspace"], "train", T, K, random_neighbor_rate=0.5, seed=3)
    kept = [(half[s].neighbors[u] == plain[s].neighbors[u]).all().item() for s in range(len(plain)) for u in range(L)]
    assert 0.2 < np.mean(kept) < 0.8
    data = RetroDataModule(**{**built, "random_neighbor_rate": 1.0})
    data.setup("fit")
    assert data.datasets["val"].random_neighbor_rate == 0.0 and data.datasets["train"].random_neighbor_rate == 1.0
    with pytest.raises(ValueError, match="data.random_neighbor_rate"):
        RetroDataModule(built["workspace"], random_neighbor_rate=-0.1)


def window(tokens: np.ndarray, start: int, size: int) -> np.ndarray:
    """tokens[start:start+size], -1 where the window leaves the array."""
    out = np.full(size, -1, dtype=np.int64)
    lo, hi = max(start, 0), min(start + size, len(tokens))
    out[lo - start: hi - start] = tokens[lo:hi]
    return out


def test_copy_rate_out_of_range_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.copy_neighbor_rate"):
        RetroDataModule(str(tmp_path), copy_neighbor_rate=1.5)
