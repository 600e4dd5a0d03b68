"""Distributed database build: embedding, index filling and neighbour search spread over processes.

Placement follows Lightning's trainer flags (`accelerator`, `devices`, `num_nodes`, `strategy`); the
engine is plain `torch.distributed`. Only small Python objects cross ranks (a status per stage, over a
gloo group); every array goes through the workspace's files, so the workspace must be on a filesystem
that all ranks see. A rank r of W:

1. waits while rank 0 runs stage 1 (`chunks`: BPE training and tokenization) and checks the settings
   (when this module spawns the ranks, node 0's launching process has done this before spawning);
2. embeds blocks r, r + W, r + 2W, ... (`embeddings/block_XXXXX.npy`; a block on disk is skipped);
3. waits while rank 0 builds the index (or, with `index_shards` S > 1: rank 0 trains it once on a sample,
   every rank fills shards r, r + W, ..., rank 0 tunes nprobe on the shards searched together);
4. searches query parts r, r + W, ... (`neighbors/k{K}_t{T}/parts/<split>_<row>.npy`, skipped when on
   disk); rank 0 merges them into the split files (tmp + os.replace) and removes the parts.

Only rank 0 writes `manifest.json`, and marks a stage done only after every rank reported its share on
disk. A failed rank fails the stage on every rank (each raises); rerunning the same command resumes: the
files already written are skipped. Blocks, parts and query batches do not depend on W, so a W-process
build writes the same bytes as a 1-process one.

Launch: `devices * num_nodes` processes; on each node `torch.multiprocessing.spawn` starts `devices` local
ranks (global rank = NODE_RANK * devices + local rank). Under an external launcher (torchrun, SLURM
wrappers that set RANK, LOCAL_RANK and WORLD_SIZE) the current process is one rank and nothing is spawned.
Multi-node runs read MASTER_ADDR, MASTER_PORT and NODE_RANK from the environment (see docs/scaling.md).
"""

import argparse
import datetime
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from retro_lit.build import build_summary, build_workspace, format_summary
from retro_lit.embedder import BERTForChunkEmbeddings
from retro_lit.embeddings import embed_chunks
from retro_lit.index import fill_index_shard, finish_index_shards, num_index_shards, train_index_shards
from retro_lit.neighbors import compute_neighbor_parts, merge_neighbor_parts, neighbor_parts
from retro_lit.workspace import STAGES, RetroError, block_path, mark_stage, neighbors_key, open_workspace, stage_done

log = logging.getLogger(__name__)

ACCELERATORS = ("auto", "cpu", "gpu", "cuda")
# every DDP-flavoured name means "one process per device" here: the build trains nothing, so there is
# nothing to shard (fsdp, deepspeed) and no launcher choice that changes the result (spawn is used)
STRATEGIES = ("auto", "ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "fsdp", "deepspeed", "single_device")
FAULT_ENV = "RETRO_LIT_FAULT"  # test hook: "rank=1,stage=embeddings,after=1[,mode=exit]"
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
    """Accepted: auto, ddp, ddp_spawn, ddp_fork, ddp_notebook, fsdp, deepspeed (all: one process per
    device), single_device (devices must be 1); `ddp_find_unused_parameters_*` variants too."""

    def resolve(self) -> tuple[str, int, int]:
        """(accelerator `cpu`|`gpu`, devices per node, num_nodes); raises RetroError naming the flag."""
        accelerator = str(self.accelerator).lower()
        if accelerator not in ACCELERATORS:
            raise RetroError(f"--trainer.accelerator must be one of {ACCELERATORS}, got {accelerator!r}")
        strategy = str(self.strategy).lower()
        if strategy not in STRATEGIES and not strategy.startswith(("ddp_", "fsdp", "deepspeed")):
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
    **build_kwargs,
) -> Path:
    """`build_workspace` spread over `placement`'s processes; `index_shards` > 1 writes a sharded index.

    `build_kwargs` are `build_workspace`'s (tokenizer, chunk_len, index, num_neighbors, seq_len, split,
    seed, batch_size, block_size, until, quiet); `device` is set from the placement. One process with an
    unsharded index is exactly `build_workspace`.
    """
    accelerator, devices, num_nodes = placement.resolve()
    if index_shards <= 0:
        raise RetroError(f"--index_shards must be > 0, got {index_shards}")
    if "device" in build_kwargs:
        raise RetroError("pass the device through placement.accelerator, not device=")
    job = _Job(Path(workspace), corpus, embedder, index_shards, accelerator, build_kwargs)
    if _external_launcher():
        _run_rank(int(os.environ["LOCAL_RANK"]), job, None, None, None)
        return Path(workspace)
    world = devices * num_nodes
    if world == 1:
        if index_shards == 1:
            return build_workspace(
                workspace, corpus, embedder=embedder, device=_device(accelerator, 0), **build_kwargs
            )
        _build_ranked(_Group(0, 1, 0, 1), job)
        return Path(workspace)
    addr, port, node_rank = _rendezvous(num_nodes)
    if node_rank == 0:  # stage 1 and the settings checks here, before any process starts: errors stay plain
        build_workspace(
            workspace, corpus, embedder=embedder, device="cpu", **build_kwargs | {"until": "chunks"}
        )
    errors = mp.get_context("spawn").SimpleQueue()
    try:
        mp.spawn(_run_rank, args=(job, (addr, port), (node_rank, devices, world), errors), nprocs=devices)
    finally:
        message = None if errors.empty() else errors.get()
    if message is not None:  # a bad setting or corpus, found on some rank: one clear error, like 1 process
        raise RetroError(message)
    if node_rank == 0 and build_kwargs.get("until", "neighbors") == "neighbors":
        k, seq_len = build_kwargs.get("num_neighbors", 2), build_kwargs.get("seq_len", 2048)
        log.info("%s", format_summary(build_summary(workspace, k, seq_len)))
    return Path(workspace)


@dataclass
class _Job:
    root: Path
    corpus: str | Path
    embedder: BERTForChunkEmbeddings | str | None
    index_shards: int
    accelerator: str
    build_kwargs: dict


class _Group:
    """This rank's place in the build and the few collectives it needs (no-ops for one process)."""

    def __init__(self, rank: int, world: int, local_rank: int, local_world: int):
        self.rank, self.world, self.local_rank, self.local_world = rank, world, local_rank, local_world

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def run_all(self, fn: Callable[[], object]) -> list:
        """Run `fn` on every rank; every rank raises if any failed, else returns all ranks' results."""
        try:
            result, status = fn(), None
        except Exception as e:  # reported to the other ranks, then re-raised here
            result, status, error = None, (type(e).__name__, str(e)), e
        statuses = self.gather((status, result))
        if status is not None:
            raise error
        for rank, (failed, _) in enumerate(statuses):
            if failed is not None:
                if failed[0] == "RetroError":
                    raise RetroError(failed[1])
                raise RuntimeError(f"rank {rank} of the database build failed: {failed[0]}: {failed[1]}")
        return [r for _, r in statuses]

    def run_on_zero(self, fn: Callable[[], object]):
        """Run `fn` on rank 0 while the others wait; every rank raises if it failed."""
        return self.run_all(fn if self.rank == 0 else lambda: None)[0]


def _run_rank(local_rank: int, job: _Job, address, layout, errors) -> None:
    """Entry point of one rank (spawned, or the current process under an external launcher)."""
    if layout is None:  # torchrun-style environment
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
        init = "env://"
    else:
        node_rank, local_world, world = layout
        rank, init = node_rank * local_world + local_rank, f"tcp://{address[0]}:{address[1]}"
    threads = max(1, _cpus() // local_world)
    torch.set_num_threads(threads)
    import faiss

    faiss.omp_set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format=f"[rank {rank}] %(message)s")
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world, timeout=STAGE_TIMEOUT)
    try:
        _build_ranked(_Group(rank, world, local_rank, local_world), job)
    except RetroError as e:
        if rank == 0 and errors is not None:
            errors.put(str(e))
        if errors is None:
            raise
    finally:
        dist.destroy_process_group()


def _build_ranked(group: _Group, job: _Job) -> None:
    """Stages 1-4 as rank `group.rank` of `group.world` (see the module docstring)."""
    kw = dict(job.build_kwargs)
    until, quiet = kw.get("until", "neighbors"), kw.get("quiet", True)
    if until not in STAGES:
        raise RetroError(f"until must be one of {STAGES}, got {until!r}")
    device = _device(job.accelerator, group.local_rank)
    embedder = _rank_embedder(job.embedder, device, kw.pop("batch_size", 128))
    root, fault = job.root, _Fault.from_env(group.rank)

    def on_zero(until_stage: str) -> None:  # rank 0 runs build_workspace up to a stage (checks settings too)
        group.run_on_zero(
            lambda: build_workspace(
                root, job.corpus, embedder=embedder, device=device, **kw | {"until": until_stage}
            )
        )

    on_zero("chunks")
    if until == "chunks":
        return
    if not stage_done(root, "embeddings"):
        ws = open_workspace(root)
        size = int(ws.manifest["settings"]["block_size"])
        n_blocks = math.ceil(len(ws.chunks) / size)
        start = time.perf_counter()
        mine = range(group.rank, n_blocks, group.world)
        tick = lambda path: fault.tick("embeddings")  # noqa: E731
        counts = group.run_all(
            lambda: sum(
                len(np.load(p, mmap_mode="r"))
                for p in embed_chunks(root, embedder, mine, quiet=quiet, on_block=tick)
            )
        )
        seconds = max(group.gather(time.perf_counter() - start))
        group.run_on_zero(
            lambda: _mark_embeddings(root, embedder, n_blocks, sum(counts), seconds, group.world)
        )
    if until == "embeddings":
        return
    if job.index_shards == 1:
        on_zero("index")
    elif not stage_done(root, "index"):
        _build_index_shards(group, job, kw, device)
    if until == "index":
        return
    _search_neighbors(group, root, kw, device, fault)
    on_zero("neighbors")  # everything is done: logs the summary


def _build_index_shards(group: _Group, job: _Job, kw: dict, device: str) -> None:
    ws = open_workspace(job.root)
    factory, seed = kw.get("index", "auto"), kw.get("seed", 0)
    shards = num_index_shards(ws, job.index_shards)
    start = time.perf_counter()
    group.run_on_zero(lambda: train_index_shards(ws, factory, shards=shards, seed=seed))
    gpu = _gpu_index(device)
    group.run_all(
        lambda: [fill_index_shard(ws, s, shards, device=gpu) for s in range(group.rank, shards, group.world)]
    )

    def finish() -> None:
        info = finish_index_shards(ws, factory, shards=shards, k=kw.get("num_neighbors", 2), seed=seed)
        mark_stage(job.root, "index", info | {"seconds": round(time.perf_counter() - start, 3)})

    group.run_on_zero(finish)


def _search_neighbors(group: _Group, ws_root: Path, kw: dict, device: str, fault: "_Fault") -> None:
    k, seq_len = kw.get("num_neighbors", 2), kw.get("seq_len", 2048)
    key = neighbors_key(k, seq_len)
    if stage_done(ws_root, key):
        return
    ws = open_workspace(ws_root)
    nprobe = ws.manifest["stages"]["index"].get("nprobe")
    parts = neighbor_parts(ws)
    start = time.perf_counter()
    group.run_all(
        lambda: compute_neighbor_parts(
            ws,
            k,
            seq_len,
            parts[group.rank :: group.world],
            nprobe=nprobe,
            device=_gpu_index(device),
            on_part=lambda path: fault.tick("neighbors"),
        )
    )
    seconds = max(group.gather(time.perf_counter() - start))

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
                "world_size": group.world,
                "additions": len(ws.additions),
            },
        )
        for p in sorted((paths[0].parent / "parts").glob("*.npy")):
            p.unlink()
        (paths[0].parent / "parts").rmdir()

    group.run_on_zero(merge)


def _mark_embeddings(root: Path, embedder, n_blocks: int, n_new: int, seconds: float, world: int) -> None:
    missing = [b for b in range(n_blocks) if not block_path(root, b).exists()]
    if missing:
        raise RuntimeError(f"embedding blocks {missing[:5]} are missing after every rank finished")
    info = {
        "dim": embedder.dim,
        "dtype": "float16",
        "blocks": n_blocks,
        "chunks_per_s": round(n_new / max(seconds, 1e-9), 1),
        "seconds": round(seconds, 3),
        "world_size": world,
    }
    mark_stage(root, "embeddings", info)


def _device(accelerator: str, local_rank: int) -> str:
    return f"cuda:{local_rank}" if accelerator == "gpu" else "cpu"


def _gpu_index(device: str) -> int | None:
    """The faiss GPU of this rank (faiss falls back to the CPU when it has no GPU support)."""
    return int(device.split(":")[1]) if device.startswith("cuda:") else None


def _rank_embedder(embedder, device: str, batch_size: int) -> BERTForChunkEmbeddings:
    """This rank's embedder on its device: a name/path is loaded here, an object is moved."""
    if not isinstance(embedder, BERTForChunkEmbeddings):
        return BERTForChunkEmbeddings(embedder, device, batch_size=batch_size)
    if str(embedder.device) != device:
        embedder.device = torch.device(device)
        embedder.model.to(embedder.device)
    return embedder


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _external_launcher() -> bool:
    """True under torchrun-style launchers: RANK, LOCAL_RANK and WORLD_SIZE are set, WORLD_SIZE > 1."""
    env = os.environ
    return all(v in env for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE")) and int(env["WORLD_SIZE"]) > 1


def _rendezvous(num_nodes: int) -> tuple[str, int, int]:
    """(MASTER_ADDR, MASTER_PORT, NODE_RANK): from the environment; on one node, a free local port."""
    env = os.environ
    if num_nodes == 1:
        return env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 0)) or _free_port(), 0
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if v not in env]
    if missing:
        raise RetroError(f"--trainer.num_nodes {num_nodes} needs {', '.join(missing)} in the environment")
    return env["MASTER_ADDR"], int(env["MASTER_PORT"]), int(env["NODE_RANK"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class _Fault:
    """Test hook: `RETRO_LIT_FAULT="rank=1,stage=embeddings,after=1[,mode=exit]"` makes that rank raise
    (or die with `os._exit`, like a killed process) once it has written `after` files of that stage."""

    stage: str | None = None
    after: int = 0
    mode: str = "raise"
    seen: int = 0

    @classmethod
    def from_env(cls, rank: int) -> "_Fault":
        spec = dict(item.split("=", 1) for item in os.environ.get(FAULT_ENV, "").split(",") if "=" in item)
        if not spec or int(spec.get("rank", -1)) != rank:
            return cls()
        return cls(spec.get("stage"), int(spec.get("after", 0)), spec.get("mode", "raise"))

    def tick(self, stage: str) -> None:
        if stage != self.stage:
            return
        self.seen += 1
        if self.seen >= self.after:
            if self.mode == "exit":
                os._exit(17)
            raise RuntimeError(f"injected fault in stage {stage} after {self.seen} files ({FAULT_ENV})")


def build_db_main(argv: list[str] | None = None) -> int:
    """`retro-lit build-db`: build or resume a workspace, print its summary; bad input -> exit code 2."""
    parser = argparse.ArgumentParser(prog="retro-lit build-db", description=build_db_main.__doc__)
    parser.add_argument(
        "--corpus",
        required=True,
        help="file, folder, .jsonl, .parquet, HF dataset folder, 'python-stdlib[:pkg,...]', 'shakespeare' "
        "or 'linux-doc'",
    )
    parser.add_argument("--workspace", required=True, help="output folder (resumed when it exists)")
    parser.add_argument("--tokenizer", default="bpe:8192", help="bpe:N, bytes, smollm2, or a local tokenizer")
    parser.add_argument("--chunk_len", type=int, default=64, help="tokens per chunk (M)")
    parser.add_argument(
        "--embedder", default=None, help="BERT model folder or cached name (default all-MiniLM-L6-v2)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument(
        "--index", default="auto", help="'auto' or a faiss index_factory string, e.g. IVF1024,Flat"
    )
    parser.add_argument("--num_neighbors", type=int, default=2, help="neighbours per chunk (K)")
    parser.add_argument(
        "--seq_len", type=int, default=2048, help="training sequence length (T), for neighbour exclusion"
    )
    parser.add_argument("--split", default="0.9,0.05,0.05", help="train,val,test fractions of the documents")
    parser.add_argument("--seed", type=int, default=0, help="seed of the document split and index sampling")
    parser.add_argument("--dedup_threshold", type=float, default=0.8,
                        help="leave out training documents with 13-gram Jaccard >= this to a held-out one; <= 0: keep all")
    parser.add_argument("--batch_size", type=int, default=128, help="embedder batch size")
    parser.add_argument(
        "--block_size", type=int, default=16384, help="chunks per embedding block / query part"
    )
    parser.add_argument(
        "--index_shards",
        type=int,
        default=1,
        help="write the index as N shards (faiss IndexShards at search)",
    )
    placement = parser.add_argument_group("placement (Lightning-style; see docs/scaling.md)")
    placement.add_argument(
        "--trainer.accelerator",
        dest="accelerator",
        default=None,
        help="cpu, gpu or auto (default: from --device)",
    )
    placement.add_argument(
        "--trainer.devices", dest="devices", default="1", help="processes per node (one per GPU), or auto"
    )
    placement.add_argument(
        "--trainer.num_nodes",
        dest="num_nodes",
        type=int,
        default=1,
        help="nodes (MASTER_ADDR, NODE_RANK set)",
    )
    placement.add_argument(
        "--trainer.strategy",
        dest="strategy",
        default="auto",
        help="auto, ddp, ddp_spawn, fsdp, ...: all DDP-style",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        split = tuple(float(f) for f in args.split.split(","))
        if len(split) != 3:
            raise ValueError
    except ValueError:
        print(f"error: --split must be three comma-separated fractions, got {args.split!r}", file=sys.stderr)
        return 2
    accelerator = args.accelerator or ("gpu" if args.device.startswith("cuda") else args.device)
    placement = Placement(accelerator, args.devices, args.num_nodes, args.strategy)
    try:
        build_workspace_distributed(
            args.workspace,
            args.corpus,
            placement=placement,
            index_shards=args.index_shards,
            tokenizer=args.tokenizer,
            chunk_len=args.chunk_len,
            embedder=args.embedder,
            index=args.index,
            num_neighbors=args.num_neighbors,
            seq_len=args.seq_len,
            split=split,
            seed=args.seed,
            dedup_threshold=args.dedup_threshold if args.dedup_threshold > 0 else None,
            batch_size=args.batch_size,
            block_size=args.block_size,
            quiet=args.quiet,
        )
    except (RetroError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
