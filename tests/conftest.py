import sys

import pytest
import torch


@pytest.fixture(autouse=True)
def _hermetic(monkeypatch):
    """Seed, keep W&B and the HF hub off, and restore torch's global state after each test."""
    monkeypatch.setattr(sys, "argv", ["retro-lit"])  # in-process runs get their arguments from args= only, not pytest's
    monkeypatch.setenv("WANDB_MODE", "disabled")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    torch.manual_seed(0)
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
