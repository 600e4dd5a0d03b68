"""The memory allocator of `retro-lit` processes, chosen per workload.

Training and embedding free and re-allocate large blocks every step. glibc's malloc either keeps them in its
heap (its adaptive mmap threshold: RSS climbs far above what is live) or, with a fixed threshold, hands each
back to the OS, which must then page it in again: ~6 GB and 1.5 M page faults per training step at the
benchmark configuration, a third of the step spent in the kernel.

- Training, evaluation, generation (every command but `build-db`): mimalloc (PyPI `cmeel-mimalloc`) reuses
  freed blocks and returns what stays unused for a few milliseconds: a bf16 training step ~1.3x faster than
  glibc tuned for memory, at the same peak RSS.
- `build-db` streams a corpus of any size, and its peak RSS must not grow with it: glibc with a fixed 4 MiB
  mmap threshold plus transparent huge pages (the kernel pages 2 MiB at a time) keeps the large ÷ small build
  peak at 1.09, where mimalloc's retention gives 1.13, though it embeds faster (benchmarks/README.md).

An allocator is chosen when a process starts, so the `retro-lit` command re-executes itself once with it
(same pid, same arguments) before it imports anything heavy. Where that cannot happen (an in-process
`retro_lit.cli.main([...])`, a notebook), the fixed mmap threshold at least keeps RSS near what is live.
A user's own LD_PRELOAD allocator, `MALLOC_MMAP_THRESHOLD_` or `glibc.malloc.*` tunables are left alone, and
`RETRO_LIT_ALLOCATOR=system` turns the re-execution off (the process keeps the allocator it started with, with
the in-process fixed mmap threshold).
"""

import ctypes
import importlib.metadata
import os
import sys

STREAMING_TUNABLES = "glibc.malloc.mmap_threshold=4194304:glibc.malloc.hugetlb=1"
SWITCH = "RETRO_LIT_ALLOCATOR"  # "system": no re-execution with another allocator


def _user_tuned(env) -> bool:
    return ("malloc" in env.get("LD_PRELOAD", "") or "MALLOC_MMAP_THRESHOLD_" in env
            or "glibc.malloc." in env.get("GLIBC_TUNABLES", ""))


def _glibc() -> bool:
    try:
        return sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such confstr name: not glibc
        return False


def mimalloc_path() -> str | None:
    """The mimalloc shared library shipped by cmeel-mimalloc (a Linux dependency of retro_lit), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        files = importlib.metadata.files("cmeel-mimalloc") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    paths = [str(f.locate()) for f in files if f.name.startswith("libmimalloc.so")]
    return min(paths, key=len) if paths else None  # libmimalloc.so (the others are the same file, versioned)


def allocator_env(env=None, streaming: bool = False) -> dict:
    """A copy of `env` (default: os.environ) that starts a child process with the allocator for its workload:
    glibc tuned for streaming (`build-db`) or mimalloc (everything else)."""
    env = dict(os.environ if env is None else env)
    if _user_tuned(env):
        return env
    if streaming:
        if _glibc():
            env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), STREAMING_TUNABLES]))
    elif path := mimalloc_path():
        env["LD_PRELOAD"] = ":".join(filter(None, [path, env.get("LD_PRELOAD")]))
    return env


def reexec_with_allocator(streaming: bool = False) -> None:
    """Replace this process by itself started with allocator_env(streaming=...), unless that changes nothing."""
    env = allocator_env(streaming=streaming)
    if env != dict(os.environ) and os.environ.get(SWITCH) != "system":
        sys.stdout.flush()
        os.execve(sys.executable, sys.orig_argv, env)


def fix_mmap_threshold() -> None:
    """In-process fallback for a running interpreter on glibc's malloc: a fixed 4 MiB mmap threshold."""
    if _glibc() and not _user_tuned(os.environ):
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # -3 = M_MMAP_THRESHOLD
