"""Every subcommand of both CLIs prints its --help (argparse %-formats help text, so a
literal '%' in a config docstring used to crash `segcompass warmstart --help`)."""

import pytest

import saekit.cli
import segcompass.cli


@pytest.mark.parametrize("main, name", [(saekit.cli.main, n) for n in saekit.cli.COMMANDS]
                         + [(segcompass.cli.main, n) for n in segcompass.cli.COMMANDS])
def test_help_of_every_subcommand(main, name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
