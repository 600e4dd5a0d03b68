"""`retro-lit` and `python -m retro_lit`: restart with the allocator for the command's workload (see
retro_lit.malloc) before the heavy imports, then run the command."""

import sys

from retro_lit.malloc import reexec_with_allocator


def main() -> int:
    reexec_with_allocator(streaming=sys.argv[1:2] == ["build-db"])
    from retro_lit.commands import main as run_command  # after the re-exec: the heavy imports happen once

    return run_command()


if __name__ == "__main__":
    sys.exit(main())
