"""The `fedslide` command loads only the chosen subcommand's module: the model-building commands import no Flower."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from fedslide.deploy import cli

FLOWER_FREE = ("preprocess", "train", "distill", "predict")


def _modules_after(argv: list[str]) -> dict[str, list[str]]:
    """In a fresh interpreter: `fedslide ARGV` (its --help exits); then the flwr and fedslide modules loaded."""
    script = textwrap.dedent(f"""
        import json, sys
        from fedslide.deploy.cli import main
        try:
            main({argv!r})
        except SystemExit:
            pass
        print(json.dumps({{"flwr": sorted(m for m in sys.modules if m == "flwr" or m.startswith("flwr.")),
                          "fedslide": sorted(m for m in sys.modules if m.startswith("fedslide."))}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("command", FLOWER_FREE)
def test_a_model_building_command_imports_no_flower(command: str) -> None:
    loaded = _modules_after([command, "--help"])
    assert loaded["flwr"] == []
    assert cli.SUBCOMMANDS[command].module in loaded["fedslide"]  # its own module did load
    others = {
        entry.module for name, entry in cli.SUBCOMMANDS.items() if entry.module != cli.SUBCOMMANDS[command].module
    }
    assert others.isdisjoint(loaded["fedslide"])


def test_the_command_list_loads_no_subcommand_module(capsys: pytest.CaptureFixture[str]) -> None:
    loaded = _modules_after(["--help"])
    assert loaded["flwr"] == []
    assert {entry.module for entry in cli.SUBCOMMANDS.values()}.isdisjoint(loaded["fedslide"])
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    listing = _squeezed(capsys.readouterr().out)  # argparse wraps the lines, at hyphens too
    for name, entry in cli.SUBCOMMANDS.items():
        assert _squeezed(f"{name} {entry.help}") in listing


def test_the_table_matches_what_each_module_registers() -> None:
    """Each subcommand's module registers it with the help line the table lists (so `fedslide --help` is theirs)."""
    for name, entry in cli.SUBCOMMANDS.items():
        parser = cli.build_parser(name)
        assert _squeezed(entry.help) in _squeezed(parser.format_help()), name


def _squeezed(text: str) -> str:
    return "".join(text.split())


def test_the_subcommand_is_the_first_argument_that_is_not_an_option() -> None:
    assert cli.chosen_command(["-v", "train", "--config", "x.toml"]) == "train"
    assert cli.chosen_command(["--help"]) is None
    assert cli.chosen_command([]) is None
    with pytest.raises(SystemExit) as exit_info:  # an unknown subcommand is argparse's usage error, as before
        cli.main(["no-such-command"])
    assert exit_info.value.code == 2
