"""The memory allocator of training and embedding processes.

Both free and re-allocate large activation blocks every step. glibc's malloc either keeps them in its heap
(its adaptive mmap threshold: RSS climbs far above what is live) or, with a fixed threshold, hands each back
to the OS, which must then page ~6 GB per training step back in (1.5 M page faults at the benchmark
configuration, a third of the step spent in the kernel). mimalloc (PyPI `cmeel-mimalloc`) reuses freed blocks
and returns what stays unused for a few milliseconds: on the benchmark VM a bf16 training step runs ~1.3x and
the MiniLM embedder ~1.15x faster than with glibc tuned for memory, at the same peak RSS
(benchmarks/README.md).

An allocator is chosen when a process starts, so the `retro-lit` command re-executes itself once with
mimalloc in LD_PRELOAD (same pid, same arguments) before it imports anything heavy. Where that cannot happen
(an in-process `retro_lit.cli.main([...])`, a notebook), glibc's fixed 4 MiB mmap threshold at least keeps
RSS near what is live. A user's own LD_PRELOAD allocator, `MALLOC_MMAP_THRESHOLD_` or `glibc.malloc.*`
tunables are left alone.
"""

import ctypes
import importlib.metadata
import os
import sys


def _user_tuned(env) -> bool:
    return ("malloc" in env.get("LD_PRELOAD", "") or "MALLOC_MMAP_THRESHOLD_" in env
            or "glibc.malloc." in env.get("GLIBC_TUNABLES", ""))


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


def allocator_env(env=None) -> dict:
    """A copy of `env` (default: os.environ) that starts a child process with mimalloc preloaded."""
    env = dict(os.environ if env is None else env)
    path = mimalloc_path()
    if path and not _user_tuned(env):
        env["LD_PRELOAD"] = ":".join(filter(None, [path, env.get("LD_PRELOAD")]))
    return env


def reexec_with_allocator() -> None:
    """Replace this process by itself started with mimalloc, unless an allocator is chosen already."""
    if not _user_tuned(os.environ) and mimalloc_path():
        sys.stdout.flush()
        os.execve(sys.executable, sys.orig_argv, allocator_env())


def fix_mmap_threshold() -> None:
    """In-process fallback for a running interpreter on glibc's malloc: a fixed 4 MiB mmap threshold."""
    try:
        glibc = sys.platform.startswith("linux") and os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # no such confstr name: not glibc
        return
    if glibc and not _user_tuned(os.environ):
        ctypes.CDLL("libc.so.6").mallopt(-3, 4 << 20)  # -3 = M_MMAP_THRESHOLD
