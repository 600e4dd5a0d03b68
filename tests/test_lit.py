"""RetroLM on random batches: metrics, schedule, optimizer groups, retrieval on/off logging, checkpoints."""

import math
import shutil

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from retro_lit.data import IGNORE_INDEX, RetroSample
from retro_lit.lit import LanguageModelMetrics, RetroLM, warmup_cosine

V, M, K, T, B = 40, 4, 2, 16, 2  # V and M: those of conftest's tiny_config


class RandomSequences(Dataset):
    """A few fixed random sequences (so that a model can fit them), the last target ignored."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        x = torch.randint(0, V, (T + 1,), generator=g)
        targets = x[1:].clone()
        targets[-1] = IGNORE_INDEX
        neighbors = torch.randint(-1, V, (T // M, K, 2 * M), generator=g)
        return RetroSample(x[:-1], targets, neighbors, torch.where(targets == IGNORE_INDEX, 0, 2))


def loader():
    return DataLoader(RandomSequences(), batch_size=B)


def trainer(tmp_path, **kw):
    return L.Trainer(**{"accelerator": "cpu", "max_steps": 4, "logger": False, "enable_checkpointing": False,
                        "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": tmp_path} | kw)


def test_metrics_sum_states():
    metric = LanguageModelMetrics()
    nats = torch.tensor([[1.0, 2.0, 0.0]])
    targets = torch.tensor([[3, 4, IGNORE_INDEX]])
    metric.update(nats, targets, torch.tensor([[1, 3, 0]]))
    metric.update(nats * 2, targets, torch.tensor([[2, 2, 0]]))
    out = metric.compute()
    assert out["loss"].item() == pytest.approx(9 / 4)
    assert out["ppl"].item() == pytest.approx(math.exp(9 / 4), rel=1e-5)
    assert out["bpb"].item() == pytest.approx(9 / math.log(2) / 8, rel=1e-6)
    assert all(metric._reductions[name] is not None for name in ("nats", "tokens", "bytes"))  # summed over ranks


def test_warmup_then_cosine_to_min_ratio():
    f = lambda step: warmup_cosine(step, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)  # noqa: E731
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0) and f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.55) and f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))
    assert warmup_cosine(50, 10, math.inf, 0.1) == 1.0


def test_optimizer_has_no_decay_on_norms_and_biases(tiny_config, tmp_path):
    module = RetroLM(tiny_config(), lr=1e-3, weight_decay=0.05)
    module.trainer = trainer(tmp_path)
    config = module.configure_optimizers()
    optimizer = config["optimizer"]
    assert isinstance(optimizer, torch.optim.AdamW)
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert all(g["initial_lr"] == 1e-3 for g in optimizer.param_groups)
    for name, p in module.model.named_parameters():
        assert decays[id(p)] == (0.05 if p.dim() >= 2 else 0.0), name
    assert len(decays) == len({id(p) for p in module.parameters()})


@pytest.mark.parametrize("mode", ["both", "on", "off"])
def test_eval_retrieval_modes_log_separate_keys(tiny_config, tmp_path, mode):
    module = RetroLM(tiny_config(), eval_retrieval=mode)
    metrics = trainer(tmp_path).validate(module, loader(), verbose=False)[0]
    on = {"val/loss", "val/ppl", "val/bpb"}
    off = {"val/loss_no_retrieval", "val/ppl_no_retrieval", "val/bpb_no_retrieval"}
    assert set(metrics) == {"both": on | off, "on": on, "off": off}[mode]
    if mode == "both":
        assert metrics["val/loss"] != metrics["val/loss_no_retrieval"]


def test_training_lowers_loss_and_steps_the_schedule(tiny_config, tmp_path):
    module = RetroLM(tiny_config(), lr=1e-2, warmup_steps=2, max_steps=30)
    t = trainer(tmp_path, max_steps=30)
    before = t.validate(module, loader(), verbose=False)[0]["val/loss"]
    t.fit(module, loader())
    after = t.validate(module, loader(), verbose=False)[0]["val/loss"]
    assert after < before - 0.3
    scheduler = t.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 30 and scheduler.get_last_lr()[0] == pytest.approx(1e-3)


def test_baseline_without_cca_trains(tiny_config, tmp_path):
    module = RetroLM(tiny_config(cca_layers=()), retrieval=False, eval_retrieval="off")
    trainer(tmp_path).fit(module, loader(), loader())
    assert module.model.encoder is None


def test_checkpoint_of_a_python_built_module_loads_weights_only(tiny_config, tmp_path):
    module = RetroLM(tiny_config(), lr=1e-3)
    t = trainer(tmp_path, max_steps=1)
    t.fit(module, loader())
    t.save_checkpoint(tmp_path / "m.ckpt")
    ckpt = torch.load(tmp_path / "m.ckpt", weights_only=True)  # what `--ckpt_path` does
    assert ckpt["hyper_parameters"]["config"]["chunk_size"] == M and "optimizer" not in ckpt["hyper_parameters"]
    restored = RetroLM.load_from_checkpoint(tmp_path / "m.ckpt")
    batch = next(iter(loader()))
    module.eval(), restored.eval()
    torch.testing.assert_close(restored(batch.input_ids, batch.neighbors), module(batch.input_ids, batch.neighbors))


def test_fused_training_loss_equals_the_mean_eval_nats(tiny_config, monkeypatch):
    module = RetroLM(tiny_config())
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    batch = next(iter(loader()))
    loss = module.training_step(batch, 0)
    nats = module.token_nats(batch, retrieval=True)
    torch.testing.assert_close(loss, nats.sum() / (batch.targets != IGNORE_INDEX).sum(), rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # inductor compiles C++ for 15-50 s, however small the model
@pytest.mark.skipif(not shutil.which("g++"), reason="torch.compile on CPU needs a C++ compiler")
def test_compiled_encoder_trains_like_eager_and_saves_the_same_weights(tiny_config, monkeypatch):
    torch._dynamo.reset()
    eager, compiled = RetroLM(tiny_config()), RetroLM(tiny_config(), compile=True)
    compiled.load_state_dict(eager.state_dict())  # same parameter names: checkpoints are interchangeable
    batch = next(iter(loader()))
    losses, grads = [], []
    for module in (eager, compiled):
        monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.training_step(batch, 0)
        loss.backward()
        losses.append(loss)
        grads.append(torch.cat([p.grad.flatten() for p in module.model.encoder.parameters()]))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # something was compiled
    torch.testing.assert_close(losses[1], losses[0], rtol=2e-2, atol=2e-2)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_compile_without_a_cpp_compiler_is_refused(tiny_config, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="C\\+\\+ compiler"):
        RetroLM(tiny_config(), compile=True)
