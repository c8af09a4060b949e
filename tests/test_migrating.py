"""What a user of the predecessor brings along: its example TOML, its flags and spellings (accepted, warned about when
they change nothing, or named with the key that replaces them); configuration mistakes found before anything loads;
`merge --upload-repo` up to the upload itself (which needs the network and an account: patched here)."""

import logging
from pathlib import Path

import pytest

from paraloop.config import load_config, read_toml
from paraloop.config_paths import absolute_paths
from paraloop.config_command import main as config_main
from paraloop.run.preflight import settings_problems

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "tiny.toml"

# The seed document's "Configuration Example" (train_config.toml), verbatim but for its `lora_path = null` line:
# TOML has no null.
SEED_TRAIN_CONFIG = """\
# train_config.toml
[server]
port = 8000
host = "127.0.0.1"

[model]
base_path = "mlx-community/Llama-3.2-3B-Instruct-4bit"

[rl_training]
algorithm = "grpo"
learning_rate = 1e-5
batch_size = 8
steps = 1000
kl_beta = 0.05
checkpoint_interval = 100
save_every_step = true

[rl_training.lora]
rank = 16
alpha = 32
dropout = 0.05
num_layers = 8
target_modules = ["self_attn.q_proj", "self_attn.v_proj"]

[rl_training.atropos]
api_url = "http://localhost:8001"
token_budget = 16384
"""

# Its "TOML Config (server + model + RL)", less `lora_path = null` and `atropos_url = null`.
SEED_SERVER_CONFIG = """\
[server]
host = "127.0.0.1"
port = 8000
batch_size = 8            # Inference: max dynamic batch size
max_concurrent_requests = 100

[model]
base_path = "./models/hermes-qwen3-14b-4bit"

[rl_training]
algorithm = "grpo"
learning_rate = 1e-5
batch_size = 8            # Trainer batch grouping (provider dependent)
update_epochs = 1         # Reserved for future use
kl_beta = 0.05
entropy_weight = 0.0
clip_ratio = 0.2
total_steps = 1000
checkpoint_interval = 50
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in [k for k in os.environ if k.startswith("PARALOOP_") and "__" in k]:
        monkeypatch.delenv(key)


def test_the_seed_example_toml_loads_with_config_show(tmp_path, capsys):
    path = tmp_path / "train_config.toml"
    path.write_text(SEED_TRAIN_CONFIG)
    assert config_main(["show", str(path)]) == 0  # loads without the network: the repo id is not resolved here
    shown = tmp_path / "shown.toml"
    shown.write_text(capsys.readouterr().out)
    resolved = read_toml(shown)
    rl = resolved["rl_training"]
    assert resolved["model"]["base_path"] == "mlx-community/Llama-3.2-3B-Instruct-4bit"
    assert rl["total_steps"] == 1000 and rl["batch_size"] == 8 and rl["token_budget"] == 16384
    assert rl["atropos"]["api_url"] == "http://localhost:8001" and "token_budget" not in rl["atropos"]
    assert rl["lora"]["alpha"] == 32 and rl["lora"]["keys"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert resolved["checkpoint"]["interval"] == 100 and resolved["checkpoint"]["save_every_step"] is True
    # what show prints loads the same (its relative paths printed absolute, so they mean the same wherever it is saved)
    assert load_config(shown).model_dump(mode="json") == absolute_paths(load_config(path).model_dump(mode="json"))


def test_the_seeds_other_example_toml_loads_too(tmp_path, capsys):
    path = tmp_path / "server_config.toml"
    path.write_text(SEED_SERVER_CONFIG)
    assert config_main(["show", str(path)]) == 0
    settings = load_config(path)
    assert settings.server.max_concurrent_requests == 100 and settings.checkpoint.interval == 50
    assert settings.rl_training.update_epochs == 1 and settings.rl_training.total_steps == 1000


def test_every_flag_of_the_seeds_trainer_is_accepted(tiny_model_path, tmp_path, capsys):
    from paraloop.run.main import main as run

    config = tmp_path / "train_config.toml"
    config.write_text(SEED_TRAIN_CONFIG)
    # The seed's "CLI: Atropos Training" command, then every other flag of its "CLI Arguments" list.
    code = run(
        [
            "--model-path",
            str(tiny_model_path),
            "--atropos-url",
            "http://localhost:8001",
            "--steps",
            "100",
            "--batch-size",
            "8",
            "--checkpoint-dir",
            str(tmp_path / "checkpoints"),
            "--checkpoint-interval",
            "10",
            "--save-every-step",
            "true",
            "--adapter-format",
            "safetensors",
            "--learning-rate",
            "2e-5",
            "--max-tokens",
            "256",
            "--kl-beta",
            "0.1",
            "--clip-ratio",
            "0.1",
            "--entropy-weight",
            "0.0",
            "--kl-estimator",
            "mse",
            "--ref-ema",
            "0.99",
            "--config",
            str(config),
            "--auto-init-lora",
            "true",
            "--lora-rank",
            "16",
            "--lora-layers",
            "8",
            "--lora-dropout",
            "0.05",
            "--lora-scale",
            "10.0",
            "--token-budget",
            "16384",
            "--host",
            "127.0.0.1",
            "--port",
            "8000",
            "--update-epochs",
            "1",
            "--algorithm",
            "grpo",
            "--diverse-mode",
            "true",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and f"configuration ok: model {tiny_model_path}" in out
    assert not (tmp_path / "checkpoints").exists()  # a dry run writes nothing


def test_diverse_mode_is_accepted_and_warns_that_it_changes_nothing(caplog):
    from paraloop.flags import FLAGS

    assert FLAGS["--diverse-mode"][0] == "engine.diverse_mode"
    with caplog.at_level(logging.WARNING, logger="paraloop.config"):
        settings = load_config(None, {"engine": {"diverse_mode": False}})
    assert "diverse_mode = False has no effect" in caplog.text and "never merged" in caplog.text
    assert "diverse_mode" not in settings.engine.model_dump()


def test_atropos_token_budget_moves_and_a_conflict_keeps_the_paraloop_key(tmp_path, caplog):
    path = tmp_path / "c.toml"
    path.write_text("[rl_training.atropos]\ntoken_budget = 4096\n")
    assert load_config(path).rl_training.token_budget == 4096
    with caplog.at_level(logging.WARNING, logger="paraloop.config"):
        settings = load_config(path, {"rl_training": {"token_budget": 2048}})  # --token-budget 2048
    assert settings.rl_training.token_budget == 2048 and "using rl_training.token_budget" in caplog.text


def test_the_seeds_mock_command_fails_before_loading_with_the_fix(tiny_model_path, tmp_path, capsys):
    from paraloop.run.main import main as run

    # mlx_parallm_train --model-path ... --steps 3 --batch-size 2 --checkpoint-dir checkpoints --save-every-step true
    code = run(
        [
            "--model-path",
            str(tiny_model_path),
            "--steps",
            "3",
            "--batch-size",
            "2",
            "--checkpoint-dir",
            str(tmp_path / "checkpoints"),
            "--save-every-step",
            "true",
            "--adapter-format",
            "npz",
            "--diverse-mode",
            "true",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "rl_training.batch_size (2) must be a multiple of rl_training.mock.group_size (8)" in err
    assert "--batch-size 8 or --group-size 2" in err
    assert not (tmp_path / "checkpoints").exists()  # nothing started


def test_every_inconsistency_is_named_before_anything_loads(tmp_path, tiny_q4_model_path):
    settings = load_config(
        None,
        {
            "model": {"base_path": "unused", "lora_path": str(tmp_path / "adapter"), "auto_init_lora": False},
            "checkpoint": {"resume": str(tmp_path / "run")},
            "engine": {"max_n": 4, "max_tokens_limit": 64},
            "rl_training": {
                "train_mode": "full",
                "kl_beta": 0.1,
                "batch_size": 12,
                "max_tokens": 128,
                "mock": {"group_size": 8, "task": "no.such.module:task"},
            },
        },
    )
    problems = "\n".join(settings_problems(settings))
    for expected in (
        "checkpoint.resume and model.lora_path are both set",
        f"model.lora_path: {tmp_path}/adapter",
        f"checkpoint.resume: {tmp_path}/run",
        "rl_training.kl_beta > 0",
        "rl_training.batch_size (12) must be a multiple of rl_training.mock.group_size (8)",
        "rl_training.mock.group_size (8) is more than engine.max_n (4)",
        "rl_training.max_tokens (128) is more than engine.max_tokens_limit (64)",
        "rl_training.mock.task",
    ):
        assert expected in problems, expected
    from paraloop.run.preflight import preflight
    from paraloop.run.setup import SetupError

    full_on_4bit = load_config(
        None, {"model": {"base_path": str(tiny_q4_model_path)}, "rl_training": {"train_mode": "full", "kl_beta": 0.0}}
    )
    with pytest.raises(SetupError, match="train_mode = 'full' needs a non-quantized model"):
        preflight(full_on_4bit)
    with pytest.raises(SetupError, match="nothing to train"):
        preflight(load_config(None, {"model": {"base_path": str(tiny_q4_model_path), "auto_init_lora": False}}))


@pytest.fixture
def hub_account(monkeypatch):
    """Online, logged in, and the upload itself replaced by a recorder of what it was given."""
    import huggingface_hub
    from huggingface_hub import constants
    from mlx_lm import utils

    uploads = []

    def upload_to_hub(path: str, upload_repo: str) -> None:
        files = sorted(p.name for p in Path(path).iterdir())
        uploads.append((path, upload_repo, files, (Path(path) / "README.md").read_text()))

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")
    monkeypatch.setattr(utils, "upload_to_hub", upload_to_hub)
    return uploads


def test_merge_uploads_the_finished_model_like_mlx_lm_fuse(hub_account, tiny_model_path, tmp_path, capsys):
    from support.checkpoints import save_run, trained_model

    from paraloop.tools.merge import main as merge

    model, _, config = trained_model(tiny_model_path)
    save_run(tmp_path / "run", model, config)
    out = tmp_path / "merged"
    assert (
        merge(
            [
                "--base-model",
                str(tiny_model_path),
                "--adapter",
                str(tmp_path / "run"),
                "--output",
                str(out),
                "--push-to-hub",
                "me/tiny-grpo",
            ]
        )
        == 0
    )
    [(path, repo, files, card)] = hub_account
    assert (path, repo) == (str(out), "me/tiny-grpo")
    assert {"config.json", "model.safetensors", "README.md", "tokenizer.json"} <= set(files)  # whole when uploaded
    assert "library_name: mlx" in card


def test_merge_checks_the_upload_before_merging_and_keeps_the_model_when_it_fails(
    hub_account, monkeypatch, tiny_model_path, tmp_path, capsys
):
    import huggingface_hub
    from huggingface_hub import constants
    from mlx_lm import utils

    from paraloop.tools.merge import main as merge

    adapter = tmp_path / "run"
    from support.checkpoints import save_run, trained_model

    model, _, config = trained_model(tiny_model_path)
    save_run(adapter, model, config)

    def merge_to(out: Path, repo: str) -> int:
        return merge(
            [
                "--base-model",
                str(tiny_model_path),
                "--adapter",
                str(adapter),
                "--output",
                str(out),
                "--upload-repo",
                repo,
            ]
        )

    assert merge_to(tmp_path / "a", "no-owner") == 2 and not (tmp_path / "a").exists()
    assert "expected ORG/NAME" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert merge_to(tmp_path / "b", "me/x") == 2 and not (tmp_path / "b").exists()
    assert "hf auth login" in capsys.readouterr().err
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert merge_to(tmp_path / "c", "me/x") == 2 and "HF_HUB_OFFLINE=1" in capsys.readouterr().err

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test")

    def unreachable(path: str, upload_repo: str) -> None:
        raise ConnectionError("Name or service not known\nmore detail")

    monkeypatch.setattr(utils, "upload_to_hub", unreachable)
    assert merge_to(tmp_path / "d", "me/x") == 1
    [err] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("paraloop: error:")]
    assert "the merged model is kept" in err and f"hf upload me/x {tmp_path / 'd'}" in err
    assert (tmp_path / "d" / "model.safetensors").is_file()
