"""`retro-lit`: in-process parsing and errors, and end-to-end runs of the real command in subprocesses."""

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from helpers import make_corpus
from retro_lit.cli import RetroCLI
from retro_lit.commands import COMMANDS, Command, main
from retro_lit.data import RetroDataModule
from retro_lit.demo import BASELINE

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = str(CONFIGS / "tiny.yaml")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_bert_path):
    """Corpus and embedder of the tiny config, and a workspace built from them."""
    tmp = tmp_path_factory.mktemp("cli")
    corpus = make_corpus(tmp / "corpus", n_docs=40, words_per_doc=24, one_file_per_doc=True)
    paths = {"corpus": corpus, "embedder": tiny_bert_path, "workspace": tmp / "ws"}
    paths = {k: str(v) for k, v in paths.items()}
    data = yaml.safe_load(Path(TINY).read_text())["data"]
    RetroDataModule(**{**data, **paths}).prepare_data()
    return paths


def args_for(tiny, run_dir, *extra, **data):
    data = {**tiny, **data}
    return ["--config", TINY, *[f"--data.{k}={v}" for k, v in data.items()], f"--trainer.default_root_dir={run_dir}", *extra]


def retro_lit(*args, env=None, timeout=300, log=None):
    """Run the installed console script (as a user would); returns the completed process.

    log: a file that gets stdout and stderr, as with `retro-lit ... > log 2>&1`; else both are captured."""
    script = Path(sys.executable).with_name("retro-lit")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "retro_lit"]
    env = {**os.environ, **(env or {})}
    if log is None:
        proc = subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=timeout)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc
    with open(log, "w") as f:
        proc = subprocess.run([*command, *args], stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    assert proc.returncode == 0, Path(log).read_text()[-3000:]
    return proc


def read_metrics(run_dir, version):
    with open(Path(run_dir) / "lightning_logs" / f"version_{version}" / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD, glibc tunables")
def test_process_restarts_itself_once_with_its_allocator_and_keeps_a_users_own():
    from retro_lit.malloc import STREAMING_TUNABLES, mimalloc_path

    def run(streaming=False, **env):
        code = (f"import os; from retro_lit.malloc import reexec_with_allocator; reexec_with_allocator({streaming}); "
                "mimalloc = 'libmimalloc' in open('/proc/self/maps').read(); "
                "print(os.getpid(), mimalloc, os.environ.get('LD_PRELOAD'), os.environ.get('GLIBC_TUNABLES'))")
        base = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_")}
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env={**base, **env})
        out, _ = proc.communicate(timeout=60)  # a restart loop would never print
        pid, loaded, preload, tunables = out.split()
        assert int(pid) == proc.pid  # exec: the same process
        return loaded == "True", preload, tunables

    if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
        pytest.skip("not glibc")
    path = mimalloc_path()
    assert path is not None  # a dependency of retro_lit on Linux
    assert run() == (True, path, "None")  # training and the rest: mimalloc
    assert run(streaming=True) == (False, "None", STREAMING_TUNABLES)  # build-db: glibc, tuned
    assert run(streaming=True, GLIBC_TUNABLES="glibc.rtld.optional_static_tls=4096") == (
        False, "None", "glibc.rtld.optional_static_tls=4096:" + STREAMING_TUNABLES)
    assert run(GLIBC_TUNABLES="glibc.malloc.arena_max=2") == (False, "None", "glibc.malloc.arena_max=2")  # the user's
    assert run(streaming=True, MALLOC_MMAP_THRESHOLD_="1048576") == (False, "None", "None")
    jemalloc = "/nonexistent/libjemalloc.so.2"  # (the loader skips a missing preload with a warning)
    assert run(LD_PRELOAD=jemalloc) == (False, jemalloc, "None")


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate", "test", "predict", *COMMANDS):
        assert f"    {command} " in out
    assert set(COMMANDS) == {"build-db", "add-docs", "generate", "evaluate", "diagnose", "demo"}


def test_fit_help_documents_the_model_configs_fields(capsys):
    # field docstrings are read only when help is printed (they cost ~2 s per parser build otherwise)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--model.config.cca_sink {true,false} Give every CCA head a null key" in help_text


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help_and_prints_its_config(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0 and "--config CONFIG" in capsys.readouterr().out
    required = {"build-db": ["--corpus", "c", "--workspace", "w"], "add-docs": ["--corpus", "c", "--workspace", "w"],
                "generate": ["--ckpt_path", "x", "--workspace", "w",
                "--prompt", "p"], "evaluate": ["--ckpt_path", "x", "--workspace", "w"], "diagnose": ["--workspace", "w"]}
    with pytest.raises(SystemExit):
        main([command, *required.get(command, []), "--print_config"])
    printed = tmp_path / "printed.yaml"
    printed.write_text(capsys.readouterr().out)
    with pytest.raises(SystemExit):  # the printed config reads back as --config, giving the same config
        main([command, "--config", str(printed), "--print_config"])
    assert capsys.readouterr().out == printed.read_text()


def test_a_command_reads_flags_lists_and_nested_options_from_a_config(tmp_path, capsys):
    config = tmp_path / "build.yaml"
    config.write_text("corpus: c\nworkspace: w\nsplit: [0.8, 0.1, 0.1]\nquiet: true\ntrainer:\n  devices: 2\n")
    with pytest.raises(SystemExit):
        main(["build-db", "--config", str(config), "--chunk_size", "16", "--no_quiet", "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["split"] == [0.8, 0.1, 0.1] and printed["chunk_size"] == 16 and printed["quiet"] is False
    assert printed["trainer"]["devices"] == 2 and printed["trainer"]["accelerator"] == "auto"


@pytest.mark.parametrize("args", [["build-db", "--corpus", "c", "--workspace", "w", "--chunk_size", "many"],
                                  ["build-db", "--corpus", "c"], ["evaluate", "--bogus", "1"], ["fit", "--nope"]])
def test_a_bad_flag_is_one_error_line(args, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("**/*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_parses(path, capsys):
    parts = {"trainer": ["--config", TINY, "--trainer", str(path)], "logger": ["--config", TINY, "--trainer.logger", str(path)],
             "experiments": ["--config", str(CONFIGS / "demo.yaml"), "--config", str(path)]}
    config_args = parts.get(path.parent.name, ["--config", str(path)])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *config_args, "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["workspace"] and printed["model"]["config"]["n_layer"] > 0


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", TINY, "--print_config"])
    first = capsys.readouterr().out
    (tmp_path / "printed.yaml").write_text(first)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "printed.yaml"), "--print_config"])
    assert capsys.readouterr().out == first
    config = yaml.safe_load(first)
    assert "vocab_size" not in config["model"]["config"] and "chunk_size" not in config["model"]["config"]  # linked


def test_links_vocab_and_chunk_size_from_data(tiny, tmp_path):
    cli = RetroCLI(args=args_for(tiny, tmp_path), run=False)
    assert cli.model.hparams.config["vocab_size"] == 257 and cli.model.hparams.config["chunk_size"] == 16
    assert cli.model.model.chunk_len == 16 and cli.model.model.token_emb.num_embeddings == 257


class FirstBatches(L.Callback):
    """Records the input ids of the training batches a fit sees."""

    def __init__(self):
        self.input_ids = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.input_ids.append(batch.input_ids.clone())


def first_batches(tiny, run_dir, *extra) -> torch.Tensor:
    cli = RetroCLI(args=args_for(tiny, run_dir, "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
                                 "--trainer.logger=false", *extra), run=False)
    recorder = FirstBatches()
    cli.trainer.callbacks.append(recorder)
    cli.trainer.fit(cli.model, cli.datamodule)
    return torch.stack(recorder.input_ids)  # (steps, B, T)


def test_retro_and_its_baseline_train_on_the_same_batches_in_the_same_order(tiny, tmp_path):
    retro = first_batches(tiny, tmp_path / "retro")
    baseline = first_batches(tiny, tmp_path / "baseline", *BASELINE)  # fewer parameters: fewer draws at init
    assert torch.equal(retro, baseline)
    other_seed = first_batches(tiny, tmp_path / "seed1", "--seed_everything=1")
    assert not torch.equal(retro, other_seed)  # the order follows the run's seed


@pytest.mark.parametrize("command", ["fit", "test", "predict"])
def test_fast_dev_run_in_process(tiny, tmp_path, command):
    assert main([command, *args_for(tiny, tmp_path, "--trainer.fast_dev_run=1")]) == 0


def test_config_error_is_one_line(tiny, tmp_path, capsys):
    assert main(["fit", *args_for(tiny, tmp_path, "--model.config.cca_layers=[7]")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "cca_layers" in err and "Traceback" not in err


def test_other_chunk_length_than_the_workspace_is_refused(tiny, tmp_path, capsys):
    assert main(["fit", *args_for(tiny, tmp_path, "--data.chunk_size=8", "--data.seq_len=128")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "chunk_len=16" in err and "Traceback" not in err


UPSTREAM_NOTICES = (
    "tensorboardX",  # Lightning without a logger named: "`logger=True` will use `CSVLogger`..."
    "litlogger",  # "Tip: For seamless cloud logging..."
    "LeafSpec",  # torch's deprecation, hit by Lightning's pytree helper
    "skip_none", "add_instantiator", "instantiate_classes", "JsonargparseDeprecationWarning",  # Lightning's CLI
    "LightningCLI's args parameter",
)


def test_a_fit_logged_to_a_file_shows_progress_and_no_upstream_notices(tiny, tmp_path):
    log = tmp_path / "fit.log"
    # PYTHONWARNINGS=default: deprecations show as in a developer's run (Python hides most of them otherwise)
    retro_lit("fit", *args_for(tiny, tmp_path / "run", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
                               "--trainer.enable_model_summary=null"),  # the default, which tiny.yaml turns off
              log=log, env={"PYTHONWARNINGS": "default"})
    text = log.read_text()
    real = "The number of training batches (6) is smaller than the logging interval"  # 51 sequences, log every 10
    assert text.count(real) == 1, text  # a warning about the user's own settings still shows
    text = "\n".join(line for line in text.splitlines() if real not in line)
    rate = r"[\d.]+k? (step/s|s/step)"
    assert re.search(rf"^INFO retro_lit.progress: train: 4/4 step \(100%\), {rate}, \d\d:\d\d elapsed, train/loss=[\d.]+",
                     text, re.M), text
    assert len(re.findall(r"validate: 1/1 batch \(100%\), .*val/loss=[\d.]+", text)) == 2, text  # steps 2 and 4
    assert not [notice for notice in UPSTREAM_NOTICES if notice in text], text
    assert re.search(r"^model: RetroModel, [\d.]+M parameters \([\d.]+M trainable, 0.00M frozen\)$", text, re.M)
    assert "FLOPs" not in text and "model summary" not in text, text  # Lightning's table under bf16-mixed
    assert not re.search(r"\.py:\d+: ", text), text  # nor any other warning (`file.py:line: message`)


def demo_like(fit_args: list[str]) -> None:
    """A command that builds the CLI from Python, as `retro-lit demo` does.

    Args:
        fit_args: the arguments of that CLI.
    """
    RetroCLI(args=fit_args, run=False)


def test_a_command_runs_lightning_cli_the_way_it_expects(tiny, tmp_path, monkeypatch, recwarn):
    args = ["demo-like", "--fit_args", json.dumps(args_for(tiny, tmp_path))]
    monkeypatch.setattr(sys, "argv", ["retro-lit", *args])  # what the console script gets
    monkeypatch.setitem(COMMANDS, "demo-like", Command(demo_like))
    assert main(args) == 0
    assert not [w for w in recwarn if "args parameter" in str(w.message)]  # "...both args and command line..."
    assert sys.argv == ["retro-lit", *args]  # restored


@pytest.mark.slow
def test_fit_validate_resume(tiny, tmp_path):
    run = tmp_path / "run"
    common = args_for(tiny, run, "--trainer.val_check_interval=10", "--trainer.log_every_n_steps=5")
    retro_lit("fit", *common, "--trainer.max_steps=20")
    # the loss falls
    rows = read_metrics(run, 0)
    train = [float(r["train/loss"]) for r in rows if r["train/loss"]]
    val = [float(r["val/loss"]) for r in rows if r["val/loss"]]
    assert train[-1] < train[0] - 1.0 and val[-1] < val[0]
    last = run / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 20
    # validate in a new process, from the checkpoint: the same weights give the same val loss
    retro_lit("validate", *common, f"--ckpt_path={last}")
    assert float(read_metrics(run, 1)[0]["val/loss"]) == pytest.approx(val[-1], abs=1e-3)
    # resume: the step count, the optimizer and the schedule continue
    retro_lit("fit", *common, "--trainer.max_steps=30", "--ckpt_path=last")
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == 30
    assert ckpt["lr_schedulers"][0]["last_epoch"] == 30
    assert all(state["step"] == 30 for state in ckpt["optimizer_states"][0]["state"].values())
    assert min(int(r["step"]) for r in read_metrics(run, 2)) >= 20
    # a new run into the same folder: last.ckpt is its own (Lightning's default left it and wrote last-v1.ckpt)
    retro_lit("fit", *common, "--trainer.max_steps=5")
    assert torch.load(last, weights_only=True)["global_step"] == 5
    assert not list(run.glob("checkpoints/*-v1.ckpt"))


@pytest.mark.slow
def test_ddp_on_two_cpu_processes_builds_the_database_once(tiny, tmp_path):
    workspace = tmp_path / "ws"  # a fresh workspace, built inside the DDP run
    proc = retro_lit("fit", *args_for(tiny, tmp_path / "run", workspace=workspace), "--trainer.strategy=ddp",
                     "--trainer.devices=2", "--trainer.accelerator=cpu", "--trainer.max_steps=4",
                     "--trainer.limit_val_batches=2", "--trainer.val_check_interval=2")
    log = proc.stdout + proc.stderr
    assert log.count("prepare_data: building or resuming workspace") == 1, log[-3000:]
    assert "distributed_backend=gloo" in log
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4


@pytest.mark.slow
def test_wandb_offline_run_leaves_its_folder(tiny, tmp_path):
    save_dir = tmp_path / "wandb_runs"
    retro_lit("fit", *args_for(tiny, tmp_path / "run"), "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
              f"--trainer.logger.save_dir={save_dir}", "--trainer.logger.project=retro-lit-test",
              "--trainer.max_steps=10", "--trainer.val_check_interval=5", "--trainer.limit_val_batches=2",
              env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    runs = list((save_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    # offline runs keep history and config in the run's protobuf log (no wandb-summary.json until synced)
    (log,) = runs[0].glob("run-*.wandb")
    records = log.read_bytes()
    for key in (b"train/loss", b"val/loss", b"val/bpb", b"val/bpb_no_retrieval", b'"config"', b"num_neighbors"):
        assert key in records, key
    (table, *_) = sorted((runs[0] / "files").glob("media/table/val/neighbors_*.table.json"))
    table = json.loads(table.read_text())
    assert table["columns"][:3] == ["chunk", "text", "neighbor_0"] and table["data"]
