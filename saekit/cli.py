"""`saekit` command line. Each subcommand's module is imported only when it runs.

Every subcommand module `saekit.commands.<name>` defines `add_arguments(parser)` and
`run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from saekit.argparse_dataclass import HelpFormatter
from saekit.faults import fault_message

COMMANDS: dict[str, str] = {
    "cache": "Capture a model layer's activations over image-text data into a sharded cache.",
    "train": "Train a sparse autoencoder on a layer (from a cache, or caching on the fly).",
    "encode": "Encode activations to sparse SAE codes.",
    "info": "Describe an SAE folder or an activation cache.",
    "eval": "Evaluate an SAE: reconstruction, sparsity and downstream loss (JSON + PNG).",
    "dashboard": "Write a static HTML browser of an SAE's atoms over image-text data.",
}


def dispatch(prog: str, package: str, commands: dict[str, str], argv: list[str] | None) -> int:
    """Parse `argv` for one of `commands` and run it: the one error boundary of both CLIs.

    An expected fault (`saekit.faults.fault_message`: a UserError, a full disk, a permission,
    a damaged file, ...) becomes one line on stderr and exit code 2; a bug keeps its traceback.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog=prog)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in commands.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text,
                                    formatter_class=HelpFormatter)
        if argv and argv[0] == name:  # import only the subcommand that runs
            _module(package, name).add_arguments(sub_parser)
    args = parser.parse_args(argv)
    try:
        return int(_module(package, args.command).run(args) or 0)
    except Exception as err:  # noqa: BLE001 - sorted below: faults become a line, bugs re-raise
        message = fault_message(err)
        if message is None:
            raise
        print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
        return 2


def _module(package: str, name: str):
    return importlib.import_module(f"{package}.commands.{name.replace('-', '_')}")


def main(argv: list[str] | None = None) -> int:
    return dispatch("saekit", "saekit", COMMANDS, argv)


if __name__ == "__main__":
    sys.exit(main())
