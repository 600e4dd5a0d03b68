import gzip
import json

import numpy as np
import pytest

from retro_lit import corpus
from retro_lit.corpus import corpus_fingerprint, iter_documents, split_documents
from retro_lit.workspace import RetroError


def test_plain_text_splits_at_two_or_more_empty_lines(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("doc one\n\nstill one\n\n\ndoc two\n \n\t\n\n\ndoc three\n", encoding="utf-8")
    docs = list(iter_documents(path))
    assert [d.name for d in docs] == ["text.txt#0", "text.txt#1", "text.txt#2"]
    assert docs[0].text == "doc one\n\nstill one"
    assert docs[2].text == "doc three\n"


def test_folder_is_recursive_sorted_decompresses_and_skips_hidden(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    with gzip.open(tmp_path / "b" / "c.rst.gz", "wt", encoding="utf-8") as f:
        f.write("second")
    (tmp_path / ".hidden").write_text("never", encoding="utf-8")
    assert [(d.name, d.text) for d in iter_documents(tmp_path)] == [("a.txt", "first"), ("b/c.rst", "second")]
    assert [d.name for d in iter_documents(tmp_path, glob="**/*.txt")] == ["a.txt"]


def test_jsonl_parquet_and_hf_dataset_keep_ids(tmp_path):
    rows = [{"id": "x7", "text": "alpha"}, {"id": "y8", "text": "beta"}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    assert [(d.name, d.text) for d in iter_documents(tmp_path / "d.jsonl")] == [
        ("x7", "alpha"),
        ("y8", "beta"),
    ]

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["one", "two"]}), tmp_path / "d.parquet")
    assert [d.name for d in iter_documents(tmp_path / "d.parquet", text_column="body")] == [
        "d.parquet#0",
        "d.parquet#1",
    ]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    assert [(d.name, d.text) for d in iter_documents(tmp_path / "hf")] == [("x7", "alpha"), ("y8", "beta")]
    with pytest.raises(RetroError, match="no 'content' column"):
        list(iter_documents(tmp_path / "hf", text_column="content"))


def test_shakespeare_is_one_document_per_play():
    docs = list(iter_documents("shakespeare"))
    assert len(docs) >= 37 and "tragedies/hamlet" in {d.name for d in docs}


def test_linux_doc_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(corpus, "LINUX_DOC_DIR", tmp_path / "absent")
    with pytest.raises(RetroError, match="apt-get install -y linux-doc-6.1"):
        list(iter_documents("linux-doc"))


@pytest.mark.parametrize(
    "content, message",
    [(None, "not found"), (b"", "empty file"), (b"ab\x00cd", "binary"), (b"caf\xe9 ok", "not UTF-8")],
)
def test_bad_files_raise_one_clear_line(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RetroError, match=message):
        list(iter_documents(path))
    assert issubclass(RetroError, ValueError)


def test_split_is_seeded_by_document_and_never_empty():
    labels = split_documents(20, (0.8, 0.1, 0.1), seed=3)
    assert np.array_equal(labels, split_documents(20, (0.8, 0.1, 0.1), seed=3))
    assert not np.array_equal(labels, split_documents(20, (0.8, 0.1, 0.1), seed=4))
    assert np.bincount(labels).tolist() == [16, 2, 2]
    assert np.bincount(split_documents(3, (0.98, 0.01, 0.01), seed=0)).tolist() == [1, 1, 1]
    assert split_documents(1, (1.0, 0.0, 0.0), seed=0).tolist() == [0]
    with pytest.raises(RetroError, match="needs at least 3"):
        split_documents(2, (0.9, 0.05, 0.05), seed=0)
    with pytest.raises(RetroError, match="summing to 1"):
        split_documents(10, (0.5, 0.1, 0.1), seed=0)


def test_fingerprint_follows_content(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("abc", encoding="utf-8")
    first = corpus_fingerprint(path)
    assert corpus_fingerprint(path) == first
    path.write_text("abd", encoding="utf-8")
    assert corpus_fingerprint(path) != first


def test_python_stdlib_is_one_document_per_source_file_without_tests():
    docs = {d.name: d.text for d in iter_documents("python-stdlib:json,email")}
    assert "json/decoder.py" in docs and "email/message.py" in docs
    assert not any(name.startswith(("test/", "site-packages/")) or "/tests/" in name for name in docs)
    assert all(text.strip() for text in docs.values())  # empty __init__.py files are left out
    assert set(name.split("/")[0] for name in docs) == {"json", "email"}
    assert corpus_fingerprint("python-stdlib:json") != corpus_fingerprint("python-stdlib:email")
    with pytest.raises(RetroError, match="python-stdlib:nope"):
        list(iter_documents("python-stdlib:nope"))


def test_near_duplicate_training_documents_are_found():
    rng = np.random.default_rng(0)
    words = [" ".join(f"w{i}" for i in rng.integers(0, 5000, 400)) for _ in range(4)]
    edited = words[0].split()
    edited[200] = "changed"  # one word of 400: 13 of ~388 13-grams differ, Jaccard ~0.94
    texts = [words[0], " ".join(edited), words[1], words[2], words[3] + " " + words[2]]
    labels = np.array([2, 0, 0, 1, 0], dtype=np.int8)  # 0 test, 1 near-copy of it (train), 2 other, 3 val, 4 half
    minhash = corpus.MinHash()
    drop = corpus.near_duplicate_train_documents(np.stack([minhash(t) for t in texts]), labels, threshold=0.8)
    assert drop.tolist() == [False, True, False, False, False]  # held-out ones are never dropped; 4 is ~0.5
