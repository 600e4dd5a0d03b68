"""Evaluation: sliding windows, the leakage measure, bpb(alpha), and all-padding neighbours == retrieval OFF."""
import math

import numpy as np
import pytest
import torch

from retro_lit.evaluate import (EvalDocument, Scorer, evaluate_documents, filtered_bpb, longest_common_substring,
                                markdown_table, score_document, sliding_windows, window_stride)
from retro_lit.model import RetroModel

M, K, V = 4, 2, 40
R = 2 * M
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny(tiny_config):
    """Builds the model these tests score with: tiny_config with heads of 8 and a larger init."""
    config = tiny_config(vocab_size=V, chunk_size=M, head_dim=8, init_std=0.2)
    return lambda: RetroModel.from_config(config).eval()


@pytest.mark.parametrize("n_tokens", [1, 2, 5, 16, 17, 33, 50, 101])
@pytest.mark.parametrize("seq_len", [4, 8, 16, 24])
def test_sliding_window_scores_every_token_once(n_tokens, seq_len):
    windows = sliding_windows(n_tokens, seq_len, M)
    counts = np.zeros(max(n_tokens - 1, 0), dtype=int)
    for i, w in enumerate(windows):
        assert w.start % M == 0 and w.end - w.start <= seq_len and w.start <= w.score_from < w.end <= n_tokens - 1
        counts[w.score_from:w.end] += 1
        if i > 0:  # after the first window, every scored token sees the previous half window (in whole chunks)
            assert w.score_from - w.start == seq_len - window_stride(seq_len, M)
    assert (counts == 1).all()


def test_score_document_counts_each_prediction_once_and_matches_one_pass(tiny):
    """With a document that fits the context, sliding windows equal one forward; longer, every position is set."""
    model = tiny()
    tokens = torch.randint(1, V, (16,))
    neighbors = torch.randint(0, V, (4, K, R))
    logits = model(tokens[None, :-1], neighbors[None, :3])
    one_pass = torch.nn.functional.cross_entropy(logits[0], tokens[1:], reduction="none").double()
    torch.testing.assert_close(score_document(model, tokens, neighbors, seq_len=16), one_pass, rtol=1e-5, atol=1e-6)
    calls = []
    long = torch.randint(1, V, (45,))
    nats = score_document(model, long, torch.randint(0, V, (12, K, R)), seq_len=8, batch_size=3, on_window=lambda: calls.append(1))
    assert nats.shape == (44,) and (nats > 0).all() and len(calls) == len(sliding_windows(45, 8, M))


def test_all_padding_neighbors_equal_retrieval_off(tiny):
    model = tiny()
    tokens = torch.randint(1, V, (37,))
    padding = torch.full((10, K, R), -1)
    torch.testing.assert_close(score_document(model, tokens, padding, seq_len=16),
                               score_document(model, tokens, None, seq_len=16))
    docs = [EvalDocument("a", tokens.numpy()), EvalDocument("b", np.arange(1, 12))]
    result = evaluate_documents({"on": Scorer(model, K), "off": Scorer(model, None)}, docs,
                                lambda doc, chunks: np.full((len(chunks), K, R), -1), np.ones(V), 16, M, leakage_k=K)
    assert result["models"]["on"]["bpb"] == pytest.approx(result["models"]["off"]["bpb"])


def brute_force_lcs(chunk, neighbors) -> int:
    best = 0
    for neighbor in neighbors:
        for i in range(len(chunk)):
            for j in range(len(neighbor)):
                n = 0
                while i + n < len(chunk) and j + n < len(neighbor) and chunk[i + n] >= 0 and chunk[i + n] == neighbor[j + n]:
                    n += 1
                best = max(best, n)
    return best


def test_longest_common_substring_agrees_with_brute_force():
    rng = np.random.default_rng(0)
    chunks = rng.integers(0, 3, (60, 6))
    neighbors = rng.integers(-1, 3, (60, 3, 12))
    neighbors[:5, :, 2:8] = chunks[:5, None, :]  # whole-chunk copies
    chunks[7, 4:] = -1  # padding never matches
    expected = [brute_force_lcs(c, n) for c, n in zip(chunks, neighbors)]
    np.testing.assert_array_equal(longest_common_substring(chunks, neighbors, batch=7), expected)
    assert (longest_common_substring(chunks, neighbors)[:5] == 6).all()


def test_runs_do_not_span_two_neighbors():
    chunk = np.array([[1, 2, 3, 4]])
    neighbors = np.array([[[9, 9, 1, 2], [3, 4, 9, 9]]])  # 1 2 | 3 4: two runs of 2, not one of 4
    assert longest_common_substring(chunk, neighbors)[0] == 2


def test_bpb_at_alpha_one_is_full_bpb_and_filtering_drops_copied_chunks(tiny):
    model = tiny()
    rng = np.random.default_rng(1)
    docs = [EvalDocument(str(i), rng.integers(1, V, n)) for i, n in enumerate((30, 9, 64))]

    def neighbors_of(doc, chunks):  # neighbour 0 copies every other chunk, so half the chunks leak
        found = rng.integers(1, V, (len(chunks), K, R))
        found[::2, 0, :M] = np.where(chunks[::2] >= 0, chunks[::2], -1)
        return found

    bytes_per_token = rng.integers(1, 4, V)
    result = evaluate_documents({"on": Scorer(model, K), "off": Scorer(model, None)}, docs, neighbors_of,
                                bytes_per_token, seq_len=16, chunk_len=M, leakage_k=K)
    for m in result["models"].values():
        assert m["bpb_alpha"][1.0] == pytest.approx(m["bpb"])
        assert math.isfinite(m["bpb_alpha"][0.5])
    assert result["kept_fraction"][1.0] == 1.0 and 0.3 < result["kept_fraction"][0.5] < 0.7
    assert result["n_tokens"] == sum(len(d.tokens) - 1 for d in docs)
    assert result["n_bytes"] == sum(bytes_per_token[d.tokens[1:]].sum() for d in docs)
    table = markdown_table(result)
    assert table.count("\n") == 4 and "bpb(α=0.125)" in table and "chunks kept" in table


def test_overlap_of_a_partial_last_chunk_is_relative_to_its_own_length(tiny):
    """A document's 2-token last chunk that a neighbour copies whole has r(C) = 1, not 2/M."""
    doc = EvalDocument("short", np.arange(1, 7))  # chunks [1 2 3 4], [5 6 - -]

    def neighbors_of(doc, chunks):
        found = np.full((len(chunks), K, R), V - 1)  # a token in no chunk
        found[1, 0, :2] = [5, 6]
        return found

    result = evaluate_documents({"off": Scorer(tiny(), None)}, [doc], neighbors_of, np.ones(V), 16, M, leakage_k=K,
                                alphas=(0.5, 1.0))
    assert result["kept_fraction"] == {0.5: 0.5, 1.0: 1.0}


def test_filtered_bpb():
    nats = np.array([1.0, 2.0, 3.0])
    n_bytes = np.array([1.0, 1.0, 2.0])
    overlap = np.array([0.0, 0.5, 1.0])
    assert filtered_bpb(nats, n_bytes, overlap, 1.0) == pytest.approx(6 / math.log(2) / 4)
    assert filtered_bpb(nats, n_bytes, overlap, 0.25) == pytest.approx(1 / math.log(2) / 1)
    assert math.isnan(filtered_bpb(nats, n_bytes, overlap + 2, 1.0))
    assert filtered_bpb(nats, n_bytes, overlap, 0.25, above=True) == pytest.approx(5 / math.log(2) / 3)


def test_random_control_scores_random_neighbors_but_keeps_the_real_overlap(tiny):
    model, rng = tiny(), np.random.default_rng(2)
    docs = [EvalDocument(f"d{i}", rng.integers(1, V, 30)) for i in range(3)]

    def copies(doc, chunks):  # every neighbour 0 copies its chunk: r(C) = 1 everywhere
        found = rng.integers(1, V, (len(chunks), K, R))
        found[:, 0, :M] = np.where(chunks >= 0, chunks, -1)
        return found

    def unrelated(doc, chunks):  # tokens that appear in no chunk
        return np.full((len(chunks), K, R), 0)

    scorers = {"on": Scorer(model, K), "random": Scorer(model, K, unrelated), "off": Scorer(model, None)}
    result = evaluate_documents(scorers, docs, copies, np.ones(V), seq_len=16, chunk_len=M, leakage_k=K)
    assert result["kept_fraction"][0.5] == 0.0  # r(C) from the real neighbours, not from the control's
    models = result["models"]
    assert models["random"]["bpb"] != models["on"]["bpb"]  # scored with the other neighbours
    assert models["on"]["bpb_above_alpha"][0.5] == pytest.approx(models["on"]["bpb"])


def test_evaluate_command_writes_table_json_and_plots(tiny_workspace, tmp_path, monkeypatch, capsys):
    import json
    import shutil

    from retro_lit.commands import main

    ws, ckpt, embedder, corpus = tiny_workspace
    ckpt = shutil.copy(ckpt, tmp_path)  # --random_control writes its results next to the checkpoint
    monkeypatch.setattr("retro_lit.index.workspace_embedder", lambda *args, **kwargs: embedder)
    out = tmp_path / "out"
    base = ["--ckpt_path", str(ckpt), "--workspace", str(ws), "--neighbors", "[1,2]", "--device", "cpu", "--quiet"]
    assert main(["evaluate", *base, "--split", "train", "--max_tokens", "120", "--baseline_ckpt", str(ckpt),
                 "--baselines", json.dumps({"baseline 2x": str(ckpt)}), "--neighbor_source", "live",
                 "--out_dir", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| retrieval on (k=2) |" in table and "| baseline |" in table and "| chunks kept |" in table
    assert "| baseline 2x |" in table
    result = json.loads((out / "eval_train.json").read_text())
    assert result["neighbors"] == "live" and result["n_tokens"] > 0  # train retrieves live, own document excluded
    off = result["models"]["retrieval off"]["bpb"]
    assert off == pytest.approx(result["models"]["baseline"]["bpb"]) == pytest.approx(
        result["models"]["baseline 2x"]["bpb"])
    assert (out / "eval_train_bpb_vs_alpha.png").exists() and (out / "eval_train_bpb_vs_k.png").exists()
    assert main(["evaluate", *base, "--split", "test", "--random_control"]) == 0  # precomputed, next to the ckpt
    result = json.loads((tmp_path / "eval_test.json").read_text())
    assert result["neighbors"].startswith("precomputed") and "random neighbours (k=2)" in result["models"]
    assert main(["evaluate", *base, "--corpus", str(corpus), "--max_tokens", "60", "--out_dir", str(out)]) == 0
    assert (out / "eval_corpus_txt.json").exists()
    capsys.readouterr()
    assert main(["evaluate", *base, "--neighbors", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_random_neighbor_control_draws_seeded_train_chunks(tiny_workspace, tmp_path, capsys):
    import json

    from retro_lit.workspace import open_workspace
    from retro_lit.commands import main
    from retro_lit.evaluate import RandomNeighbors

    ws_path, ckpt, _, _ = tiny_workspace
    ws = open_workspace(ws_path)
    lo, hi = ws.split_range("train")
    chunks = np.zeros((50, ws.chunk_len), dtype=np.int64)
    doc = EvalDocument("doc", chunks.reshape(-1), doc_id=3)
    drawn = RandomNeighbors(ws, k=2)(doc, chunks)  # (C, k, R)
    assert drawn.shape == (50, 2, 2 * ws.chunk_len)
    assert np.array_equal(drawn, RandomNeighbors(ws, k=2)(doc, chunks))  # seeded: the same control every run
    train_chunks = {row.tobytes() for row in ws.neighbor_tokens(np.arange(lo, hi))}  # train chunks + continuations
    assert all(n.tobytes() in train_chunks for n in drawn.reshape(-1, 2 * ws.chunk_len))
    assert main(["evaluate", "--ckpt_path", str(ckpt), "--workspace", str(ws_path), "--neighbors", "1", "--device", "cpu",
                          "--quiet", "--split", "test", "--neighbor_source", "random", "--out_dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "eval_test.json").read_text())["neighbors"] == "random train chunks (control)"


def test_leakage_compares_ten_neighbors_whatever_k_the_model_reads(tiny_workspace, tmp_path):
    """r(C) uses the paper's 10 neighbours (§2.6) by default: the precomputed file holds 2, 8 more are searched."""
    import json

    from retro_lit.commands import main

    ws, ckpt, _, _ = tiny_workspace
    base = ["--ckpt_path", str(ckpt), "--workspace", str(ws), "--neighbors", "1", "--device", "cpu", "--quiet",
            "--out_dir", str(tmp_path)]
    for split in ("test", "train"):
        assert main(["evaluate", *base, "--split", split]) == 0
        result = json.loads((tmp_path / f"eval_{split}.json").read_text())
        assert result["leakage_k"] == 10 and result["neighbors"] == "precomputed k2_t16 + 8 searched for r(C)"
    assert main(["evaluate", *base, "--split", "test", "--leakage_k", "2"]) == 0
    result = json.loads((tmp_path / "eval_test.json").read_text())
    assert result["leakage_k"] == 2 and result["neighbors"] == "precomputed k2_t16"
    # held-out text has no exclusion, so a file built for another T serves a longer context too
    assert main(["evaluate", *base, "--split", "test", "--leakage_k", "2", "--seq_len", "32"]) == 0
    result = json.loads((tmp_path / "eval_test.json").read_text())
    assert result["seq_len"] == 32 and result["neighbors"] == "precomputed k2_t16"


def test_searched_neighbors_extend_the_precomputed_ones(tiny_workspace):
    """Held-out text: the file's 2, then 8 searched, are its 10 nearest chunks. Train text: not its own document."""
    import faiss

    from retro_lit.workspace import open_workspace
    from retro_lit.evaluate import PrecomputedNeighbors, workspace_documents
    from retro_lit.index import index_files, load_index

    ws = open_workspace(tiny_workspace[0])
    index = load_index(index_files(ws.root, ws.manifest["stages"]["index"]))
    n_train = ws.split_range("train")[1]
    for split in ("test", "train"):
        source = PrecomputedNeighbors(ws, split, k=10, file_k=2, seq_len=16, index=index)
        first = ws.split_range(split)[0]
        for doc in workspace_documents(ws, split):
            lo, n = int(ws.doc_offsets[doc.doc_id]), -(-len(doc.tokens) // ws.chunk_len)
            ids = source.neighbor_ids(doc, n)  # (C, 10)
            assert ids.shape == (n, 10) and (ids >= 0).all() and all(len(set(row)) == 10 for row in ids.tolist())
            np.testing.assert_array_equal(ids[:, :2], ws.neighbors(split, 2, 16)[lo - first:lo - first + n])
            if split == "train":
                assert (ws.chunk_doc[ids] != doc.doc_id).all()
                continue
            keys = ws.embeddings(lo, lo + n)  # (C, E)
            exact, _ = faiss.knn(keys, ws.embeddings(0, n_train), 10)  # (C, 10) squared distances
            found = ((keys[:, None] - ws.embeddings_at(ids.reshape(-1)).reshape(n, 10, -1)) ** 2).sum(-1)
            np.testing.assert_allclose(np.sort(found, axis=1), exact, rtol=1e-4, atol=1e-5)
