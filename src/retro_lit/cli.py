"""`RetroCLI`: LightningCLI's `fit`, `validate`, `test`, `predict` for `RetroLM` on a `RetroDataModule`, plus any
typed function as a subcommand of the same parser (retro_lit.commands adds build-db, generate, evaluate, ...), so
`--help`, `--config` and `--print_config` work the same in every command.

    retro-lit fit --config configs/tiny.yaml
    retro-lit fit --config configs/tiny.yaml --ckpt_path last          # resume
    retro-lit validate --config configs/tiny.yaml --ckpt_path runs/tiny/checkpoints/last.ckpt
    retro-lit fit --config configs/demo.yaml --trainer configs/trainer/gpu.yaml
    retro-lit fit --config configs/tiny.yaml --print_config=comments,skip_null
"""

import inspect
import logging
import os
import pickle
import sys
import typing
import warnings
from collections.abc import Callable
from pathlib import Path

import docstring_parser
import yaml
from jsonargparse import ActionYesNo, set_parsing_settings
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ModelSummary, ProgressBar, TQDMProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, WandbLogger

from retro_lit.checkpoint import refuse_unpickling
from retro_lit.data import RetroDataModule
from retro_lit.lit import LogProgressBar, NeighborTableCallback, ParameterSummary, RetroLM
from retro_lit.workspace import RetroError


class WandbSaveConfigCallback(SaveConfigCallback):
    """Writes `config.yaml` to the log dir (overwriting) and, with a `WandbLogger`, logs it as the run config."""

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_unset=False))
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_hyperparams({"config": config})


def asks_for_help(args) -> bool:
    """Does this command line print help (`-h`, `--help`, `--model.help CLASS`, `--print_config=comments`)? Only
    then are dataclass fields' docstrings read for it: that reads the source of every class in the parsers
    (inspect.getsource), ~75 % of building them (2.8 -> 0.6 s for `fit`)."""
    if not isinstance(args, (list, tuple)):
        return False  # a dict or Namespace of settings: no help
    return any(a in ("-h", "--help") or a.endswith(".help") or a.startswith("--print_config") and "comments" in a
               for a in map(str, args))


class RetroCLI(LightningCLI):
    """LightningCLI for `RetroLM` and `RetroDataModule`, with the vocabulary and chunk size linked from data to model.

    `--checkpoint.*` configures the always-present `ModelCheckpoint` (`save_last` on; its folder defaults to
    `<trainer.default_root_dir>/checkpoints`, so `fit --ckpt_path last` finds the previous run's `last.ckpt`; a
    new run there replaces its checkpoints, unless `--checkpoint.enable_version_counter=true`).
    Unless the config says otherwise, the Trainer logs to CSV in `default_root_dir` and shows progress as
    Lightning's tqdm bar on a terminal, else as `LogProgressBar` lines (a redrawn bar in a log is one endless line),
    and sums up the model in one `ParameterSummary` line instead of Lightning's model summary table.
    A `--ckpt_path` loads weights-only (no `--weights_only` flag): a checkpoint holding other Python objects is one
    `RetroError` line (`retro_lit.checkpoint.refuse_unpickling`), never unpickled.

    `commands` maps more subcommand names to typed functions: their parameters become the subcommand's options
    (help from the docstring's `Args:`; a `bool` is a `--name`/`--no_name` flag), and the function runs with them;
    `command_result` is what it returned. `only_commands` leaves out fit/validate/test/predict, whose parsers
    (the Trainer's, the model's and the data's signatures and docstrings) take ~2 s to build: for a run of a command.
    """

    def __init__(self, *args, commands: dict[str, Callable[..., object]] | None = None, only_commands: bool = False,
                 **kwargs):
        argv = sys.argv[1:] if kwargs.get("args") is None else kwargs["args"]
        set_parsing_settings(docstring_parse_style=docstring_parser.DocstringStyle.GOOGLE,
                             docstring_parse_attribute_docstrings=asks_for_help(argv))
        self.commands, self.only_commands = commands or {}, only_commands
        self.command_result = None  # what the command's function returned
        kwargs.setdefault("model_class", RetroLM)
        kwargs.setdefault("datamodule_class", RetroDataModule)
        kwargs.setdefault("save_config_callback", WandbSaveConfigCallback)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("trainer_defaults", {"callbacks": [NeighborTableCallback()]})
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        # a new fit into a used folder replaces its checkpoints: with Lightning's version counter, it wrote
        # last-v1.ckpt and left last.ckpt, which `fit --ckpt_path last`, evaluate and the demo read, the old run's
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.enable_version_counter": False})
        parser.link_arguments("data.chunk_size", "model.config.chunk_size")
        parser.link_arguments("data.vocab_size", "model.config.vocab_size", apply_on="instantiate")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs) -> None:
        if self.only_commands:
            self._subcommand_parsers = {}
            parser.add_subcommands()
        else:
            super()._add_subcommands(parser, **kwargs)
        for name, function in self.commands.items():
            description = " ".join(inspect.getdoc(function).split("\n\n")[0].split())
            subparser = self.init_parser(description=description)
            add_function_options(subparser, function)
            parser._subcommands_action.add_subcommand(name, subparser, help=description)

    def _running_command(self) -> bool:
        return self.config.get("subcommand") in self.commands

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        # no `--weights_only`: every checkpoint loads weights-only (_prepare_subcommand_kwargs)
        return {name: {*skip, "weights_only"} for name, skip in LightningCLI.subcommands().items()}

    # a command is not a Trainer method: no checkpoint hyperparameters, seed, model, data or trainer to set up
    def _parse_ckpt_path(self) -> None:
        if self._running_command():
            return
        try:  # (reads the hyperparameters of a --ckpt_path file, weights-only)
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as e:
            refuse_unpickling(self.config[self.config.subcommand].get("ckpt_path"), e)

    def _set_seed(self) -> None:
        if not self._running_command():
            super()._set_seed()

    def before_instantiate_classes(self) -> None:
        if self._running_command():
            return
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.checkpoint.dirpath is None:
            root = config.trainer.default_root_dir or os.getcwd()
            config.checkpoint.dirpath = str(Path(root) / "checkpoints")

    def instantiate_classes(self) -> None:
        if self._running_command():
            return
        try:
            super().instantiate_classes()
        except ValueError as e:  # config validation (`RetroConfig.__post_init__` etc.): one line, not a traceback
            raise RetroError(str(e)) from e

    def _run_subcommand(self, subcommand: str) -> None:
        if subcommand not in self.commands:
            try:  # (the Trainer loads `--ckpt_path last`, `best` or `hpc`)
                return super()._run_subcommand(subcommand)
            except pickle.UnpicklingError as e:
                refuse_unpickling(self.trainer.ckpt_path, e)
        options = self.parser.instantiate(self.config)[subcommand]  # dataclass options become objects
        self.command_result = self.commands[subcommand](**{k: v for k, v in options.items() if k != "config"})

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        return {**super()._prepare_subcommand_kwargs(subcommand), "weights_only": True}

    def instantiate_trainer(self, **kwargs) -> Trainer:
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):  # Lightning's own default, named: no notice about tensorboard
            kwargs.setdefault("logger", CSVLogger(config.get("default_root_dir") or os.getcwd()))
        callbacks = config.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        extra = []
        # (Lightning refuses a progress bar callback with enable_progress_bar false, and a second one)
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            extra.append(TQDMProgressBar() if sys.stderr.isatty() else LogProgressBar())
        if config.get("enable_model_summary") is None and not any(isinstance(c, ModelSummary) for c in callbacks):
            kwargs.setdefault("enable_model_summary", False)  # unless asked for: one line, not its table
            extra.append(ParameterSummary())
        if extra:
            kwargs.setdefault("callbacks", [*callbacks, *extra])
        return super().instantiate_trainer(**kwargs)


def add_function_options(parser: LightningArgumentParser, function: Callable[..., object]) -> None:
    """`function`'s parameters as options of `parser`; a `bool` one is a `--name` / `--no_name` flag (so its name
    must not start with `no_`)."""
    hints = typing.get_type_hints(function)
    flags = [name for name in inspect.signature(function).parameters if hints.get(name) is bool]
    parser.add_function_arguments(function, skip=set(flags), fail_untyped=True)
    docs = {p.arg_name: p.description for p in docstring_parser.parse(inspect.getdoc(function)).params}
    for name in flags:
        if name.startswith("no_"):  # ActionYesNo reads any `--no_...` as the negation
            raise TypeError(f"{function.__name__}({name}: bool): name the flag positively, e.g. {name[3:]}=True")
        default = inspect.signature(function).parameters[name].default
        parser.add_argument(f"--{name}", action=ActionYesNo, default=default, help=docs.get(name))


def not_litlogger_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("💡 Tip: For seamless cloud logging")


def silence_upstream_notices() -> None:
    """Hide the third-party notices of a first run that a user can do nothing about, each by message and module
    (so every other warning, ours or theirs, still shows)."""
    # Lightning 2.6's CLI calls three jsonargparse APIs deprecated in 4.49, and jsonargparse prefaces the first
    jsonargparse_apis = r"\s*(skip_none parameter|``ArgumentParser.add_instantiator``|``instantiate_classes``) was "
    for message in (jsonargparse_apis, r"\s*By default only one JsonargparseDeprecationWarning"):
        warnings.filterwarnings("ignore", message, DeprecationWarning, module=r"lightning\.pytorch\.cli")
    # Lightning's pytree helper still builds torch's LeafSpec, which torch 2.13 deprecates
    warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning,
                            module=r"lightning\.pytorch\.utilities\._pytree")
    # every Trainer without Lightning's cloud logger advertises it (an info line, not a warning)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(not_litlogger_tip)
