"""Reading a retro_lit checkpoint, for every command that scores or samples a trained model (`evaluate`, `diagnose`,
`generate`, `demo`) and for the CLI's `--ckpt_path`.

Checkpoints load weights-only: tensors, containers and plain data, never other Python objects, whose unpickling
could run arbitrary code. The project's own checkpoints need nothing else: `RetroLM` keeps its config dataclasses
as dicts in its hyperparameters, and the CLI saves the parsed config as plain data. Any file that is not a
retro_lit checkpoint (not a PyTorch file, a file holding other objects, another project's Lightning checkpoint,
weights that do not fit their config) is refused with one `RetroError` line saying what it is.
"""

import inspect
import pickle
import re
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import torch
from lightning.pytorch.cli import instantiate_module
from torch import nn

from retro_lit.lit import RetroLM
from retro_lit.workspace import RetroError

EXPECTED = "expected a RetroLM checkpoint (.ckpt) written by `retro-lit fit`"
_reused: dict | None = None  # (path, device) -> (model, data hparams), inside `reuse_loaded_checkpoints` only


def refuse_unpickling(path, error: pickle.UnpicklingError) -> NoReturn:
    """Raise an unpickling error of checkpoint `path` as one `RetroError` line: torch's refusal to load it
    weights-only (whose message advises `weights_only=False`, which runs whatever the file holds), or a file that
    is no pickle at all."""
    message = str(error)
    if not message.startswith("Weights only load failed"):
        raise RetroError(f"checkpoint {path} is not a PyTorch checkpoint ({message}); {EXPECTED}") from error
    found = re.search(r"GLOBAL (\S+)", message)
    if found:
        what = f"holds a Python object ({found.group(1)}) beyond tensors and plain data"
    else:
        detail = message.partition("WeightsUnpickler error:")[2].strip().split("\n")[0]
        what = f"is not what a weights-only load reads ({detail})"
    refusal = "refusing to load it (unpickling it could run arbitrary code)"
    raise RetroError(f"checkpoint {path} {what}; {refusal}") from error


def load_checkpoint_dict(path: str | Path) -> dict:
    """The contents of checkpoint `path`, loaded once and weights-only, its tensors memory-mapped on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise RetroError(f"no checkpoint at {path}" + (" (a folder)" if path.is_dir() else ""))
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except pickle.UnpicklingError as e:
        refuse_unpickling(path, e)
    except (RuntimeError, EOFError, ValueError) as e:  # not a zip archive torch wrote, or a truncated one
        reason = "not a PyTorch zip archive" if "mmap can only be used" in str(e) else str(e).split("\n")[0]
        raise RetroError(f"checkpoint {path} is not a PyTorch checkpoint ({reason}); {EXPECTED}") from e
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise RetroError(f"checkpoint {path} holds {type(checkpoint).__name__} without a state_dict, not a Lightning "
                         f"checkpoint; {EXPECTED}")
    return checkpoint


def retro_lm_from_checkpoint(checkpoint: dict, path: str | Path = "") -> RetroLM:
    """`RetroLM` from a loaded checkpoint, as `RetroLM.load_from_checkpoint` builds it from the file: from its
    `hyper_parameters` (through the CLI's instantiator when the CLI saved them), then its `state_dict`, strictly."""
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if not isinstance(hparams.get("config"), dict):
        found = ", ".join(sorted(k for k in hparams if not k.startswith("_"))[:6]) or "none"
        raise RetroError(f"checkpoint {path} is a Lightning checkpoint of another model: its hyper-parameters "
                         f"({found}) have no retro_lit model config; {EXPECTED}")
    saved_by_cli = hparams.pop("_instantiator", None) is not None
    names = inspect.signature(RetroLM).parameters  # (so never a `_class_path`: always RetroLM, no other import)
    hparams = {k: v for k, v in hparams.items() if k in names}
    lm = instantiate_module(RetroLM, hparams) if saved_by_cli else RetroLM(**hparams)
    try:
        lm.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as e:
        detail = " ".join(str(e).split("\n")[1:2]).strip()[:200]
        raise RetroError(f"checkpoint {path}: its weights do not fit its own model config ({detail})") from e
    return lm


def load_checkpoint(ckpt_path: str | Path, device: torch.device) -> tuple[nn.Module, dict]:
    """(model in eval mode on `device`, the datamodule hparams saved with it or {}) from a RetroLM checkpoint, read
    once and weights-only. Inside `reuse_loaded_checkpoints`, a file already loaded for `device` is not read again."""
    key = (str(Path(ckpt_path).resolve()), str(device))
    if _reused is not None and key in _reused:
        return _reused[key]
    checkpoint = load_checkpoint_dict(ckpt_path)
    model = retro_lm_from_checkpoint(checkpoint, ckpt_path).model.eval().to(device)
    loaded = model, dict(checkpoint.get("datamodule_hyper_parameters") or {})
    if _reused is not None:
        _reused[key] = loaded
    return loaded


@contextmanager
def reuse_loaded_checkpoints():
    """Within the block, `load_checkpoint` reads each file once and hands every later caller the same model: for a
    run of steps on one trained model (the demo's evaluation, knowledge update and sample) that do not change it."""
    global _reused
    outer, _reused = _reused, {} if _reused is None else _reused
    try:
        yield
    finally:
        _reused = outer


def precision_context(precision: str, device: torch.device):
    """bf16 autocast for `bf16`, nothing for `32` (fp16 is not offered: ~100x slower on CPU)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "32":
        raise RetroError(f"--precision must be 32 or bf16, got {precision!r}")
    return torch.autocast(device.type, enabled=False)
