"""A config file's relative paths are relative to its directory, whatever the current directory; flags' and
environment variables' relative paths stay relative to the current directory; `org/name` that names nothing next to
the file stays a Hugging Face repo id; `config show` prints paths that load the same from anywhere."""

import os
from pathlib import Path

import pytest

from paraloop.config import load_config, read_toml
from paraloop.config_command import main as config_main
from paraloop.flags import FLAGS

REPO = Path(__file__).resolve().parents[1]
CONFIG = """\
[model]
base_path = "{base}"
lora_path = "adapters/a"
[server]
lora_modules = {{ early = "ckpt/step_1", abs = "/srv/a" }}
lora_dirs = ["adapters", "~/x"]
[rl_training.mock]
task = "tasks/my_task.py:sums"
[eval]
task = "paraloop.envs.tasks:one_word"
[checkpoint]
dir = "../runs/r"
resume = "old"
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("PARALOOP_") and "__" in k]:
        monkeypatch.delenv(key)


def write_config(directory: Path, base: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "run.toml"
    path.write_text(CONFIG.format(base=base))
    return path


def test_relative_paths_in_a_file_are_relative_to_the_file_from_any_directory(tmp_path, monkeypatch):
    path = write_config(tmp_path / "configs", "../models/m")
    for cwd, given in ((tmp_path, "configs/run.toml"), (tmp_path / "configs", "run.toml"), (REPO, str(path))):
        monkeypatch.chdir(cwd)
        s = load_config(given)
        here = Path(given).parent  # the file's directory as the current directory reaches it
        assert Path(s.model.base_path).resolve() == tmp_path / "models" / "m", cwd
        assert Path(s.checkpoint.dir).resolve() == tmp_path / "runs" / "r"
        assert Path(s.checkpoint.resume).resolve() == tmp_path / "configs" / "old"
        assert Path(s.model.lora_path).resolve() == tmp_path / "configs" / "adapters" / "a"
        assert s.server.lora_modules == {"early": os.path.normpath(here / "ckpt/step_1"), "abs": "/srv/a"}
        assert s.server.lora_dirs == [os.path.normpath(here / "adapters"), str(Path("~/x").expanduser())]
        assert s.rl_training.mock.task == f"{os.path.normpath(here / 'tasks/my_task.py')}:sums"
        assert s.eval.task == "paraloop.envs.tasks:one_word"  # a module name is imported, not a path
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/run.toml").checkpoint.dir == "runs/r"  # short and relative when the file's path is


def test_org_name_is_a_repo_id_unless_it_names_something_next_to_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = write_config(tmp_path / "configs", "mlx-community/Qwen3-0.6B-4bit")
    assert load_config(path).model.base_path == "mlx-community/Qwen3-0.6B-4bit"
    (tmp_path / "configs" / "mlx-community" / "Qwen3-0.6B-4bit").mkdir(parents=True)
    assert load_config(path).model.base_path == str(tmp_path / "configs" / "mlx-community" / "Qwen3-0.6B-4bit")
    assert load_config(write_config(tmp_path / "c2", "./models/m")).model.base_path == str(tmp_path / "c2/models/m")


def test_flags_and_environment_paths_stay_relative_to_the_current_directory(tmp_path, monkeypatch):
    path = write_config(tmp_path / "configs", "../models/m")
    monkeypatch.setenv("PARALOOP_CHECKPOINT__RESUME", "runs/old")
    s = load_config(path, {"model": {"base_path": "models/mine"}, "checkpoint": {"dir": "runs/mine"}})
    assert (s.model.base_path, s.checkpoint.dir, s.checkpoint.resume) == ("models/mine", "runs/mine", "runs/old")
    assert FLAGS["--model-path"][0] == "model.base_path"


def test_config_show_prints_paths_that_load_the_same_from_elsewhere(tmp_path, monkeypatch, capsys):
    path = write_config(tmp_path / "configs", "../models/m")
    monkeypatch.chdir(tmp_path)
    assert config_main(["show", "configs/run.toml", "--resume", "runs/x"]) == 0
    shown = tmp_path / "elsewhere" / "shown.toml"
    shown.parent.mkdir()
    shown.write_text(capsys.readouterr().out)
    assert read_toml(shown)["model"]["base_path"] == str(tmp_path / "models" / "m")
    again = load_config(shown)
    assert again.checkpoint.resume == str(tmp_path / "runs" / "x")
    assert Path(again.checkpoint.dir) == tmp_path / "runs" / "r"
    assert again.model.lora_path == str(tmp_path / "configs" / "adapters" / "a")
    assert load_config(path).rl_training == again.rl_training


def test_the_shipped_configs_name_the_repositorys_models_and_runs_directories(monkeypatch):
    for cwd in (REPO, REPO / "examples"):
        monkeypatch.chdir(cwd)
        s = load_config(os.path.relpath(REPO / "configs" / "demo.toml"))
        assert Path(s.model.base_path).resolve() == REPO / "models" / "smollm2"
        assert Path(s.checkpoint.dir).resolve() == REPO / "runs" / "demo"
