"""`paraloop VERB --help` answers: every verb's help exits 0; the configuration flags show their key, default and
allowed values and point to `paraloop config show` / docs/configuration.md; the adapter flag has one spelling in every
verb that takes an adapter, with the predecessor's `--lora-path` and mlx-lm's `--adapter-path` accepted as aliases.
In-process (argparse prints and exits), so it takes a second."""

import re

import pytest

from paraloop.cli import COMMANDS, main
from paraloop.config import RLTrainingConfig


def help_of(verb: str, capsys) -> str:
    argv = [verb, "show", "--help"] if verb == "config" else [verb, "--help"]
    try:
        code = main(argv)  # the tools' own parsers return the exit code
    except SystemExit as done:  # argparse's --help exits
        code = done.code
    assert code == 0, verb
    return re.sub(r"\s+", " ", capsys.readouterr().out)


@pytest.mark.parametrize("verb", sorted(COMMANDS))
def test_every_verb_answers_help(verb, capsys):
    if verb == "model":  # its own parser raises UsageError instead of printing: `paraloop model --help` is 0 too
        assert main(["model", "--help"]) == 0
        return
    text = help_of(verb, capsys)
    assert f"paraloop {verb}" in text or verb in text


@pytest.mark.parametrize("verb", ["run", "serve", "eval", "config"])
def test_configuration_flags_show_default_allowed_values_and_where_to_read_more(verb, capsys):
    text = help_of(verb, capsys)
    assert "paraloop config show" in text and "docs/configuration.md" in text
    assert "[model.base_path; default unset]" in text
    assert "[model.compute; default 'auto'; one of auto, quantized, dequantized]" in text
    if verb in ("run", "config"):
        assert f"[rl_training.total_steps; default {RLTrainingConfig().total_steps}]" in text
        assert "[rl_training.algorithm; default 'grpo'; one of grpo, gspo, cispo, reinforce" in text
        assert "[checkpoint.dir; default 'runs/latest']" in text


@pytest.mark.parametrize("verb", ["run", "serve", "eval", "merge"])
def test_the_adapter_flag_has_one_spelling_and_both_aliases(verb, capsys):
    text = help_of(verb, capsys)
    assert re.search(r"--adapter (\w+), --adapter-path \1, --lora-path \1", text), text
    module = __import__(COMMANDS[verb][0], fromlist=["x"])
    parser = module.build_parser() if hasattr(module, "build_parser") else None
    if parser is None:  # `paraloop run` builds its parser in main: the shared flags are checked through serve's
        from paraloop.serve import build_parser as parser_factory

        parser = parser_factory()
    required = ["--base-model", "m", "--output", "o"] if verb == "merge" else []
    values = {
        vars(parser.parse_args([*required, flag, "a/b"]))["adapter"]
        for flag in ("--adapter", "--adapter-path", "--lora-path")
    }
    assert {str(v) for v in values} == {"a/b"}


def test_an_adapter_flag_given_a_run_dir_means_its_newest_checkpoint(tmp_path):
    """`--adapter runs/demo` names the run's newest checkpoint to run and serve as to eval and merge."""
    import mlx.core as mx

    from paraloop.checkpoint import write_checkpoint
    from paraloop.checkpoint import adapter_location

    adapter = {"layers.0.self_attn.q_proj.lora_a": mx.zeros((4, 2))}
    for step in (1, 2):
        last = write_checkpoint(tmp_path / "run", step=step, version=step, adapter=adapter, adapter_config={})
    assert adapter_location(tmp_path / "run") == last == adapter_location(tmp_path / "run" / "checkpoints")
    assert adapter_location(last) == last  # an adapter dir as it is
    assert adapter_location(tmp_path / "empty") == tmp_path / "empty"  # nothing there: the loader says so


def test_eval_reads_an_adapter_flag_as_run_and_serve_do_and_refuses_what_holds_no_adapter(tmp_path):
    import mlx.core as mx

    from paraloop.checkpoint import write_checkpoint
    from paraloop.evaluation import adapter_path

    adapter = {"layers.0.self_attn.q_proj.lora_a": mx.zeros((4, 2))}
    last = write_checkpoint(tmp_path / "run", step=3, version=3, adapter=adapter, adapter_config={})
    assert adapter_path(str(tmp_path / "run")) == last == adapter_path(str(last))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no adapter weights and no complete checkpoint"):
        adapter_path(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="no such file or directory"):
        adapter_path(str(tmp_path / "missing"))
