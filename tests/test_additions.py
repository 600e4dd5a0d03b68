"""Growing the retrieval database of a built workspace (retro_lit.additions): exact search over old + new keys,
untouched training data, byte-identical resumes and refusals."""

import json
import shutil

import faiss
import numpy as np
import pytest
import torch
from helpers import K, M, T, WORDS, build, make_corpus, snapshot, tiny_bert

from retro_lit.additions import add_documents, add_documents_command
from retro_lit.build import build_summary
from retro_lit.generate import format_retrieval
from retro_lit.index import RetroIndex, index_files, load_index
from retro_lit.neighbors import excluded_ranges
from retro_lit.tokenizer import workspace_tokenizer
from retro_lit.workspace import RetroError, open_workspace

TIMINGS = {"seconds", "chunks_per_s", "queries_per_s"}


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def workspace_and_embedder(tmp_path_factory):
    """A Flat workspace (blocks of 64 chunks, the last one short), a corpus of new documents for it, its embedder."""
    tmp, embedder = tmp_path_factory.mktemp("grow"), tiny_bert()
    return build(tmp / "ws", make_corpus(tmp / "corpus.txt"), embedder), make_corpus(tmp / "new.txt", 12, seed=5), embedder


@pytest.fixture
def built(workspace_and_embedder):
    return workspace_and_embedder[:2]  # (workspace, new documents)


@pytest.fixture
def embedder(workspace_and_embedder):
    return workspace_and_embedder[2]


def grown(tmp_path, built, embedder, **kw):
    """A copy of the built workspace with the new documents added; returns its path."""
    root, new = built
    copy = tmp_path / "ws"
    shutil.copytree(root, copy)
    add_documents(copy, new, embedder=embedder, **kw)
    return copy


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    return [without_timings(v) for v in value] if isinstance(value, list) else value


def test_live_neighbors_after_an_addition_equal_brute_force_over_old_and_new_keys(tmp_path, built, embedder):
    ws = open_workspace(grown(tmp_path, built, embedder))
    (_, n_train), (first, end) = ws.database_ranges()
    assert (first, end) == (ws.split_range("test")[1], len(ws.chunks)) and ws.manifest["additions"][0]["done"]
    decode = workspace_tokenizer(ws).decode
    queries = [decode(row[row != ws.pad_id]) for row in ws.chunks[[0, n_train + 3, first + 1, end - 1]]]
    queries += [" ".join(WORDS[i:i + 4]) for i in range(0, 9, 3)]
    found = RetroIndex(ws.root, M, bert=embedder).search(queries, k=6)
    keys = np.concatenate([ws.embeddings(0, n_train), ws.embeddings(first, end)])  # (N, E): train, then added
    ids = np.concatenate([np.arange(n_train), np.arange(first, end)])
    exact_d, exact_i = faiss.knn(embedder(queries).numpy(), keys, 6)  # (Q, 6)
    np.testing.assert_allclose(found.distances, exact_d, rtol=1e-5, atol=1e-6)
    unique = np.abs(np.diff(exact_d, axis=1, prepend=-1, append=np.inf)) > 1e-6  # a distance no other key ties
    assert (found.ids[unique[:, :-1] & unique[:, 1:]] == ids[exact_i][unique[:, :-1] & unique[:, 1:]]).all()
    assert (found.ids >= first).any() and not ((found.ids >= n_train) & (found.ids < first)).any()
    assert found.doc_sources[2][0] == "new.txt" and found.distances[2, 0] < 1e-4  # an added chunk finds itself


def test_added_documents_round_trip_and_are_named_as_added(tmp_path, built, embedder):
    ws = open_workspace(grown(tmp_path, built, embedder))
    entry = ws.additions[0]
    texts = built[1].read_text(encoding="utf-8").split("\n\n\n")
    added = ws.documents[entry["first_doc"]:]
    assert entry["documents"] == len(added) == len(texts) and entry["chunks"] == entry["range"][1] - entry["range"][0]
    for doc, text in zip(added, texts):
        assert doc["split"] == "added" and doc["addition"] == "new.txt"
        rows = ws.chunks[ws.doc_offsets[doc["doc"]]:ws.doc_offsets[doc["doc"] + 1]].reshape(-1)
        assert workspace_tokenizer(ws).decode(rows[: doc["n_tokens"]]).strip() == text.strip()
    first_added = torch.from_numpy(ws.chunks[[entry["range"][0]]].astype(np.int64))  # (1, M)
    found = RetroIndex(ws.root, M, bert=embedder).search(first_added)
    report = format_retrieval(0, torch.zeros(1, M, dtype=torch.long), found, workspace_tokenizer(ws), M)
    assert "(added: new.txt)" in report


def test_a_retro_index_made_before_an_addition_searches_the_grown_database(tmp_path, built, embedder):
    root, new = built
    copy = tmp_path / "ws"
    shutil.copytree(root, copy)
    index = RetroIndex(copy, M, bert=embedder)
    lm_tokenizer = workspace_tokenizer(open_workspace(copy))
    query = lm_tokenizer.decode(lm_tokenizer.encode(new.read_text(encoding="utf-8").split("\n\n\n")[0])[M : 2 * M])
    assert index.search([query], k=2).doc_sources == [["train", "train"]]
    add_documents(copy, new, embedder=embedder)
    assert index.search([query], k=2).doc_sources[0][0] == "new.txt"


def test_an_addition_leaves_training_data_and_old_keys_as_they_were(tmp_path, built, embedder):
    root = built[0]
    before, after = snapshot(root), snapshot(grown(tmp_path, built, embedder))
    for name in before:
        if name.startswith(("neighbors/", "tokenizer")) or name in ("embeddings/block_00000.npy",):
            assert after[name] == before[name], name  # precomputed neighbours, tokenizer, full blocks: same bytes
    old, new = open_workspace(root), open_workspace(tmp_path / "ws")
    n = len(old.chunks)
    assert np.array_equal(new.chunks[:n], old.chunks) and np.array_equal(new.chunk_doc[:n], old.chunk_doc)
    assert np.array_equal(new.embeddings(0, n), old.embeddings(0, n))  # the short last block kept its keys
    assert new.manifest["splits"] == old.manifest["splits"] and new.manifest["counts"] == old.manifest["counts"]
    assert new.documents[: len(old.documents)] == old.documents


@pytest.mark.parametrize("fault", ["chunks", "block", "embeddings", "index"])
def test_a_killed_addition_reruns_to_the_files_of_an_uninterrupted_one(tmp_path, built, embedder, fault):
    root, new = built
    expected = snapshot(grown(tmp_path / "whole", built, embedder))
    copy = tmp_path / "killed"
    shutil.copytree(root, copy)

    def kill_after_first_block(path):
        raise KeyboardInterrupt("injected")

    def kill_after(step):
        if step == fault:
            raise KeyboardInterrupt("injected")

    with pytest.raises(KeyboardInterrupt):
        add_documents(copy, new, embedder=embedder, on_block=kill_after_first_block if fault == "block" else None,
                      on_step=kill_after)
    assert not open_workspace(copy).manifest["additions"][0]["done"]
    add_documents(copy, new, embedder=embedder)
    got = snapshot(copy)
    assert got.keys() == expected.keys()
    for name in expected:
        if name != "manifest.json":
            assert got[name] == expected[name], name
    manifests = [without_timings(json.loads(files["manifest.json"])) for files in (got, expected)]
    assert manifests[0] == manifests[1]


def test_refused_additions_leave_the_workspace_byte_identical(tmp_path, built, embedder):
    root = grown(tmp_path, built, embedder)
    _, new = built
    before = snapshot(root)
    other = make_corpus(tmp_path / "other.txt", n_docs=3, seed=9)
    cases = [
        (dict(corpus=new), "was added to workspace .* already, as 'new.txt'"),
        (dict(corpus=tmp_path / "ws" / ".." / "whole.txt"), "corpus not found"),
        (dict(corpus=built[0].parent / "corpus.txt"), "is the corpus workspace .* was built from"),
        (dict(corpus=other, embedder=tiny_bert("other-bert")), "built with embedder='tiny-bert', not 'other-bert'"),
        (dict(corpus=other, name="new.txt"), "has an addition named 'new.txt' already"),
    ]
    for kw, message in cases:
        with pytest.raises(RetroError, match=message):
            add_documents(root, **{"embedder": embedder} | kw)
        assert snapshot(root) == before, kw
    for kw, message in [  # the command's flags, checked before its embedder loads
        (dict(chunk_size=M * 2), "built with chunk_len=8, not 16"),
        (dict(tokenizer="bytes"), "built with tokenizer='bpe:300', not 'bytes'"),
        (dict(embedder="other-bert"), "built with embedder='tiny-bert', not 'other-bert'"),
    ]:
        with pytest.raises(RetroError, match=message):
            add_documents_command(str(root), str(other), **kw)
        assert snapshot(root) == before, kw
    unbuilt = build(tmp_path / "unbuilt", built[0].parent / "corpus.txt", embedder, until="embeddings")
    before = snapshot(unbuilt)
    with pytest.raises(RetroError, match="has no built index"):
        add_documents(unbuilt, other, embedder=embedder)
    assert snapshot(unbuilt) == before


def test_an_unfinished_addition_must_be_finished_before_another(tmp_path, built, embedder):
    root, new = built
    copy = tmp_path / "ws"
    shutil.copytree(root, copy)

    def kill(step):
        raise KeyboardInterrupt("injected")

    with pytest.raises(KeyboardInterrupt):
        add_documents(copy, new, embedder=embedder, on_step=kill)
    before = snapshot(copy)
    with pytest.raises(RetroError, match="the addition 'new.txt' of .* is unfinished: rerun it"):
        add_documents(copy, make_corpus(tmp_path / "other.txt", n_docs=3, seed=9), embedder=embedder)
    assert snapshot(copy) == before


def test_two_additions_and_a_recompute_of_the_neighbors(tmp_path, built, embedder):
    """The second addition goes after the first; with recompute_neighbors every split's neighbours are an exact
    search over the grown database, and training windows still never retrieve their own documents."""
    root = grown(tmp_path, built, embedder)
    add_documents(root, make_corpus(tmp_path / "more.txt", n_docs=5, seed=7), embedder=embedder,
                  recompute_neighbors=True)
    ws = open_workspace(root)
    ranges = ws.database_ranges()
    assert len(ranges) == 3 and ranges[1][1] == ranges[2][0] == ws.additions[1]["first_chunk"]
    summary = build_summary(root, K, T)
    assert summary["added_documents"] == 12 + 5 and summary["added_chunks"] == len(ws.chunks) - ranges[1][0]
    info = ws.manifest["stages"][f"neighbors/k{K}_t{T}"]
    assert info["additions"] == 2 and ws.additions[1]["stages"]["neighbors"]["sets"] == [f"neighbors/k{K}_t{T}"]
    keys = np.concatenate([ws.embeddings(a, b) for a, b in ranges])  # (N, E)
    ids = np.concatenate([np.arange(a, b) for a, b in ranges])
    first, end = ws.split_range("test")
    nbrs = ws.neighbors("test", K, T)  # (n_test, K)
    exact_d, exact_i = faiss.knn(ws.embeddings(first, end), keys, K)
    found_d = ((ws.embeddings(first, end)[:, None] - ws.embeddings_at(nbrs.reshape(-1)).reshape(*nbrs.shape, -1)) ** 2)
    np.testing.assert_allclose(found_d.sum(-1), exact_d, rtol=1e-4, atol=1e-5)
    assert np.isin(ids[exact_i], np.arange(ranges[1][0], len(ws.chunks))).any()  # added chunks are retrieved
    train = ws.neighbors("train", K, T)
    lo, hi = excluded_ranges(ws, "train", T)
    assert ((train < lo[:, None]) | (train >= hi[:, None])).all()


def test_an_ivf_index_takes_the_new_keys_with_their_ids_and_recall_is_measured_again(tmp_path, built, embedder):
    root = build(tmp_path / "ivf", built[0].parent / "corpus.txt", embedder, index="IVF4,Flat")
    add_documents(root, built[1], embedder=embedder)
    ws = open_workspace(root)
    index = load_index(index_files(ws.root, ws.manifest["stages"]["index"]), nprobe=4)  # every list: exact
    (_, n_train), (first, end) = ws.database_ranges()
    assert type(index).__name__ == "IndexIVFFlat" and index.ntotal == n_train + end - first
    d, i = index.search(ws.embeddings(first, end), 1)  # each added chunk finds itself, or a chunk with its key
    assert (d[:, 0] < 1e-6).all() and (i[:, 0] >= first).mean() > 0.8
    assert (i[:, 0] >= 0).all() and np.array_equal(ws.embeddings_at(i[:, 0]), ws.embeddings(first, end))
    entry = ws.additions[0]["stages"]["index"]
    assert entry["ntotal"] == index.ntotal and 0.5 <= entry["recall"] <= 1.0 and entry["nprobe"] is not None


def test_a_sharded_index_is_refused(tmp_path, built, embedder):
    copy = tmp_path / "ws"
    shutil.copytree(built[0], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["stages"]["index"]["shards"] = 2
    (copy / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(copy)
    with pytest.raises(RetroError, match="sharded index"):
        add_documents(copy, built[1], embedder=embedder)
    assert snapshot(copy) == before


# ----------------------------------------------------------------------------- evaluation over the grown database

LETTERS = "abcdefghijklmnopqrstuvwxyz "


def letters_workspace(root, n_docs=30, doc_len=160):
    """Documents of random letters and spaces, byte tokens, M = 4, keys from a random 1-layer BERT that reads
    letter by letter (so that every chunk text has its own key); returns (workspace, embedder)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from retro_lit.build import build_workspace
    from retro_lit.embedder import BERTForChunkEmbeddings

    letters = list(LETTERS.strip())
    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters)]))
    torch.manual_seed(0)
    bert = BertModel(BertConfig(vocab_size=5 + 2 * len(letters), hidden_size=16, num_hidden_layers=1,
                                num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))
    embedder = BERTForChunkEmbeddings("letters-bert", "cpu", model=bert, tokenizer=BertTokenizerFast(str(vocab)),
                                      dtype=torch.float32)
    rng = np.random.default_rng(0)
    docs = ["".join(rng.choice(list(LETTERS), doc_len)).strip() for _ in range(n_docs)]
    (root / "corpus.txt").write_text("\n\n\n".join(docs))
    ws = build_workspace(root / "ws", root / "corpus.txt", tokenizer="bytes", chunk_len=4, embedder=embedder,
                         index="Flat", num_neighbors=2, seq_len=32, split=(0.7, 0.15, 0.15), quiet=True)
    return ws, embedder


def test_evaluation_retrieves_the_test_documents_once_they_are_added(tmp_path, monkeypatch):
    """The leakage case: test documents added to the database are other documents, so live retrieval finds them
    (every test chunk then has an exact copy among its neighbours); `auto` leaves the outdated precomputed files."""
    from retro_lit.evaluate import LEAKAGE_K, Scorer, choose_neighbors, evaluate_documents, workspace_documents
    from retro_lit.model import RetroConfig, RetroModel

    root, embedder = letters_workspace(tmp_path)
    monkeypatch.setattr("retro_lit.index.workspace_embedder", lambda *args, **kwargs: embedder)  # live search
    model = RetroModel.from_config(RetroConfig(vocab_size=257, chunk_size=4, d_model=16, n_layer=2, n_head=2,
                                               head_dim=8, d_ff=32, cca_layers=(1,), enc_n_layer=1)).eval()
    ws = open_workspace(root)
    decode = workspace_tokenizer(ws).decode
    docs = list(workspace_documents(ws, "test"))
    copies = tmp_path / "copies.jsonl"
    copies.write_text("".join(json.dumps({"name": f"copy of {d.name}", "text": decode(d.tokens.tolist())}) + "\n"
                              for d in docs))

    def overlap_kept(ws):
        neighbors_of, how = choose_neighbors(ws, "test", "auto", 2, LEAKAGE_K, 32)
        result = evaluate_documents({"on": Scorer(model, 2)}, docs, neighbors_of, np.ones(257), 32, 4, LEAKAGE_K,
                                    alphas=(0.5,))
        return how, result["kept_fraction"][0.5]

    how, kept = overlap_kept(ws)
    assert how.startswith("precomputed") and kept > 0.5
    add_documents(root, copies, embedder=embedder)
    how, kept = overlap_kept(open_workspace(root))
    assert how == "live" and kept == 0.0  # r(C) = 1 for every test chunk: its copy is retrieved
    assert choose_neighbors(open_workspace(root), "test", "precomputed", 2, 2, 32)[1] == "precomputed k2_t32"


def train_copier(steps=600, copy_rate=0.5, seed=0):
    """A tiny RETRO (M = 4, T = 32, k = 2) trained on random letters: for a `copy_rate` share of the chunks one of
    the two neighbour slots holds an aligned copy of the chunk and its continuation, the rest is random letters.
    Beyond letter frequencies, all it can learn is to copy a neighbour that matches its chunk."""
    from retro_lit.model import RetroConfig, RetroModel

    torch.manual_seed(seed)
    M, T = 4, 32
    letters = torch.tensor([ord(c) for c in LETTERS])
    model = RetroModel.from_config(RetroConfig(vocab_size=257, chunk_size=M, d_model=64, n_layer=2, n_head=4,
                                               head_dim=16, d_ff=128, cca_layers=(1,), enc_n_layer=1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        tokens = letters[torch.randint(0, len(letters), (32, T + M + 1))]  # (B, T + M + 1)
        own = torch.stack([tokens[:, u * M:(u + 2) * M] for u in range(T // M)], 1)  # (B, L, R)
        other = letters[torch.randint(0, len(letters), own.shape)]  # (B, L, R)
        own = torch.where(torch.rand(len(tokens), T // M, 1) < copy_rate, own, other.roll(1, 0))  # a copy, or not
        swap = torch.rand(len(tokens), T // M, 1, 1) < 0.5
        neighbors = torch.where(swap, torch.stack([other, own], 2), torch.stack([own, other], 2))  # (B, L, K, R)
        loss, _ = model.loss(tokens[:, :T], tokens[:, 1:T + 1], neighbors)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.mark.slow
def test_leakage_demonstration_with_a_model_that_copies(tmp_path):
    """ON drops sharply once the database holds the test documents, OFF stays exactly where it was, and bpb(alpha)
    puts the drop on the high-overlap chunks; from the original database the copier gains nothing."""
    from retro_lit.evaluate import leakage_demonstration

    root, embedder = letters_workspace(tmp_path)
    result = leakage_demonstration(root, train_copier(), tmp_path / "scratch", seq_len=32, k=2, embedder=embedder,
                                   alphas=(0.5,))
    runs = {name: r["models"] for name, r in result["databases"].items()}
    ratio = {name: m["on"]["bpb"] / m["off"]["bpb"] for name, m in runs.items()}
    assert runs["original"]["off"]["bpb"] == runs["test documents"]["off"]["bpb"] == runs["edited copies"]["off"]["bpb"]
    assert 0.9 < ratio["original"] < 1.2 and ratio["test documents"] < 0.75  # measured: 1.09, 0.67
    assert result["databases"]["test documents"]["kept_fraction"][0.5] == 0.0  # each chunk retrieves its copy
    edited = result["databases"]["edited copies"]["models"]
    above, rest = (edited["on"][key][0.5] / edited["off"][key][0.5] for key in ("bpb_above_alpha", "bpb_alpha"))
    assert above < 0.8 and rest > 0.9  # the drop is on the chunks the edited copies let it copy (0.71, 1.09)
    assert ratio["test documents"] < ratio["edited copies"] < ratio["original"]
    assert open_workspace(root).manifest.get("additions") is None  # the copies went into copies of the workspace
