"""`retro-lit` and `python -m retro_lit`: restart with the allocator for the command's workload (see
retro_lit.malloc) before the heavy imports, then run the CLI."""

import sys

from retro_lit.malloc import reexec_with_allocator


def main() -> int:
    reexec_with_allocator(streaming=sys.argv[1:2] == ["build-db"])
    from retro_lit.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
