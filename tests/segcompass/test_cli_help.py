"""Every subcommand of both CLIs prints its --help, and the help fits a screen: at most
MAX_HELP_LINES lines in an 80-column terminal. (argparse %-formats help text, so a literal
'%' in a config docstring used to crash `segcompass warmstart --help`.)"""

import argparse
import contextlib
from unittest import mock

import pytest

import saekit.cli
import segcompass.cli

MAX_HELP_LINES = 80


def _subcommands(main) -> list[str]:
    """The subcommands `main`'s own top-level parser offers (read from the parser, not a list)."""
    parsers: list[argparse.ArgumentParser] = []

    def capture(self, *args, **kwargs):
        parsers.append(self)
        raise SystemExit(0)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), contextlib.suppress(SystemExit):
        main([])
    (sub,) = [a for a in parsers[0]._actions if isinstance(a, argparse._SubParsersAction)]
    return list(sub.choices)


CASES = [(cli, name) for cli in (saekit.cli, segcompass.cli) for name in (None, *_subcommands(cli.main))]


def test_subcommands_are_found():
    assert set(_subcommands(saekit.cli.main)) == set(saekit.cli.COMMANDS)
    assert set(_subcommands(segcompass.cli.main)) == set(segcompass.cli.COMMANDS)


@pytest.mark.parametrize("cli, name", CASES, ids=[f"{c.__name__.split('.')[0]}-{n or 'top'}" for c, n in CASES])
def test_help_exits_0_and_fits_a_screen(cli, name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"] if name else ["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    lines = out.splitlines()
    assert len(lines) <= MAX_HELP_LINES, f"{len(lines)} lines:\n{out}"
