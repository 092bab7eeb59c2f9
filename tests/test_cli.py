"""``python -m pipeline``: a user's mistake (data, config, flags, output) is one readable line
on stderr and exit status 2; ``--debug`` shows the traceback; a bug keeps its traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import cli
from pipeline import generate as gen


def test_config_error_is_one_message_and_status_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = cli.main(["generate", "--out", str(tmp_path / "g"), "--quiet", "--set", "nope=1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("python -m pipeline generate: error: invalid GenerateConfig config:")
    assert "--set nope=1: nope: unknown key" in err and "Traceback" not in err
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback(tmp_path: Path, where: str) -> None:
    from pipeline.errors import ConfigError

    args = ["generate", "--out", str(tmp_path / "g"), "--set", "nope=1"]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    with pytest.raises(ConfigError, match="unknown key"):
        cli.main(args)


def test_a_bug_keeps_its_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def bug(*_args, **_kwargs):
        raise KeyError("internal")

    monkeypatch.setattr(gen, "_run", bug)
    with pytest.raises(KeyError, match="internal"):
        cli.main(["generate", "--out", str(tmp_path / "g"), "--quiet"])


def test_num_cpus_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "raw"
    raw.mkdir()
    with pytest.raises(SystemExit) as info:
        cli.main(["preprocess", "--raw", str(raw), "--out", str(tmp_path / "o"), "--num-cpus", "0"])
    assert info.value.code == 2
    assert "argument --num-cpus: must be at least 1, got 0" in capsys.readouterr().err
