"""Damaged workspaces: every file recorded with its size and sha256, a damaged one named in one line by every command
that reads the workspace, `build-db --verify` (and `--verify_sample`) and `--repair`, which redoes only what is damaged
and ends with the bytes of a workspace never damaged."""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from helpers import build, make_corpus, snapshot
from retro_lit.additions import add_documents
from retro_lit.commands import main
from retro_lit.embedder import BERTForChunkEmbeddings
from retro_lit.repair import repair_workspace, verify_workspace
from retro_lit.verify import check_files, checked_workspace
from retro_lit.workspace import RetroError, file_record, read_manifest, write_manifest

BLOCK = "embeddings/block_00001.npy"


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bert(tiny_bert_path):
    """The tiny BERT loaded from its folder, so that `--repair` and `--verify_sample` can load it by the manifest's
    name; float32 like the manifest's record of it."""
    return BERTForChunkEmbeddings(str(tiny_bert_path), "cpu", batch_size=32, dtype=torch.float32)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, bert):
    """(a workspace built without a fault, the same grown by an addition); read only."""
    tmp = tmp_path_factory.mktemp("verify")
    built = build(tmp / "built", make_corpus(tmp / "corpus.txt"), bert)
    shutil.copytree(built, tmp / "grown")
    add_documents(tmp / "grown", make_corpus(tmp / "new.txt", 12, seed=5), bert, recompute_neighbors=True)
    return built, tmp / "grown"


def damaged_copy(source, dest, name, how):
    shutil.copytree(source, dest)
    path = dest / name
    if how == "truncate":
        with open(path, "r+b") as f:
            f.truncate(100)
    elif how == "flip":  # the same size: only the hash can tell
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()
    return dest


def cli(capsys, *args):
    rc = main(list(map(str, args)))
    out, err = capsys.readouterr()
    return rc, out, err


def test_the_manifest_records_every_file_a_stage_wrote(reference):
    for root in reference:
        files = read_manifest(root)["files"]
        on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()} - {"manifest.json"}
        assert set(files) == on_disk
        assert all(file_record(root / name) == record for name, record in files.items())  # the grown files renewed


@pytest.mark.parametrize("name, how", [
    ("chunks.npy", "truncate"), ("documents.jsonl", "flip"), ("tokenizer.json", "delete"), (BLOCK, "truncate"),
    (BLOCK, "flip"), ("index.faiss", "flip"), ("neighbors/k2_t32/train.npy", "truncate"),
])
def test_repair_redoes_the_damaged_unit_and_restores_the_bytes(reference, tmp_path, capsys, name, how):
    built, _ = reference
    ws = damaged_copy(built, tmp_path / "ws", name, how)
    rc, out, err = cli(capsys, "build-db", "--workspace", ws, "--verify")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and name in err and "--repair" in err, err
    untouched = {p: os.stat(ws / p).st_mtime_ns for p in snapshot(ws) if p != name and p != "manifest.json"}
    rc, out, err = cli(capsys, "build-db", "--workspace", ws, "--repair", "--quiet")
    assert rc == 0, err
    assert snapshot(ws) == snapshot(built)
    if name == BLOCK or name.startswith("neighbors/"):  # only the damaged file was written again
        assert {p: os.stat(ws / p).st_mtime_ns for p in untouched} == untouched
    rc, out, err = cli(capsys, "build-db", "--workspace", ws, "--verify")
    assert rc == 0 and "sizes and sha256 as recorded" in out


def test_a_plain_rerun_and_the_readers_refuse_a_truncated_file(reference, tmp_path, bert):
    built, _ = reference
    ws = damaged_copy(built, tmp_path / "ws", BLOCK, "truncate")
    with pytest.raises(RetroError, match=rf"{BLOCK} truncated \(100 of [\d,]+ bytes\).*--repair.*embedding block 1"):
        build(ws, read_manifest(ws)["settings"]["corpus"], bert)  # the fast check: no hashes needed
    with pytest.raises(RetroError, match=BLOCK):
        checked_workspace(ws)  # what fit's data module, evaluate, generate and diagnose open
    with pytest.raises(RetroError, match=BLOCK):
        add_documents(ws, make_corpus(tmp_path / "new.txt", 4, seed=9), bert)
    assert (ws / BLOCK).stat().st_size == 100  # refused before any write


def test_evaluate_names_the_damaged_file(tiny_workspace, tmp_path, capsys):
    ws = damaged_copy(tiny_workspace.root, tmp_path / "ws", "neighbors/k2_t16/test.npy", "truncate")
    rc, _, err = cli(capsys, "evaluate", "--workspace", ws, "--ckpt_path", tiny_workspace.ckpt)
    assert rc == 2 and "neighbors/k2_t16/test.npy truncated" in err and "Traceback" not in err


def test_a_workspace_without_records_still_gets_the_header_checks(reference, tmp_path):
    ws = damaged_copy(reference[0], tmp_path / "ws", "chunks.npy", "truncate")
    manifest = read_manifest(ws)
    del manifest["files"]  # written before sizes and hashes were recorded
    write_manifest(ws, manifest)
    assert [(d.file, d.unit) for d in check_files(ws, manifest)] == [("chunks.npy", ("chunks",))]


def test_repair_of_a_grown_workspace_replays_its_additions(reference, tmp_path, bert):
    _, grown = reference
    ws = tmp_path / "ws"
    shutil.copytree(grown, ws)
    size = read_manifest(ws)["settings"]["block_size"]
    first = read_manifest(ws)["additions"][0]["range"][0]
    shared = f"embeddings/block_{first // size:05d}.npy"  # the build's last block, grown by the addition
    for name in ("chunks.npy", shared, "index.faiss", "neighbors/k2_t32/val.npy"):
        (ws / name).write_bytes((ws / name).read_bytes()[:-7])
    damage = repair_workspace(ws, lambda info: bert)
    assert {d.file for d in damage} == {"chunks.npy", shared, "index.faiss", "neighbors/k2_t32/val.npy"}
    assert snapshot(ws) == snapshot(grown)


def test_verify_sample_recomputes_blocks_and_parts_bit_for_bit(reference, tmp_path, bert, capsys):
    built, _ = reference
    rc, out, err = cli(capsys, "build-db", "--workspace", built, "--verify", "--verify_sample", 1.0)
    n_blocks = len(list((built / "embeddings").glob("*.npy")))
    assert rc == 0 and f"recomputed {n_blocks} embedding blocks" in out and "bit for bit the same" in out, err
    ws = tmp_path / "ws"
    shutil.copytree(built, ws)
    keys = np.load(ws / BLOCK)
    keys[3, 0] += 1  # keys that a faulty build wrote and recorded: the hashes agree, the recomputation does not
    np.save(ws / BLOCK, keys)
    manifest = read_manifest(ws)
    manifest["files"][BLOCK] = file_record(ws / BLOCK)
    write_manifest(ws, manifest)
    report = verify_workspace(ws, lambda info: bert, sample=1.0)
    assert report["damaged"] == [] and report["mismatched"][0] == "embedding block 1 (recomputed keys differ)"
    assert report["mismatched"][1:] == ["neighbors/k2_t32 train rows 64-128 (searched again, other neighbours)"]


def test_a_damaged_manifest_is_one_line(reference, tmp_path, capsys):
    ws = tmp_path / "ws"
    shutil.copytree(reference[0], ws)
    (ws / "manifest.json").write_text(json.dumps({"stages": {}})[:9])
    rc, _, err = cli(capsys, "build-db", "--workspace", ws, "--verify")
    assert rc == 2 and "manifest.json is damaged" in err and len(err.strip().splitlines()) == 1
