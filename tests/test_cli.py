"""The `paraloop` command: one logging setup for every verb (PARALOOP_LOG), and a clear error when MLX has no
backend installed (Linux: the cpu / cuda12 / cuda13 extras)."""

import logging

import pytest

from paraloop import cli, logs


@pytest.fixture
def fresh_root_logger():
    """The root logger as a new process has it: no handler (pytest's capture handlers are put back after)."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def fresh() -> logging.Logger:
        root.handlers = []
        return root

    yield fresh
    root.handlers, root.level = saved[0], saved[1]


@pytest.mark.parametrize(
    ("value", "level"),
    [(None, logging.INFO), ("debug", logging.DEBUG), ("WARNING", logging.WARNING), ("error", logging.ERROR)],
)
def test_paraloop_log_sets_the_level(fresh_root_logger, monkeypatch, value, level):
    if value is None:
        monkeypatch.delenv("PARALOOP_LOG", raising=False)
    else:
        monkeypatch.setenv("PARALOOP_LOG", value)
    root = fresh_root_logger()
    logs.setup_logging()
    assert root.level == level
    assert logging.getLogger("aiohttp.access").level == logging.WARNING


def test_an_unknown_level_is_said_and_info_is_used(fresh_root_logger, monkeypatch, capsys):
    monkeypatch.setenv("PARALOOP_LOG", "verbose")
    root = fresh_root_logger()
    logs.setup_logging()
    assert root.level == logging.INFO
    assert "PARALOOP_LOG='verbose' is not one of debug, info, warning, error, critical" in capsys.readouterr().err


def test_every_verb_goes_through_the_same_setup(monkeypatch):
    calls = []
    monkeypatch.setattr(logs, "setup_logging", lambda: calls.append("setup"))
    assert cli.main(["config", "show"]) == 0
    assert calls == ["setup"]


def test_mlx_without_a_backend_is_one_error_line_naming_the_extras(monkeypatch, capsys):
    def no_backend(name):
        raise ImportError("libmlx.so: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(cli.importlib, "import_module", no_backend)
    assert cli.main(["run", "configs/tiny.toml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("paraloop: error: MLX has no backend installed")
    assert "pip install 'mlx[cpu]'" in err and "'mlx[cuda12]'" in err and "-e '.[cpu]'" in err


def test_other_import_errors_are_not_hidden(monkeypatch):
    def broken(name):
        raise ImportError("No module named 'somethingelse'")

    monkeypatch.setattr(cli.importlib, "import_module", broken)
    with pytest.raises(ImportError, match="somethingelse"):
        cli.main(["run"])
