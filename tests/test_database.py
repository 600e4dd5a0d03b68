import logging
import random
import shutil

import numpy as np
import pytest
import torch

from helpers import K, M, T, WORDS, build, make_corpus, snapshot
from retro_lit.commands import main
from retro_lit.embedder import BERTForChunkEmbeddings, workspace_embedder
from retro_lit.index import RetroIndex
from retro_lit.neighbors import excluded_ranges
from retro_lit.tokenizer import workspace_tokenizer
from retro_lit.workspace import RetroError, open_workspace, read_manifest, write_manifest


def mtimes(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_bert):
    tmp = tmp_path_factory.mktemp("db")
    corpus = make_corpus(tmp / "corpus.txt")
    return build(tmp / "ws", corpus, tiny_bert), corpus


def test_layout_and_chunk_round_trip(built):
    root, corpus = built
    ws = open_workspace(root)
    assert ws.chunks.dtype == np.uint16 and ws.chunks.shape == (ws.manifest["counts"]["chunks"], M)
    assert ws.chunk_doc.dtype == np.int32 and ws.doc_offsets.dtype == np.int64
    texts = corpus.read_text(encoding="utf-8").split("\n\n\n")
    for doc in ws.documents:
        rows = ws.chunks[ws.doc_offsets[doc["doc"]] : ws.doc_offsets[doc["doc"] + 1]].reshape(-1)
        assert (rows[doc["n_tokens"] :] == ws.pad_id).all()
        original = texts[int(doc["name"].split("#")[1])]
        assert workspace_tokenizer(ws).decode(rows[: doc["n_tokens"]]).strip() == original.strip()
    first = 0
    for split in ("train", "val", "test"):  # contiguous ranges in split order
        a, b = ws.split_range(split)
        assert (
            a == first
            and b > a
            and set(d["split"] for d in ws.documents[ws.chunk_doc[a] : ws.chunk_doc[b - 1] + 1]) == {split}
        )
        first = b
    assert ws.split_range("validation") == ws.split_range("val")
    assert ws.manifest["stages"]["index"]["recall"] == 1.0  # Flat


def test_no_neighbor_from_a_document_of_the_query_window(built):
    ws = open_workspace(built[0])
    n_train = ws.split_range("train")[1]
    for split in ("train", "val", "test"):
        first, end = ws.split_range(split)
        nbrs = ws.neighbors(split, K, T)
        assert nbrs.shape == (end - first, K) and nbrs.dtype == np.int64
        for c in range(first, end):
            window = range(
                first + (c - first) // (T // M) * (T // M),
                min(first + ((c - first) // (T // M) + 1) * (T // M), end),
            )
            window_docs = set(ws.chunk_doc[list(window)].tolist())
            found = nbrs[c - first][nbrs[c - first] >= 0]
            assert len(found) == K and (found < n_train).all()
            assert not window_docs & set(ws.chunk_doc[found].tolist())
        lo, hi = excluded_ranges(ws, split, T)
        assert ((nbrs < lo[:, None]) | (nbrs >= hi[:, None])).all()


def test_no_neighbor_holds_a_target_of_its_window(built):
    """The tokens a window predicts run into the first token of the chunk after it: that chunk (which may open
    another document) is excluded too, and no neighbour's continuation reaches into the window either."""
    ws = open_workspace(built[0])
    L = T // M
    for split in ("train", "val", "test"):
        first, end = ws.split_range(split)
        nbrs = ws.neighbors(split, K, T)
        lo, hi = excluded_ranges(ws, split, T)
        for c in range(first, end):
            window_start = first + (c - first) // L * L
            predicted = set(range(window_start, min(window_start + L + 1, end)))  # chunks holding targets
            assert predicted <= set(range(lo[c - first], hi[c - first]))
            for n in nbrs[c - first][nbrs[c - first] >= 0]:
                has_next = n + 1 < len(ws.chunks) and ws.chunk_doc[n + 1] == ws.chunk_doc[n]
                assert not ({n, n + 1} if has_next else {n}) & predicted


def test_training_documents_that_near_duplicate_held_out_ones_are_left_out(tmp_path, tiny_bert):
    rng = random.Random(1)
    docs = [" ".join(rng.choice(WORDS) + str(rng.randint(0, 99)) for _ in range(80)) for _ in range(20)]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(docs + docs):  # every document twice: doc i and its twin 20 + i
        (corpus / f"d{i:02d}.txt").write_text(text, encoding="utf-8")
    kept = open_workspace(build(tmp_path / "ws", corpus, tiny_bert, until="chunks"))
    names = {d["name"]: d["split"] for d in kept.documents}
    twin = lambda name: f"d{(int(name[1:3]) + 20) % 40:02d}.txt"  # noqa: E731
    held_out = [n for n, split in names.items() if split != "train"]
    assert held_out and all(names.get(twin(n), "gone") != "train" for n in held_out)
    dropped = kept.manifest["counts"]["near_duplicates_dropped"]
    assert sorted(dropped) == sorted(twin(n) for n in held_out if twin(n) not in names)
    everything = open_workspace(build(tmp_path / "all", corpus, tiny_bert, until="chunks", dedup_threshold=None))
    assert len(everything.documents) == 40 and everything.manifest["counts"]["near_duplicates_dropped"] == []


def test_neighbor_tokens_continuation_and_padding(built):
    ws = open_workspace(built[0])
    doc = next(d for d in ws.documents if ws.doc_offsets[d["doc"] + 1] - ws.doc_offsets[d["doc"]] >= 2)
    a, b = ws.doc_offsets[doc["doc"]], ws.doc_offsets[doc["doc"] + 1]
    tokens = ws.neighbor_tokens(np.array([[a, b - 1, -1]]))  # (1, 3, 2M)
    assert tokens.shape == (1, 3, 2 * M) and tokens.dtype == np.int64
    assert (tokens[0, 0, :M] == ws.chunks[a]).all() and (tokens[0, 0, M:] == ws.chunks[a + 1]).all()
    last = ws.chunks[b - 1].astype(np.int64)
    assert (tokens[0, 1, :M] == np.where(last == ws.pad_id, -1, last)).all()
    assert (tokens[0, 1, M:] == -1).all()  # the document ends: no continuation
    assert (tokens[0, 2] == -1).all()
    last_chunk = len(ws.chunks) - 1
    assert (ws.neighbor_tokens(np.array([last_chunk]))[0, M:] == -1).all()


def test_second_build_is_a_no_op(built, tiny_bert):
    root, corpus = built
    before = mtimes(root)
    build(root, corpus, tiny_bert)
    assert mtimes(root) == before


def test_two_builds_are_identical_and_resume_after_interrupt_is_too(tmp_path, built, tiny_bert, monkeypatch):
    root, corpus = built
    calls = {"n": 0}
    forward = BERTForChunkEmbeddings.forward

    def flaky(self, token_ids, on_batch=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("injected")
        return forward(self, token_ids, on_batch)

    monkeypatch.setattr(BERTForChunkEmbeddings, "forward", flaky)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "ws", corpus, tiny_bert)
    assert not open_workspace(tmp_path / "ws").manifest["stages"].get("embeddings")
    assert len(list((tmp_path / "ws" / "embeddings").glob("block_*.npy"))) == 2
    build(tmp_path / "ws", corpus, tiny_bert)
    expected, got = snapshot(root), snapshot(tmp_path / "ws")
    assert got.keys() == expected.keys()
    for name in expected:
        if name != "manifest.json":  # holds timings and the corpus path
            assert got[name] == expected[name], name


def test_new_num_neighbors_only_adds_its_neighbors(tmp_path, built, tiny_bert):
    root, corpus = built
    import shutil

    copy = tmp_path / "ws"
    shutil.copytree(root, copy)
    before = mtimes(copy)
    build(copy, corpus, tiny_bert, num_neighbors=3)
    assert open_workspace(copy).neighbors("train", 3, T).shape[1] == 3
    assert all(mtimes(copy)[p] == t for p, t in before.items() if p.name != "manifest.json")


@pytest.mark.parametrize(
    "setting, value", [("chunk_len", 4), ("tokenizer", "bytes"), ("index", "IVF4,Flat"), ("seed", 1)]
)
def test_settings_mismatch_is_refused_naming_the_setting(built, tiny_bert, setting, value):
    root, corpus = built
    before = snapshot(root)
    with pytest.raises(RetroError, match=f"built with {setting}="):
        build(
            root, corpus, tiny_bert, **{setting: value} | ({"seq_len": 16} if setting == "chunk_len" else {})
        )
    assert snapshot(root) == before


def test_changed_corpus_is_refused(built, tiny_bert, tiny_corpus):
    root, _ = built
    with pytest.raises(RetroError, match="built with corpus"):
        build(root, tiny_corpus("other.txt", seed=1), tiny_bert)


@pytest.mark.parametrize("damage", [lambda text: text[: len(text) // 2], lambda text: "[]", lambda text: "\xff"])
def test_a_damaged_manifest_is_one_error_line_naming_it(built, tmp_path, capsys, damage):
    root, corpus = built
    copy = tmp_path / "ws"
    shutil.copytree(root, copy)
    (copy / "manifest.json").write_text(damage((copy / "manifest.json").read_text()), encoding="latin-1")
    before = snapshot(copy)
    assert main(["build-db", "--corpus", str(corpus), "--workspace", str(copy), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {copy / 'manifest.json'}") and err.count("\n") == 1
    assert snapshot(copy) == before


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"chunk_len": 0}, "chunk_len must be > 0"),
        ({"num_neighbors": 0}, "num_neighbors must be > 0"),
        ({"index": "Nope,,"}, "invalid faiss index factory"),
        ({"chunk_len": 4096, "seq_len": 4096}, "shorter than one chunk"),
        ({"seq_len": 12}, "multiple of chunk_len"),
    ],
)
def test_bad_build_settings(tmp_path, tiny_bert, tiny_corpus, kw, message):
    corpus = tiny_corpus("c.txt")
    with pytest.raises(RetroError, match=message):
        build(tmp_path / "ws", corpus, tiny_bert, **kw)
    assert not (tmp_path / "ws" / "chunks.npy").exists()
    assert not list((tmp_path / "ws").glob("*.tmp"))


def test_unwritable_workspace_and_unknown_embedder(tmp_path, tiny_bert, tiny_corpus):
    corpus = tiny_corpus("c.txt")
    (tmp_path / "file").write_text("x")
    with pytest.raises(RetroError, match="not writable"):
        build(tmp_path / "file" / "ws", corpus, tiny_bert)
    with pytest.raises(RetroError, match="not available offline: pass a local model folder"):
        BERTForChunkEmbeddings(str(tmp_path / "no-such-bert"), "cpu")


def test_build_db_command_errors_return_2(tmp_path, capsys):
    assert (
        main(["build-db", "--corpus", str(tmp_path / "missing.txt"), "--workspace", str(tmp_path / "ws")]) == 2
    )
    err = capsys.readouterr().err
    assert err.startswith("error: corpus not found") and err.count("\n") == 1
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01")
    args = ["--corpus", str(tmp_path / "bin.txt"), "--workspace", str(tmp_path / "ws"), "--chunk_size", "-1"]
    assert main(["build-db", *args]) == 2
    assert main(["build-db", "--corpus", str(tmp_path / "bin.txt"), "--workspace", str(tmp_path / "ws")]) == 2
    assert "binary" in capsys.readouterr().err


def test_a_failed_first_build_does_not_pin_its_settings(tmp_path, tiny_bert, tiny_corpus):
    corpus = tmp_path / "c.txt"
    corpus.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(RetroError, match="not UTF-8"):
        build(tmp_path / "ws", corpus, tiny_bert)
    tiny_corpus(corpus.name)
    build(tmp_path / "ws", corpus, tiny_bert)
    assert open_workspace(tmp_path / "ws").manifest["stages"]["neighbors/k2_t32"]["done"]


def test_build_db_command_builds_with_a_local_embedder(tmp_path, tiny_corpus, tiny_bert_path, caplog):
    corpus = tiny_corpus("c.txt", n_docs=12)
    args = [
        "--corpus",
        str(corpus),
        "--workspace",
        str(tmp_path / "ws"),
        "--tokenizer",
        "bytes",
        "--chunk_size",
        "16",
        "--seq_len",
        "64",
        "--embedder",
        str(tiny_bert_path),
        "--trainer.accelerator",
        "cpu",
        "--quiet",
    ]
    assert main(["build-db", *args]) == 0
    ws = open_workspace(tmp_path / "ws")
    assert ws.manifest["settings"]["embedder"] == str(tiny_bert_path) and ws.neighbors("test", 2, 64).shape[1] == 2


@pytest.mark.parametrize("native", [True, False])
def test_cpu_embedder_defaults_to_bf16_only_where_the_cpu_has_bf16_units(tiny_bert, monkeypatch, native):
    monkeypatch.setattr("retro_lit.embedder.native_cpu_bf16", lambda: native)
    embedder = BERTForChunkEmbeddings(model=tiny_bert.model, tokenizer=tiny_bert.tokenizer, device="cpu")
    assert embedder.dtype == (torch.bfloat16 if native else torch.float32)


def test_keys_keep_the_precision_they_were_built_with(tmp_path, tiny_corpus, tiny_bert_path, tiny_bert, capsys):
    """The manifest records the keys' precision; a resume at another one is refused (one line, nothing written),
    `auto` and every later embedder (live queries, additions) use the recorded one, and a workspace from before the
    setting existed resumes at the precision its embeddings stage recorded."""
    corpus, root = tiny_corpus("c.txt", n_docs=12), tmp_path / "ws"
    args = ["build-db", "--corpus", str(corpus), "--workspace", str(root), "--tokenizer", "bytes", "--chunk_size", "16",
            "--seq_len", "64", "--embedder", str(tiny_bert_path), "--trainer.accelerator", "cpu", "--quiet"]
    assert main([*args, "--embedder_precision", "bf16"]) == 0
    ws = open_workspace(root)
    assert ws.manifest["settings"]["embedder_precision"] == ws.manifest["stages"]["embeddings"]["precision"] == "bfloat16"
    before = snapshot(root)
    capsys.readouterr()
    assert main([*args, "--embedder_precision", "32"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "embedder_precision='bfloat16', not 'float32'" in err
    assert snapshot(root) == before
    assert main(args) == 0 and snapshot(root) == before  # auto: the workspace's own precision
    assert workspace_embedder(ws.manifest, "cpu").dtype == torch.bfloat16
    legacy = read_manifest(root)
    del legacy["settings"]["embedder_precision"]
    write_manifest(root, legacy)
    assert main([*args, "--num_neighbors", "3"]) == 0  # a resume that adds neighbours, at bf16 again
    assert open_workspace(root).manifest["settings"]["embedder_precision"] == "bfloat16"


def test_retro_index_live_search(built, tiny_bert):
    ws = open_workspace(built[0])
    index = RetroIndex(built[0], M, bert=tiny_bert)
    a = ws.split_range("val")[0]
    result = index.search(torch.from_numpy(ws.chunks[a : a + 2].astype(np.int64)), k=3)
    assert result.ids.shape == (2, 3) and result.tokens.shape == (2, 3, 2 * M)
    assert (result.ids < ws.split_range("train")[1]).all() and np.all(np.diff(result.distances, axis=1) >= 0)
    assert result.doc_names[0][0] == ws.documents[result.doc_ids[0, 0]]["name"]
    text = workspace_tokenizer(ws).decode(ws.chunks[0][ws.chunks[0] != ws.pad_id])
    first = index.search([text], k=1)
    assert first.ids[0, 0] == 0 or first.distances[0, 0] < 1e-2  # a train chunk finds itself
    excluded = index.search([text], k=2, exclude_docs=[int(ws.chunk_doc[0])])
    assert int(ws.chunk_doc[0]) not in excluded.doc_ids[0].tolist()
    with pytest.raises(RetroError, match="chunk_len"):
        RetroIndex(built[0], M + 1, bert=tiny_bert).search(["x"])


def test_embedder_pools_over_real_tokens_only(tiny_bert):
    short, long = "river stone", " ".join(WORDS * 3)
    alone = tiny_bert([short])  # float32
    batched = tiny_bert([short, long])  # padded to the long text in one batch
    assert batched.shape == (2, 16) and batched.dtype == torch.float32
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)


def test_embedder_reports_each_batch_for_progress_within_a_block(tiny_bert):
    texts = [" ".join(WORDS[: 1 + i % 10]) for i in range(70)]
    done = []
    keys = tiny_bert.forward(tiny_bert.tokenize(texts), on_batch=done.append)  # batch_size 32
    assert done == [32, 32, 6] and keys.shape == (70, 16)


def test_real_minilm_matches_manual_mean_pooling(caplog):
    with caplog.at_level(logging.WARNING):
        bert = BERTForChunkEmbeddings(None, "cuda" if not torch.cuda.is_available() else "cpu")
    assert bert.dim == 384 and bert.device.type == "cpu"
    assert torch.cuda.is_available() or "CUDA is not available" in caplog.text
    texts = ["The kernel schedules tasks.", "Retrieval helps language models with facts."]
    keys = bert(texts)
    x = bert.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        hidden = bert.model(**x).last_hidden_state
    mask = x["attention_mask"].unsqueeze(-1).float()
    manual = (hidden * mask).sum(1) / mask.sum(1)
    assert torch.nn.functional.cosine_similarity(keys, manual).min() > 0.99  # bf16 autocast vs fp32
