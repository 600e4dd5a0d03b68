"""Faults a build or an addition meets: a second writer (the workspace lock), SIGKILL at each stage and step, a full
disk. Each run is checked the same way: a clear message or none, and a rerun that ends with the files of a run never
interrupted, no *.tmp left.

A killed run is a child process (CHILD below) that SIGKILLs itself at a hook point: the distributed build's
`on_file`, the addition's `on_block`/`on_step`, or (where no hook is) just before or after a file is renamed into
place. A full disk is real: the file's `*.tmp` is planted as a link to /dev/full, whose writes fail with ENOSPC.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import K, M, T, build, make_corpus, snapshot
from retro_lit.additions import add_documents
from retro_lit.commands import main
from retro_lit.workspace import LOCK, RetroError, workspace_lock

TIMINGS = {"seconds", "chunks_per_s", "queries_per_s", "world_size"}  # (world_size: the distributed build's)
SRC = Path(__file__).parents[1] / "src"

CHILD = f"""
import os, signal, sys, time
from pathlib import Path
import torch
import helpers
from retro_lit.additions import add_documents
from retro_lit.distributed import build_workspace_distributed

torch.set_num_threads(1)
task, root, corpus, fault = sys.argv[1:]
kind, _, where = fault.partition(":")

def die(*_):
    if kind == "hold":  # keep the workspace's lock until the test kills us
        print("holding", flush=True)
        time.sleep(600)
    os.kill(os.getpid(), signal.SIGKILL)

replace = os.replace
def replace_or_die(src, dst):  # no hook here: die just before or just after `where` is renamed into place
    if kind == "before" and Path(dst).name == where:
        die()
    replace(src, dst)
    if kind == "after" and Path(dst).name == where:
        die()
os.replace = replace_or_die

bert = helpers.tiny_bert(dtype=torch.float32)  # conftest's tiny_bert
if task == "build":  # helpers.build's settings; with on_file, the distributed build's path in this one process
    on_file = lambda stage, rank, path: die() if kind in ("file", "hold") and stage == where else None
    build_workspace_distributed(root, corpus, embedder=bert, on_file=on_file, tokenizer="bpe:300", chunk_len={M},
                                num_neighbors={K}, seq_len={T}, block_size=64, quiet=True)
else:
    add_documents(root, corpus, bert, recompute_neighbors=True, on_block=die if kind == "block" else None,
                  on_step=lambda step: die() if kind == "step" and step == where else None)
"""


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert):
    """(corpus, new documents, a workspace built without a fault, the same with the new documents added)."""
    tmp = tmp_path_factory.mktemp("faults")
    corpus, new = make_corpus(tmp / "corpus.txt"), make_corpus(tmp / "new.txt", 12, seed=5)
    built = build(tmp / "built", corpus, tiny_bert)
    shutil.copytree(built, tmp / "grown")
    add_documents(tmp / "grown", new, tiny_bert, recompute_neighbors=True)
    return corpus, new, built, tmp / "grown"


def start_child(tmp_path, task, root, corpus, fault) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent)])}
    return subprocess.Popen([sys.executable, str(script), task, str(root), str(corpus), fault], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def killed(tmp_path, task, root, corpus, fault) -> None:
    """Run the build (task "build") or the addition ("add") in a child that SIGKILLs itself at `fault`."""
    child = start_child(tmp_path, task, root, corpus, fault)
    _, err = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, err


def without_timings(value):
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    return [without_timings(v) for v in value] if isinstance(value, list) else value


def assert_same_files(root: Path, expected_root: Path) -> None:
    """The reference's files, byte for byte (the manifest but for timings and the corpus path): so no *.tmp and
    no lock left either."""
    got, expected = snapshot(root), snapshot(expected_root)
    assert sorted(got) == sorted(expected)
    for name in expected:
        if name != "manifest.json":
            assert got[name] == expected[name], name
    manifests = [without_timings(json.loads(files["manifest.json"])) for files in (got, expected)]
    for manifest in manifests:
        manifest["settings"].pop("corpus")
        for entry in manifest.get("additions", []):
            entry.pop("corpus")
    assert manifests[0] == manifests[1]


# ----------------------------------------------------------------------------- the lock

def test_a_second_writer_is_refused_while_a_build_holds_the_lock_and_a_killed_build_frees_it(
        tmp_path, reference, tiny_bert, capsys):
    corpus, new, built, _ = reference
    root = tmp_path / "ws"
    holder = start_child(tmp_path, "build", root, corpus, "hold:embeddings")  # holds it after the first block
    try:
        assert holder.stdout.readline() == "holding\n", holder.stderr.read()
        before = snapshot(root)
        assert main(["build-db", "--corpus", str(corpus), "--workspace", str(root)]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: workspace {root} is in use: process {holder.pid} holds {root / LOCK}; wait for it to "
                       "end, or stop it (a stopped build resumes when rerun)\n")
        with pytest.raises(RetroError, match=f"in use: process {holder.pid}"):
            add_documents(root, new, tiny_bert)
        assert snapshot(root) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()
    build(root, corpus, tiny_bert)  # SIGKILL dropped the lock: this one resumes mid-embeddings
    assert_same_files(root, built)


def test_the_lock_is_reentrant_and_leaves_no_folder_behind_a_refused_build(tmp_path, tiny_bert):
    with workspace_lock(tmp_path / "ws"), workspace_lock(tmp_path / "ws"):
        assert (tmp_path / "ws" / LOCK).read_text() == f"{os.getpid()}\n"
    assert not (tmp_path / "ws").exists()
    with pytest.raises(RetroError, match="chunk_len must be > 0"):
        build(tmp_path / "ws", tmp_path / "corpus.txt", tiny_bert, chunk_len=0)
    assert not (tmp_path / "ws").exists()



# ----------------------------------------------------------------------------- SIGKILL

@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        "before:chunks.npy",  # chunks: some files of the group renamed into place, the others still *.tmp
        "after:block_00002.npy",  # embeddings, mid-blocks (the lock test above kills after the first)
        "after:index.faiss",  # the index on disk, its stage not recorded
        "before:manifest.json",  # after a stage's files, while the manifest recording it is a *.tmp
        "file:neighbors",  # neighbours, after the first query part
    ],
)
def test_a_build_killed_at_each_stage_reruns_to_the_files_of_an_uninterrupted_one(tmp_path, reference, tiny_bert,
                                                                                  fault):
    corpus, _, built, _ = reference
    killed(tmp_path, "build", tmp_path / "ws", corpus, fault)
    build(tmp_path / "ws", corpus, tiny_bert)
    assert_same_files(tmp_path / "ws", built)


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    ["before:chunk_doc.npy", "step:chunks", "block", "step:embeddings", "after:index.faiss", "step:index",
     "step:neighbors"],
)
def test_an_addition_killed_at_each_step_reruns_to_the_files_of_an_uninterrupted_one(tmp_path, reference, tiny_bert,
                                                                                     fault):
    _, new, built, grown = reference
    shutil.copytree(built, tmp_path / "ws")
    killed(tmp_path, "add", tmp_path / "ws", new, fault)
    add_documents(tmp_path / "ws", new, tiny_bert, recompute_neighbors=True)
    assert_same_files(tmp_path / "ws", grown)


@pytest.mark.slow
def test_build_db_from_another_shell_is_refused_while_a_build_holds_the_lock(tmp_path, reference):
    corpus = reference[0]
    root = tmp_path / "ws"
    holder = start_child(tmp_path, "build", root, corpus, "hold:embeddings")
    try:
        assert holder.stdout.readline() == "holding\n", holder.stderr.read()
        before = snapshot(root)
        env = os.environ | {"PYTHONPATH": str(SRC)}
        second = subprocess.run([sys.executable, "-m", "retro_lit", "build-db", "--corpus", str(corpus), "--workspace",
                                 str(root)], env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert second.stderr.startswith(f"error: workspace {root} is in use: process {holder.pid} holds")
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr
        assert snapshot(root) == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.communicate()

# ----------------------------------------------------------------------------- a full disk

def plant_full_disk(path: Path) -> None:
    """The next write of `path` (through its *.tmp) fails with ENOSPC, as on a full disk."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_name(path.name + ".tmp").symlink_to("/dev/full")


@pytest.mark.parametrize(
    ("until", "name"),
    [
        (None, "documents.jsonl"),  # chunks: the last file of the group written together
        ("chunks", "embeddings/block_00001.npy"),
        ("embeddings", "index.faiss"),
        ("index", "manifest.json"),  # the neighbours' files are written, their stage not recorded
    ],
)
def test_a_full_disk_fails_naming_the_file_and_a_rerun_resumes(tmp_path, reference, tiny_bert, until, name):
    corpus, _, built, _ = reference
    root = tmp_path / "ws"
    if until is not None:
        build(root, corpus, tiny_bert, until=until)
    plant_full_disk(root / name)
    with pytest.raises(OSError, match="No space left on device") as fault:
        build(root, corpus, tiny_bert)
    assert fault.value.filename == str(root / name)
    assert not (root / name).exists() or name == "manifest.json"
    assert not list(root.rglob("*.tmp"))
    build(root, corpus, tiny_bert)
    assert_same_files(root, built)


def test_a_full_disk_is_one_error_line_from_the_command(tmp_path, reference, tiny_bert, capsys, monkeypatch):
    corpus, new, built, grown = reference
    root = tmp_path / "ws"
    shutil.copytree(built, root)
    plant_full_disk(root / "index.faiss")
    monkeypatch.setattr("retro_lit.additions.workspace_embedder", lambda *args, **kwargs: tiny_bert)
    assert main(["add-docs", "--workspace", str(root), "--corpus", str(new), "--recompute_neighbors"]) == 2
    assert capsys.readouterr().err == (f"error: no space left on device writing {root / 'index.faiss'}; free some "
                                       "space and rerun the same command: it resumes\n")
    assert not list(root.rglob("*.tmp"))
    add_documents(root, new, tiny_bert, recompute_neighbors=True)
    assert_same_files(root, grown)
