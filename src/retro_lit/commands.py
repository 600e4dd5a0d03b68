"""The `retro-lit` program: Lightning's `fit`, `validate`, `test`, `predict` and the commands below, one parser.

    retro-lit --help                                       # every command
    retro-lit build-db --corpus python-stdlib:json --workspace ws --chunk_size 32
    retro-lit add-docs --workspace ws --corpus new-docs/          # grow the database of a trained model
    retro-lit evaluate --config eval.yaml --print_config   # any command: --help, --config, --print_config

Bad input, in a flag or a config or a file, is one `error: ...` line on stderr and exit status 2; so is a full disk
(the files written so far are kept, and the same command, rerun, resumes).
"""

import errno
import logging
import sys
from argparse import ArgumentError
from collections.abc import Callable
from typing import NamedTuple
from unittest import mock

from retro_lit.additions import add_documents_command
from retro_lit.cli import RetroCLI, silence_upstream_notices
from retro_lit.demo import demo
from retro_lit.diagnose import diagnose_workspace, format_report
from retro_lit.distributed import build_db
from retro_lit.evaluate import evaluate_checkpoint, evaluation_report
from retro_lit.generate import generate_text
from retro_lit.malloc import fix_mmap_threshold
from retro_lit.tracking import default_wandb_mode
from retro_lit.workspace import RetroError


class Command(NamedTuple):
    run: Callable[..., object]
    """The typed function: its parameters are the command's options, its docstring their help."""
    report: Callable[[object], str] | None = None
    """What to print of its return value (None: the function prints what it has to say)."""


COMMANDS = {
    "build-db": Command(build_db),
    "add-docs": Command(add_documents_command),
    "generate": Command(generate_text),
    "evaluate": Command(evaluate_checkpoint, evaluation_report),
    "diagnose": Command(diagnose_workspace, format_report),
    "demo": Command(demo),
}


def main(argv: list[str] | None = None) -> int:
    """Console entry point `retro-lit`; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    fix_mmap_threshold()  # (a no-op in `retro-lit` itself: retro_lit.__main__ chose its allocator at start-up)
    default_wandb_mode()
    silence_upstream_notices()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("retro_lit").setLevel(logging.INFO)
    try:
        # the arguments are all in `args`; a LightningCLI made inside a command (the demo's fit) must see no others
        with mock.patch.object(sys, "argv", sys.argv[:1]):
            cli = RetroCLI(args=args, commands={name: c.run for name, c in COMMANDS.items()},
                           only_commands=bool(args) and args[0] in COMMANDS, parser_kwargs={"exit_on_error": False})
            command = COMMANDS.get(cli.subcommand)
            if command is not None and command.report is not None:
                print(command.report(cli.command_result))
    except (RetroError, ArgumentError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {e.filename}" if e.filename else ""
        print(f"error: no space left on device{where}; free some space and rerun the same command: it resumes",
              file=sys.stderr)
        return 2
    return 0
