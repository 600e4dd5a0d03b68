"""Distributed database build (2 gloo processes on CPU): same bytes as one process, resume after a failed or
killed rank, and a sharded index that answers like the unsharded exact one."""

import os
from dataclasses import dataclass

import faiss
import numpy as np
import pytest
import torch
from faiss.contrib.datasets import SyntheticDataset

from retro_lit.commands import main
from retro_lit.distributed import Placement, build_workspace_distributed
from retro_lit.index import load_index, search_excluding
from retro_lit.workspace import RetroError, open_workspace
from helpers import K, M, T, build, make_corpus, snapshot, tiny_bert

TWO_CPUS = Placement("cpu", 2, 1, "ddp")
BUILD = {"tokenizer": "bpe:300", "chunk_len": M, "num_neighbors": K, "seq_len": T, "block_size": 64}


@pytest.fixture(autouse=True)
def _restore_master_port():
    """Fabric's spawn launcher exports the port it picked (MASTER_PORT) into this process: undo that."""
    before = os.environ.get("MASTER_PORT")
    yield
    if before is None:
        os.environ.pop("MASTER_PORT", None)
    else:
        os.environ["MASTER_PORT"] = before


@dataclass
class Fault:
    """An `on_file` hook: rank `rank` raises (or, with `exit`, dies like a killed process) once it has
    written `after` files of `stage`. Module-level, so the spawned ranks can unpickle it."""

    rank: int
    stage: str
    after: int = 1
    exit: bool = False
    written: int = 0

    def __call__(self, stage: str, rank: int, path) -> None:
        if (stage, rank) != (self.stage, self.rank):
            return
        self.written += 1
        if self.written >= self.after:
            if self.exit:
                os._exit(17)
            raise RuntimeError(f"injected fault in stage {stage} after {self.written} files")


def same_files(got_root, expected_root):
    """Every file but the manifest (timings, world size, embedder name) is byte-identical."""
    expected, got = snapshot(expected_root), snapshot(got_root)
    assert got.keys() == expected.keys()
    for name in expected:
        if name != "manifest.json":
            assert got[name] == expected[name], name


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A one-process build (one torch thread, like each spawned rank) of a 60-document corpus."""
    tmp = tmp_path_factory.mktemp("ref")
    corpus = make_corpus(tmp / "corpus.txt", n_docs=60)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = build(tmp / "ws", corpus, tiny_bert(), quiet=True)
    finally:
        torch.set_num_threads(threads)
    return root, corpus


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert") / "tiny-bert"
    bert = tiny_bert()
    bert.model.save_pretrained(folder)
    bert.tokenizer.save_pretrained(folder)
    return folder


def test_two_process_cli_build_is_byte_identical_to_one_process(tmp_path, reference, bert_folder):
    root, corpus = reference
    ws = open_workspace(root)
    assert ws.manifest["stages"]["embeddings"]["blocks"] >= 4  # both ranks embed and search several
    args = ["--corpus", str(corpus), "--workspace", str(tmp_path / "ws"), "--embedder", str(bert_folder)]
    args += ["--tokenizer", "bpe:300", "--chunk_size", str(M), "--seq_len", str(T), "--block_size", "64"]
    args += ["--batch_size", "32"]  # the reference's batches: on a CPU without bf16 units the keys' bits depend on them
    args += ["--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--quiet"]
    assert main(["build-db", *args]) == 0
    same_files(tmp_path / "ws", root)
    manifest = open_workspace(tmp_path / "ws").manifest
    assert manifest["stages"]["embeddings"]["world_size"] == 2
    assert manifest["stages"][f"neighbors/k{K}_t{T}"]["world_size"] == 2
    assert not (tmp_path / "ws" / "neighbors" / f"k{K}_t{T}" / "parts").exists()


@pytest.mark.slow  # three 2-process builds (~35 s); the default suite keeps the 2-process CLI build
def test_failed_then_killed_rank_resumes_to_the_same_files(tmp_path, reference):
    root, corpus = reference
    ws_root, bert = tmp_path / "ws", tiny_bert()

    with pytest.raises(Exception, match="injected fault"):  # rank 1 raises after its first block
        build_workspace_distributed(
            ws_root, corpus, placement=TWO_CPUS, embedder=bert, on_file=Fault(1, "embeddings"), **BUILD
        )
    blocks = {p.name: p.stat().st_mtime_ns for p in (ws_root / "embeddings").glob("block_*.npy")}
    assert 1 <= len(blocks) < open_workspace(root).manifest["stages"]["embeddings"]["blocks"]
    assert "embeddings" not in open_workspace(ws_root).manifest["stages"]

    killed = Fault(1, "neighbors", exit=True)  # rank 1 dies mid-search
    with pytest.raises(Exception, match="exit"):
        build_workspace_distributed(
            ws_root, corpus, placement=TWO_CPUS, embedder=bert, on_file=killed, **BUILD
        )
    stages = open_workspace(ws_root).manifest["stages"]
    assert stages["embeddings"]["done"] and stages["index"]["done"] and f"neighbors/k{K}_t{T}" not in stages
    assert all((ws_root / "embeddings" / name).stat().st_mtime_ns == t for name, t in blocks.items())
    parts = {
        p.name: p.stat().st_mtime_ns for p in (ws_root / "neighbors" / f"k{K}_t{T}" / "parts").glob("*.npy")
    }
    assert parts  # the finished parts of both ranks are on disk

    build_workspace_distributed(ws_root, corpus, placement=TWO_CPUS, embedder=bert, **BUILD)
    same_files(ws_root, root)
    assert all((ws_root / "embeddings" / name).stat().st_mtime_ns == t for name, t in blocks.items())


def test_sharded_index_gives_the_same_neighbors_as_the_unsharded_exact_index(tmp_path, reference):
    root, corpus = reference
    torch.set_num_threads(1)
    sharded = build_workspace_distributed(
        tmp_path / "ws", corpus, placement=Placement("cpu"), embedder=tiny_bert(), index_shards=3, **BUILD
    )
    info = open_workspace(sharded).manifest["stages"]["index"]
    assert info["shards"] == 3 and info["recall"] == 1.0 and len(info["files"]) == 3
    assert not (sharded / "index.faiss").exists()
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(
            open_workspace(sharded).neighbors(split, K, T), open_workspace(root).neighbors(split, K, T)
        )


def test_sharded_ivf_search_equals_unsharded(tmp_path):
    ds = SyntheticDataset(16, 2000, 3000, 100, seed=2)
    trained = faiss.index_factory(ds.d, "IVF16,Flat")
    trained.train(ds.get_train())
    whole = faiss.clone_index(trained)
    whole.add(ds.get_database())
    files = []
    for s, (a, b) in enumerate([(0, 1000), (1000, 1700), (1700, 3000)]):
        part = faiss.clone_index(trained)
        part.add(ds.get_database()[a:b])
        files.append(str(tmp_path / f"shard_{s}.faiss"))
        faiss.write_index(part, files[-1])
    faiss.write_index(whole, str(tmp_path / "whole.faiss"))
    one, many = load_index(tmp_path / "whole.faiss", nprobe=4), load_index(files, nprobe=4)
    assert many.ntotal == one.ntotal == 3000
    drop = lambda rows, i: i % 7 == 0  # noqa: E731  exclusion works through the shards too
    ids_one, d_one = search_excluding(one, ds.get_queries(), 10, drop)
    ids_many, d_many = search_excluding(many, ds.get_queries(), 10, drop)
    np.testing.assert_array_equal(ids_many, ids_one)
    np.testing.assert_allclose(d_many, d_one, rtol=1e-5)


@pytest.mark.parametrize(
    "placement, message",
    [
        (Placement("tpu"), "accelerator"),
        (Placement(strategy="horovod"), "strategy"),
        (Placement(devices=0), "must be > 0"),
        (Placement(devices="two"), "devices"),
        (Placement("cpu", 2, strategy="single_device"), "single_device"),
        (Placement("cpu", 2, strategy="ddp_fork"), "strategy must be one of"),
        (Placement(strategy="fsdp"), "--trainer.strategy fsdp: the database build trains nothing"),
        (Placement(strategy="deepspeed_stage_3"), "nothing to shard"),
    ],
)
def test_bad_placement_is_refused_naming_the_flag(placement, message):
    with pytest.raises(RetroError, match=message):
        placement.resolve()


def test_placement_resolves_lightning_names():
    assert Placement("cpu", "auto").resolve() == ("cpu", 1, 1)
    assert Placement("cpu", 2, 1, "ddp_spawn").resolve() == ("cpu", 2, 1)
    assert Placement("auto", 1, 1, "DDP").resolve()[0] == ("gpu" if torch.cuda.is_available() else "cpu")


def test_multi_node_needs_the_rendezvous_variables(tmp_path, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    corpus = make_corpus(tmp_path / "c.txt", n_docs=5)
    with pytest.raises(RetroError, match="MASTER_ADDR, MASTER_PORT, NODE_RANK"):
        build_workspace_distributed(
            tmp_path / "ws", corpus, placement=Placement("cpu", 1, 2), embedder=tiny_bert()
        )


def test_a_bad_setting_is_one_clear_error_before_any_process_starts(tmp_path):
    corpus = make_corpus(tmp_path / "c.txt", n_docs=5)
    with pytest.raises(RetroError, match="multiple of chunk_len"):
        build_workspace_distributed(
            tmp_path / "ws", corpus, placement=TWO_CPUS, embedder=tiny_bert(), **BUILD | {"seq_len": 12}
        )


@pytest.mark.gpu
def test_gpu_build_matches_the_cpu_neighbors(tmp_path, reference):
    """faiss on the GPU (when this faiss has GPU support) and BERT on cuda:0 find the same neighbours."""
    root, corpus = reference
    gpu = build_workspace_distributed(
        tmp_path / "ws", corpus, placement=Placement("gpu", 1), embedder=tiny_bert(), index_shards=2, **BUILD
    )
    for split in ("train", "val", "test"):
        same = open_workspace(gpu).neighbors(split, K, T) == open_workspace(root).neighbors(split, K, T)
        assert same.mean() > 0.95  # GPU bf16 keys differ slightly from CPU bf16 keys
