"""Distributed database build: embedding, index filling and neighbour search spread over processes.

Placement follows Lightning's trainer flags (`accelerator`, `devices`, `num_nodes`, `strategy`) and runs on
Lightning Fabric: Fabric starts the processes, forms the process group and gives each rank its place. Only
small Python objects cross ranks (a status per stage, over a gloo group); every array goes through the
workspace's files, so the workspace must be on a filesystem that all ranks see. A rank r of W:

1. waits while rank 0 runs stage 1 (`chunks`: BPE training and tokenization) and checks the settings
   (when the ranks are spawned, node 0's launching process has done this before spawning);
2. embeds blocks r, r + W, r + 2W, ... (`embeddings/block_XXXXX.npy`; a block on disk is skipped);
3. waits while rank 0 builds the index (or, with `index_shards` S > 1: rank 0 trains it once on a sample,
   every rank fills shards r, r + W, ..., rank 0 tunes nprobe on the shards searched together);
4. searches query parts r, r + W, ... (`neighbors/k{K}_t{T}/parts/<split>_<row>.npy`, skipped when on
   disk); rank 0 merges them into the split files (tmp + os.replace) and removes the parts.

Only rank 0 writes `manifest.json` (holding the workspace's lock all through), and marks a stage done only
after every rank reported its share on disk. A failed rank fails the stage on every rank (each raises);
rerunning the same command resumes: the files already written are skipped. Blocks, parts and query batches do not depend on W, so a W-process
build writes the same bytes as a 1-process one.

Launch: `devices * num_nodes` ranks. On each node Fabric spawns `devices` local ranks (its `ddp_spawn`;
global rank = NODE_RANK * devices + local rank), reading MASTER_ADDR, MASTER_PORT and NODE_RANK on more
than one node. When a launcher already started the ranks (torchrun, srun, mpirun, LSF's jsrun: Fabric's
cluster environments detect them), the current process is one rank and nothing is spawned; `devices *
num_nodes` must then match the launcher's world size, as for `fit` (see docs/scaling.md).
"""

import contextlib
import datetime
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.distributed as dist
from lightning.fabric import Fabric
from lightning.fabric.plugins.environments import (
    ClusterEnvironment,
    LightningEnvironment,
    LSFEnvironment,
    MPIEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)
from lightning.fabric.strategies import DDPStrategy

from retro_lit.build import Build, build_summary, build_workspace, embedder_dtype, format_summary
from retro_lit.embedder import BERTForChunkEmbeddings
from retro_lit.embeddings import embed_chunks, embedding_info
from retro_lit.index import fill_index_shard, finish_index_shards, num_index_shards, train_index_shards
from retro_lit.neighbors import compute_neighbor_parts, merge_neighbor_parts, neighbor_parts
from retro_lit.repair import format_verify, repair_workspace, verify_workspace
from retro_lit.verify import describe_units
from retro_lit.workspace import (STAGES, RetroError, block_path, mark_stage, neighbors_key, open_workspace,
                                 read_manifest, stage_done, workspace_lock)

log = logging.getLogger(__name__)

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
# the strategies the build runs: one process per device, spawned unless a launcher started them
STRATEGIES = ("auto", "ddp", "ddp_spawn", "single_device")
SHARDING_STRATEGIES = ("fsdp", "deepspeed", "xla_fsdp", "model_parallel")  # and their variants
STAGE_TIMEOUT = datetime.timedelta(days=7)  # rank 0 may index for hours while the others wait


@dataclass(frozen=True)
class Placement:
    """Where the build runs, spelled like Lightning's `--trainer.*` flags."""

    accelerator: str = "auto"
    """`cpu`, `gpu` (or `cuda`), or `auto` (GPU when CUDA is available)."""
    devices: int | str = 1
    """Processes per node: one per GPU on `gpu`, one per process slot on `cpu`; `auto` = all GPUs, or 1 on CPU."""
    num_nodes: int = 1
    """Nodes; each one runs the same command with its NODE_RANK (MASTER_ADDR, MASTER_PORT set)."""
    strategy: str = "auto"
    """auto, ddp or ddp_spawn: one process per device (spawned, or started by torchrun/srun);
    single_device: one process. fsdp and deepspeed are refused: the build trains nothing to shard."""

    def resolve(self) -> tuple[str, int, int]:
        """(accelerator `cpu`|`gpu`, devices per node, num_nodes); raises RetroError naming the flag."""
        accelerator = str(self.accelerator).lower()
        if accelerator not in ACCELERATORS:
            raise RetroError(f"--trainer.accelerator must be one of {ACCELERATORS}, got {accelerator!r}")
        strategy = str(self.strategy).lower()
        if strategy.startswith(SHARDING_STRATEGIES):
            raise RetroError(
                f"--trainer.strategy {strategy}: the database build trains nothing, so there is nothing to "
                "shard; use ddp (one process per device)"
            )
        if strategy not in STRATEGIES:
            raise RetroError(f"--trainer.strategy must be one of {STRATEGIES}, got {strategy!r}")
        cuda = torch.cuda.is_available()
        if accelerator in ("gpu", "cuda") and not cuda:
            log.warning("--trainer.accelerator %s but CUDA is not available; building on CPU", accelerator)
        gpu = cuda and accelerator != "cpu"
        if str(self.devices) == "auto":
            devices = torch.cuda.device_count() if gpu else 1
        else:
            try:
                devices = int(self.devices)
            except ValueError:
                raise RetroError(
                    f"--trainer.devices must be a count or 'auto', got {self.devices!r}"
                ) from None
        if devices <= 0 or int(self.num_nodes) <= 0:
            raise RetroError("--trainer.devices and --trainer.num_nodes must be > 0")
        if gpu and devices > torch.cuda.device_count():
            raise RetroError(f"--trainer.devices {devices} but only {torch.cuda.device_count()} GPUs")
        if strategy == "single_device" and devices * int(self.num_nodes) > 1:
            raise RetroError("--trainer.strategy single_device needs --trainer.devices 1 and num_nodes 1")
        return ("gpu" if gpu else "cpu"), devices, int(self.num_nodes)


def build_workspace_distributed(
    workspace: str | Path,
    corpus: str | Path,
    *,
    placement: Placement = Placement(),
    embedder: BERTForChunkEmbeddings | str | None = None,
    index_shards: int = 1,
    on_file: Callable[[str, int, Path], None] | None = None,
    **build_kwargs,
) -> Path:
    """`build_workspace` spread over `placement`'s processes; `index_shards` > 1 writes a sharded index.

    `build_kwargs` are `build_workspace`'s (tokenizer, chunk_len, index, num_neighbors, seq_len, split,
    seed, batch_size, block_size, until, quiet); `device` is set from the placement. One process with an
    unsharded index and no `on_file` is exactly `build_workspace`.

    `on_file(stage, rank, path)` runs on a rank after each file it wrote in the stages shared out between
    ranks (`embeddings` blocks, `index` shards, `neighbors` parts): progress reports, or a test's injected
    fault. Spawned ranks get a pickled copy, so pass a module-level function or a `functools.partial` of one.
    """
    accelerator, devices, num_nodes = placement.resolve()
    if index_shards <= 0:
        raise RetroError(f"--index_shards must be > 0, got {index_shards}")
    if "device" in build_kwargs:
        raise RetroError("pass the device through placement.accelerator, not device=")
    fabric = _fabric(accelerator, devices, num_nodes)
    if fabric.world_size == 1 and index_shards == 1 and on_file is None:
        return build_workspace(
            workspace, corpus, embedder=embedder, device=str(fabric.device), **build_kwargs
        )
    spawn = fabric.world_size > 1 and not fabric.strategy.cluster_environment.creates_processes_externally
    if spawn and num_nodes > 1:
        _check_rendezvous(num_nodes)
    if spawn and fabric.node_rank == 0:  # stage 1 and the settings checks before a rank starts: plain errors
        build_workspace(
            workspace, corpus, embedder=embedder, device="cpu", **build_kwargs | {"until": "chunks"}
        )
    job = _Job(Path(workspace), corpus, embedder, index_shards, on_file, build_kwargs)
    message = fabric.launch(_run_rank, job, devices)
    if message is not None:  # a bad setting or corpus, found on some rank: one clear error, like 1 process
        raise RetroError(message)
    if spawn and fabric.node_rank == 0 and build_kwargs.get("until", "neighbors") == "neighbors":
        k, seq_len = build_kwargs.get("num_neighbors", 2), build_kwargs.get("seq_len", 2048)
        log.info("%s", format_summary(build_summary(workspace, k, seq_len)))
    return Path(workspace)


def _fabric(accelerator: str, devices: int, num_nodes: int) -> Fabric:
    """Fabric over `devices * num_nodes` processes: spawned ones, or those a launcher started already.

    Fabric's `ddp` would start the other ranks by rerunning this program's command line (which, in a test
    or a notebook, is not this build), so they are spawned (`ddp_spawn`). The group is gloo even on GPUs:
    only small Python objects cross it, and no NCCL watchdog cuts a week-long wait for rank 0.
    """
    cluster = _cluster_environment()
    if devices * num_nodes == 1 and not cluster.creates_processes_externally:
        strategy = "auto"  # Fabric's SingleDeviceStrategy: this process alone
    else:
        strategy = DDPStrategy(
            cluster_environment=cluster,
            start_method="popen" if cluster.creates_processes_externally else "spawn",
            process_group_backend="gloo",
            timeout=STAGE_TIMEOUT,
        )
    return Fabric(
        accelerator="cuda" if accelerator == "gpu" else "cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=strategy,
    )


def _cluster_environment() -> ClusterEnvironment:
    """The launcher that started this process, in the order Fabric detects them (torchrun first: it may run
    inside SLURM), else Lightning's own environment, in which Fabric spawns the ranks."""
    for environment in (TorchElasticEnvironment, SLURMEnvironment, LSFEnvironment, MPIEnvironment):
        if environment.detect():
            return environment()
    return LightningEnvironment()


def _check_rendezvous(num_nodes: int) -> None:
    """Nodes meet at MASTER_ADDR:MASTER_PORT; without them Fabric would wait at a local address forever."""
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if v not in os.environ]
    if missing:
        raise RetroError(f"--trainer.num_nodes {num_nodes} needs {', '.join(missing)} in the environment")


@dataclass
class _Job:
    root: Path
    corpus: str | Path
    embedder: BERTForChunkEmbeddings | str | None
    index_shards: int
    on_file: Callable[[str, int, Path], None] | None
    build_kwargs: dict


def _gather(fabric: Fabric, obj) -> list:
    """Every rank's `obj`, in rank order. Fabric's all_gather takes tensors; these are small Python objects,
    so this is torch's object gather on the process group Fabric set up."""
    if fabric.world_size == 1:
        return [obj]
    out = [None] * fabric.world_size
    dist.all_gather_object(out, obj)
    return out


def _run_all(fabric: Fabric, fn: Callable[[], object]) -> list:
    """Run `fn` on every rank; every rank raises if any failed, else returns all ranks' results."""
    try:
        result, status = fn(), None
    except Exception as e:  # reported to the other ranks, then re-raised here
        result, status, error = None, (type(e).__name__, str(e)), e
    statuses = _gather(fabric, (status, result))
    if status is not None:
        raise error
    for rank, (failed, _) in enumerate(statuses):
        if failed is not None:
            if failed[0] == "RetroError":
                raise RetroError(failed[1])
            raise RuntimeError(f"rank {rank} of the database build failed: {failed[0]}: {failed[1]}")
    return [r for _, r in statuses]


def _run_on_zero(fabric: Fabric, fn: Callable[[], object]):
    """Run `fn` on rank 0 while the others wait; every rank raises if it failed."""
    return _run_all(fabric, fn if fabric.global_rank == 0 else lambda: None)[0]


def _run_rank(fabric: Fabric, job: _Job, devices: int) -> str | None:
    """One rank's build (Fabric's launch function); returns a RetroError's message, else None.

    A RetroError (a bad setting or corpus) is the same on every rank, so it is returned rather than raised:
    Fabric hands rank 0's value back to the launching process, which raises it as one plain error.
    """
    if fabric.world_size > 1:  # one of `devices` processes on this node: share its cores
        threads = max(1, _cpus() // devices)
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
        logging.basicConfig(level=logging.WARNING, format=f"[rank {fabric.global_rank}] %(message)s")
    with contextlib.ExitStack() as held:
        try:
            # rank 0 holds the workspace's lock all through; another build holding it fails every rank at once
            _run_on_zero(fabric, lambda: held.enter_context(workspace_lock(job.root)))
            _build_ranked(fabric, job)
        except RetroError as e:
            return str(e)
    return None


def _build_ranked(fabric: Fabric, job: _Job) -> None:
    """Stages 1-4 as rank `fabric.global_rank` of `fabric.world_size` (see the module docstring)."""
    kw = dict(job.build_kwargs)
    until, quiet = kw.get("until", "neighbors"), kw.get("quiet", True)
    if until not in STAGES:
        raise RetroError(f"until must be one of {STAGES}, got {until!r}")
    device = str(fabric.device)
    root, rank, world = job.root, fabric.global_rank, fabric.world_size
    embedder = _rank_embedder(job.embedder, device, kw.pop("batch_size", 128),
                              embedder_dtype(root, kw.pop("embedder_precision", "auto")))

    def on_zero(until_stage: str) -> None:  # rank 0 runs build_workspace up to a stage (checks settings too)
        _run_on_zero(
            fabric,
            lambda: build_workspace(
                root, job.corpus, embedder=embedder, device=device, **kw | {"until": until_stage}
            ),
        )

    on_zero("chunks")
    if until == "chunks":
        return
    if not stage_done(root, "embeddings"):
        ws = open_workspace(root)
        size = int(ws.manifest["settings"]["block_size"])
        n_blocks = math.ceil(len(ws.chunks) / size)
        start = time.perf_counter()
        mine = range(rank, n_blocks, world)
        on_block = _report(job, "embeddings", rank)
        counts = _run_all(
            fabric,
            lambda: sum(
                len(np.load(p, mmap_mode="r"))
                for p in embed_chunks(root, embedder, mine, quiet=quiet, on_block=on_block)
            ),
        )
        seconds = max(_gather(fabric, time.perf_counter() - start))
        _run_on_zero(fabric, lambda: _mark_embeddings(root, embedder, n_blocks, sum(counts), seconds, world))
    if until == "embeddings":
        return
    if job.index_shards == 1:
        on_zero("index")
    elif not stage_done(root, "index"):
        _build_index_shards(fabric, job, kw)
    if until == "index":
        return
    _search_neighbors(fabric, job, kw)
    on_zero("neighbors")  # everything is done: logs the summary


def _build_index_shards(fabric: Fabric, job: _Job, kw: dict) -> None:
    ws = open_workspace(job.root)
    factory, seed = kw.get("index", "auto"), kw.get("seed", 0)
    shards = num_index_shards(ws, job.index_shards)
    start = time.perf_counter()
    _run_on_zero(fabric, lambda: train_index_shards(ws, factory, shards=shards, seed=seed))
    report = _report(job, "index", fabric.global_rank)

    def fill() -> None:
        for s in range(fabric.global_rank, shards, fabric.world_size):
            path = fill_index_shard(ws, s, shards, device=fabric.device.index)
            if report is not None:
                report(path)

    _run_all(fabric, fill)

    def finish() -> None:
        info = finish_index_shards(ws, factory, shards=shards, k=kw.get("num_neighbors", 2), seed=seed)
        mark_stage(job.root, "index", info | {"seconds": round(time.perf_counter() - start, 3)})

    _run_on_zero(fabric, finish)


def _search_neighbors(fabric: Fabric, job: _Job, kw: dict) -> None:
    ws_root = job.root
    k, seq_len = kw.get("num_neighbors", 2), kw.get("seq_len", 2048)
    key = neighbors_key(k, seq_len)
    if stage_done(ws_root, key):
        return
    ws = open_workspace(ws_root)
    nprobe = ws.manifest["stages"]["index"].get("nprobe")
    parts = neighbor_parts(ws)
    start = time.perf_counter()
    _run_all(
        fabric,
        lambda: compute_neighbor_parts(
            ws,
            k,
            seq_len,
            parts[fabric.global_rank :: fabric.world_size],
            nprobe=nprobe,
            device=fabric.device.index,
            on_part=_report(job, "neighbors", fabric.global_rank),
        ),
    )
    seconds = max(_gather(fabric, time.perf_counter() - start))

    def merge() -> None:
        paths = merge_neighbor_parts(ws, k, seq_len)
        n_queries = sum(b - a for _, a, b in parts)
        mark_stage(
            ws_root,
            key,
            {
                "k": k,
                "seq_len": seq_len,
                "files": [str(p.relative_to(ws_root)) for p in paths],
                "queries_per_s": round(n_queries / max(seconds, 1e-9), 1),
                "seconds": round(seconds, 3),
                "world_size": fabric.world_size,
                "additions": len(ws.additions),
            },
        )
        for p in sorted((paths[0].parent / "parts").glob("*.npy")):
            p.unlink()
        (paths[0].parent / "parts").rmdir()

    _run_on_zero(fabric, merge)


def _mark_embeddings(root: Path, embedder, n_blocks: int, n_new: int, seconds: float, world: int) -> None:
    missing = [b for b in range(n_blocks) if not block_path(root, b).exists()]
    if missing:
        raise RuntimeError(f"embedding blocks {missing[:5]} are missing after every rank finished")
    info = {
        **embedding_info(embedder),
        "blocks": n_blocks,
        "chunks_per_s": round(n_new / max(seconds, 1e-9), 1),
        "seconds": round(seconds, 3),
        "world_size": world,
    }
    mark_stage(root, "embeddings", info)


def _report(job: _Job, stage: str, rank: int) -> Callable[[Path], None] | None:
    """`job.on_file` for this stage and rank, in the one-argument shape the stage functions call back."""
    return None if job.on_file is None else lambda path: job.on_file(stage, rank, path)


def _rank_embedder(embedder, device: str, batch_size: int, dtype: torch.dtype | None) -> BERTForChunkEmbeddings:
    """This rank's embedder on its device: a name/path is loaded here (at `dtype`), an object is moved."""
    if not isinstance(embedder, BERTForChunkEmbeddings):
        return BERTForChunkEmbeddings(embedder, device, batch_size=batch_size, dtype=dtype)
    if str(embedder.device) != device:
        embedder.device = torch.device(device)
        embedder.model.to(embedder.device)
    return embedder


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_db(  # the defaults are the build's own (build.Build), declared once
    workspace: str,
    corpus: str | None = None,
    tokenizer: str = Build.tokenizer,
    chunk_size: int = Build.chunk_len,
    embedder: str | None = None,
    index: str = Build.index,
    num_neighbors: int = Build.num_neighbors,
    seq_len: int = Build.seq_len,
    split: tuple[float, float, float] = Build.split,
    seed: int = Build.seed,
    dedup_threshold: float | None = Build.dedup_threshold,
    batch_size: int = 128,
    embedder_precision: str = "auto",
    block_size: int = Build.block_size,
    index_shards: int = 1,
    verify: bool = False,
    verify_sample: float = 0.0,
    repair: bool = False,
    trainer: Placement = Placement(),
    quiet: bool = False,
) -> None:
    """Build or resume a retrieval database (workspace); verify or repair a built one.

    Args:
        workspace: output folder (resumed when it exists).
        corpus: file, folder, .jsonl, .parquet, HF dataset folder, 'python-stdlib[:pkg,...]', 'shakespeare' or
            'linux-doc'; default: the workspace's own (for --verify, --repair, or a resume).
        tokenizer: bpe:N (trained on the train split), bytes, smollm2, or a local tokenizer.
        chunk_size: tokens per chunk (M).
        embedder: BERT model folder or cached name (default all-MiniLM-L6-v2).
        index: 'auto' or a faiss index_factory string, e.g. IVF1024,Flat.
        num_neighbors: neighbours per chunk (K).
        seq_len: training sequence length (T), for the neighbour exclusion.
        split: train, val, test fractions of the documents.
        seed: seed of the document split and of the index's training sample.
        dedup_threshold: leave out training documents with 13-gram Jaccard >= this to a held-out one; null keeps all.
        batch_size: embedder batch size.
        embedder_precision: bf16, 32, or auto: the workspace's own on a resume, else bf16 on CUDA and on CPUs with
            bf16 units (AVX512-BF16, AMX), fp32 on other CPUs (where bf16 is emulated, ~6x slower).
        block_size: chunks per embedding block and per neighbour query part.
        index_shards: write the index as N shards (searched as one faiss IndexShards).
        verify: check every file's size and sha256 against the manifest, name each damaged one; build nothing.
        verify_sample: with --verify, also recompute this fraction of the embedding blocks and neighbour query
            parts and compare them bit for bit (loads the embedder).
        repair: check every file as --verify does and redo exactly the damaged units (embedding blocks, index
            shards, neighbour splits, the chunks stage); build nothing else.
        trainer: where the build runs, spelled like Lightning's trainer flags (docs/scaling.md).
        quiet: no progress bars or build summary.
    """
    logging.getLogger("retro_lit").setLevel(logging.WARNING if quiet else logging.INFO)
    manifest = read_manifest(workspace) if Path(workspace).is_dir() else None
    if corpus is None and manifest is None:
        raise RetroError(f"--corpus is needed: {workspace} holds no workspace yet")
    corpus = corpus or manifest["settings"]["corpus"]

    def recorded_embedder(info: dict) -> BERTForChunkEmbeddings:  # the keys' embedder, batches and precision
        return BERTForChunkEmbeddings(embedder or manifest["settings"]["embedder"], "cpu",
                                      batch_size=info.get("batch_size", batch_size),
                                      dtype=getattr(torch, info.get("precision", "bfloat16")))

    if verify or verify_sample > 0:
        report = verify_workspace(workspace, recorded_embedder, sample=verify_sample, seed=seed)
        if report["damaged"] or report["mismatched"]:
            raise RetroError(format_verify(report))
        print(format_verify(report))
        return
    if repair:
        damage = repair_workspace(workspace, recorded_embedder, quiet=quiet)
        print(f"workspace {workspace}: " + (f"redid {describe_units(damage)}" if damage else "nothing damaged"))
        return
    build_workspace_distributed(
        workspace, corpus, placement=trainer, index_shards=index_shards, tokenizer=tokenizer, chunk_len=chunk_size,
        embedder=embedder, index=index, num_neighbors=num_neighbors, seq_len=seq_len, split=split, seed=seed,
        embedder_precision=embedder_precision,
        dedup_threshold=dedup_threshold if dedup_threshold is None or dedup_threshold > 0 else None,
        batch_size=batch_size, block_size=block_size, quiet=quiet,
    )
