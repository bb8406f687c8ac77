"""The console script: help on every command, one-line errors with exit status 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from distnmt.cli import main

COMMANDS = ["prepare", "train", "evaluate", "translate"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_on_every_command(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"usage: distnmt {command}" in capsys.readouterr().out


def test_console_script_is_installed() -> None:
    out = subprocess.run([sys.executable, "-m", "distnmt.cli", "--help"], capture_output=True, text=True, check=True)
    for command in COMMANDS:
        assert command in out.stdout


def test_light_commands_import_neither_torch_nor_ray() -> None:
    """Every launch/ script runs `distnmt cluster ...`; importing torch for them cost
    about 2 s each (the CLI imported distnmt.checkpoint, which imported torch)."""
    code = ("import sys; from distnmt.cli import main\n"
            "try:\n    main(['cluster', 'pids', '--marker', 'none', '--temp-dir', '/nonexistent/'])\n"
            "except SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_config_error_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--set", "model.hiden_size=3"]) == 2
    err = capsys.readouterr().err
    assert err == "distnmt train: error: --set: unknown key 'model.hiden_size' (did you mean 'model.hidden_size'?)\n"


def test_train_without_prepared_data_says_what_to_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--set", f"data.prepared_dir={tmp_path / 'none'}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "distnmt prepare" in err


def test_translate_rejects_a_non_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["translate", str(tmp_path)]) == 2
    assert "not a distnmt checkpoint" in capsys.readouterr().err


def test_an_error_starts_its_own_line_after_an_open_progress_bar(capsys) -> None:
    """A bar left open by the failing step (``clean: 0 pairs [00:00, ? pairs/s]``) is
    ended before the one-line error, which then starts a line of its own."""
    from tqdm import tqdm

    from distnmt.cli import main

    bar = tqdm(desc="clean", unit=" pairs")  # stderr, no total, never closed by its owner
    bar.update(0)
    assert main(["prepare", "--set", "data.no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "clean: 0 pairs" in err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("distnmt prepare: error: ") and "no_such_key" in last, repr(err)
