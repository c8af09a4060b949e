"""Configuration: precedence CLI > environment > TOML > default, clear errors, every shipped file loads."""

import argparse
import sys
from pathlib import Path

import pytest

from support import procs
from paraloop.config import ConfigError, Settings, load_config, to_toml
from paraloop.config_command import render_docs
from paraloop.flags import add_config_flags, overrides_from_args

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    return parser.parse_args(argv)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("PARALOOP_") and "__" in k]:
        monkeypatch.delenv(key)


def test_toml_value_takes_effect_when_no_flag_is_given(tmp_path):
    path = write(tmp_path, "[rl_training]\nlearning_rate = 3e-4\nkl_beta = 0.2\n")
    args = parse(["--batch-size", "4"])  # another flag, whose default must not clobber the file's values
    settings = load_config(path, overrides_from_args(args))
    assert settings.rl_training.learning_rate == 3e-4
    assert settings.rl_training.kl_beta == 0.2
    assert settings.rl_training.batch_size == 4


def test_precedence_flag_over_env_over_toml_over_default(tmp_path, monkeypatch):
    path = write(tmp_path, "[rl_training]\nlearning_rate = 1e-3\nclip_ratio = 0.3\n[rl_training.lora]\nrank = 4\n")
    monkeypatch.setenv("PARALOOP_RL_TRAINING__LEARNING_RATE", "2e-3")
    monkeypatch.setenv("PARALOOP_RL_TRAINING__LORA__RANK", "6")
    settings = load_config(path, overrides_from_args(parse(["--learning-rate", "5e-3"])))
    assert settings.rl_training.learning_rate == 5e-3  # flag beats env
    assert settings.rl_training.lora.rank == 6  # env beats TOML
    assert settings.rl_training.clip_ratio == 0.3  # TOML beats default
    assert settings.rl_training.kl_estimator == "k3"  # default


def test_predecessor_spellings_are_accepted(tmp_path):
    path = write(
        tmp_path,
        """[model]\nbase_path = "m"\n[rl_training]\nsteps = 7\ncheckpoint_interval = 3\nsave_every_step = true
atropos_url = "http://localhost:8001"\n[rl_training.lora]\nalpha = 32\nrank = 16
target_modules = ["self_attn.q_proj"]\n""",
    )
    s = load_config(path)
    assert s.rl_training.total_steps == 7
    assert s.checkpoint.interval == 3 and s.checkpoint.save_every_step is True
    assert s.rl_training.atropos.api_url == "http://localhost:8001"
    assert s.rl_training.lora.keys == ["self_attn.q_proj"]
    assert s.rl_training.lora.effective_scale == 2.0


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "[rl_training]\nlearnin_rate = 1e-3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "rl_training.learnin_rate" in str(err.value) and str(path) in str(err.value)
    assert "unknown key" in str(err.value)


def test_wrong_type_names_key_and_source(tmp_path, monkeypatch):
    path = write(tmp_path, '[server]\nport = "eighty"\n')
    with pytest.raises(ConfigError, match=r"server\.port.*" + str(path).replace(".", r"\.")):
        load_config(path)
    monkeypatch.setenv("PARALOOP_RL_TRAINING__KL_BETA", "lots")
    with pytest.raises(ConfigError, match="PARALOOP_RL_TRAINING__KL_BETA"):
        load_config(None)
    monkeypatch.delenv("PARALOOP_RL_TRAINING__KL_BETA")
    with pytest.raises(ConfigError, match="kl_estimator.*command line"):
        load_config(None, overrides_from_args(parse(["--kl-estimator", "k9"])))


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[server\nport = 1"))


def test_non_loopback_host_needs_a_token():
    with pytest.raises(ConfigError, match="control_token"):
        load_config(None, {"server": {"host": "0.0.0.0"}})
    assert load_config(None, {"server": {"host": "0.0.0.0", "control_token": "s3cret"}}).server.host == "0.0.0.0"


def test_set_flag_reaches_any_key(tmp_path):
    args = parse(["--set", 'rl_training.lora.keys="all"', "--set", "engine.max_n=4", "--save-every-step"])
    s = load_config(None, overrides_from_args(args))
    assert s.rl_training.lora.keys == "all" and s.engine.max_n == 4 and s.checkpoint.save_every_step is True


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_loads_and_round_trips(path, tmp_path):
    settings = load_config(path)
    rendered = write(tmp_path, to_toml(settings))
    assert load_config(rendered) == settings


def test_configuration_docs_are_current():
    assert (REPO / "docs" / "configuration.md").read_text() == render_docs(), "run `paraloop config docs`"
    for name in Settings.model_fields:
        assert f"## [{name}]" in render_docs()


def test_config_show_cli_errors_in_one_line(tmp_path):
    bad = write(tmp_path, "[rl_training]\nbogus = 1\n")
    proc = procs.run([sys.executable, "-m", "paraloop", "config", "show", str(bad)], timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "rl_training.bogus" in proc.stderr
    ok = procs.run(
        [sys.executable, "-m", "paraloop", "config", "show", str(REPO / "configs/tiny.toml"), "--learning-rate", "0.5"],
        timeout=60,
    )
    assert ok.returncode == 0 and "learning_rate = 0.5" in ok.stdout
