"""`paraloop merge`, `convert-adapter` and `show-checkpoint` on good and bad input."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from support import procs
from support.compute_paths import LOGPROB_TOL
import paraloop  # noqa: F401  (OpenBLAS before mlx)
from paraloop.checkpoint import write_checkpoint, write_initial_adapter
from paraloop.lora import adapter_arrays, load_adapter
from paraloop.model import is_quantized, load_model
from paraloop.tools import convert_adapter, merge, show_checkpoint
from support.checkpoints import save_run, trained_model

PROMPT = "The capital of France is Paris. The morning was cold and clear, and the river ran fast under the old"


def run_tool(module: str, *args: str) -> subprocess.CompletedProcess:
    code = f"import sys; from paraloop.tools.{module} import main; sys.exit(main(sys.argv[1:]))"
    return procs.run([sys.executable, "-c", code, *map(str, args)], timeout=120)


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    assert stderr.startswith("paraloop: error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def logits(model, tokenizer) -> mx.array:
    return model(mx.array(tokenizer.encode(PROMPT))[None])


def greedy(model, tokenizer, n: int = 16) -> list[int]:
    return [int(t) for t, _ in generate_step(mx.array(tokenizer.encode(PROMPT)), model, max_tokens=n)]


def rms(x: mx.array) -> float:
    return mx.sqrt(mx.mean(x * x)).item()


# --- merge ---


def merge_cli(base_model: Path, adapter: Path, output: Path, *flags: str) -> int:
    return merge.main(["--base-model", str(base_model), "--adapter", str(adapter), "--output", str(output), *flags])


def test_merge_of_a_float_base_gives_the_same_model_as_base_plus_adapter(tiny_model_path, tmp_path):
    model, tokenizer, config = trained_model(tiny_model_path)
    save_run(tmp_path / "run", model, config, steps=(1, 2))

    # a run dir: its latest checkpoint
    assert merge_cli(tiny_model_path, tmp_path / "run", tmp_path / "merged") == 0

    merged, merged_tokenizer = mlx_lm.load(str(tmp_path / "merged"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in (tmp_path / "merged").iterdir()
    }
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging dir left behind
    assert "lora" not in " ".join(k for k, _ in mx.load(str(tmp_path / "merged" / "model.safetensors")).items())
    assert mx.allclose(logits(merged, merged_tokenizer), logits(model, tokenizer), atol=1e-4).item()
    base, _ = mlx_lm.load(str(tiny_model_path))
    assert rms(logits(base, tokenizer) - logits(model, tokenizer)) > 0.05  # the adapter matters
    assert greedy(merged, merged_tokenizer) == greedy(model, tokenizer)


def test_merge_of_a_4bit_base_requantizes_unless_dequantize(tiny_model_path, tiny_q4_model_path, compute, tmp_path):
    """The adapter was trained and served on `compute`; the merged model is loaded back the same way."""

    def load(path: Path):
        return load_model(path, compute=compute)[0]

    model, tokenizer, config = trained_model(tiny_q4_model_path, compute=compute)
    step_dir = save_run(tmp_path / "run", model, config)
    expected = logits(model, tokenizer)
    base = load(tiny_q4_model_path)
    adapter_effect = rms(expected - logits(base, tokenizer))
    quantization_error = rms(logits(base, tokenizer) - logits(load(tiny_model_path), tokenizer))

    assert merge_cli(tiny_q4_model_path, step_dir, tmp_path / "q4") == 0
    requantized = load(tmp_path / "q4")
    assert json.loads((tmp_path / "q4" / "config.json").read_text())["quantization"]["bits"] == 4
    assert is_quantized(requantized) == (compute == "quantized")
    got = logits(requantized, tokenizer)
    # requantizing W + dW costs about what quantizing W did, far less than what the adapter changes
    assert rms(got - expected) < quantization_error and rms(got - expected) < 0.25 * adapter_effect
    assert (got.argmax(-1) == expected.argmax(-1)).mean().item() >= 0.75

    assert merge_cli(tiny_q4_model_path, step_dir, tmp_path / "f32", "--dequantize") == 0
    dequantized = load(tmp_path / "f32")
    assert "quantization" not in json.loads((tmp_path / "f32" / "config.json").read_text())
    # W + dW in float32 is what the served model computed, on either path (support/compute_paths.py: LOGPROB_TOL)
    assert mx.allclose(logits(dequantized, tokenizer), expected, atol=LOGPROB_TOL[compute]).item()


def test_merge_accepts_an_npz_adapter_dir(tiny_model_path, tmp_path):
    model, tokenizer, config = trained_model(tiny_model_path)
    write_initial_adapter(tmp_path / "run", adapter_arrays(model), config, "npz")
    adapter = tmp_path / "run" / "checkpoints" / "initial_adapter"
    assert merge_cli(tiny_model_path, adapter, tmp_path / "merged") == 0
    merged, _ = mlx_lm.load(str(tmp_path / "merged"))
    assert mx.allclose(logits(merged, tokenizer), logits(model, tokenizer), atol=1e-4).item()


def test_a_full_fine_tune_checkpoint_loads_in_mlx_lm_and_merges(tiny_model_path, tmp_path):
    model, tokenizer = mlx_lm.load(str(tiny_model_path))
    weights = {k: v * 1.5 if "down_proj" in k else v for k, v in tree_flatten(model.parameters())}
    model.load_weights(list(weights.items()))
    step_dir = write_checkpoint(tmp_path / "run", step=1, version=1, adapter=weights, adapter_config=None)
    assert json.loads((step_dir / "adapter_config.json").read_text()) == {"fine_tune_type": "full"}

    loaded, _ = mlx_lm.load(str(tiny_model_path), adapter_path=str(step_dir))
    assert mx.allclose(logits(loaded, tokenizer), logits(model, tokenizer), atol=1e-5).item()
    assert merge_cli(tiny_model_path, step_dir, tmp_path / "merged") == 0
    merged, _ = mlx_lm.load(str(tmp_path / "merged"))
    assert mx.allclose(logits(merged, tokenizer), logits(model, tokenizer), atol=1e-5).item()


def test_merge_never_overwrites_an_existing_output(tiny_model_path, tmp_path):
    model, _, config = trained_model(tiny_model_path)
    step_dir = save_run(tmp_path / "run", model, config)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    result = run_tool("merge", "--base-model", tiny_model_path, "--adapter", step_dir, "--output", tmp_path / "out")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "already exists")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_merge_rejects_bad_input_with_one_line(tiny_model_path, tmp_path, capsys):
    model, _, config = trained_model(tiny_model_path)
    step_dir = save_run(tmp_path / "run", model, config)
    cases = [
        (["--base-model", tmp_path / "nope", "--adapter", step_dir], "not a model directory"),
        (["--base-model", tiny_model_path, "--adapter", tmp_path / "nope"], "adapter not found"),
        (["--base-model", tiny_model_path, "--adapter", tmp_path], "no complete checkpoint"),
        (["--base-model", tiny_model_path], "--adapter"),
    ]
    for args, message in cases:
        assert merge.main([*map(str, args), "--output", str(tmp_path / "out")]) == 2
        assert_one_line_error(capsys.readouterr().err, message)
    (step_dir / "adapters.safetensors").write_bytes(b"garbage")
    assert merge_cli(tiny_model_path, step_dir, tmp_path / "out") == 2
    assert_one_line_error(capsys.readouterr().err, "adapters.safetensors")
    assert not (tmp_path / "out").exists()


# --- convert-adapter ---


def test_convert_between_safetensors_and_npz_keeps_the_arrays_and_config(tmp_path):
    arrays = {
        "model.layers.0.self_attn.q_proj.lora_a": mx.arange(12, dtype=mx.float32).reshape(4, 3),
        "model.layers.0.self_attn.q_proj.lora_b": mx.ones((3, 4)),
    }
    config = {
        "fine_tune_type": "lora",
        "num_layers": 1,
        "lora_parameters": {"rank": 3, "scale": 1.0, "dropout": 0.0},
    }
    step_dir = write_checkpoint(tmp_path / "run", step=1, version=1, adapter=arrays, adapter_config=config)

    # dir -> dir: the other format
    assert convert_adapter.main([str(step_dir), str(tmp_path / "as_npz")]) == 0
    assert sorted(p.name for p in (tmp_path / "as_npz").iterdir()) == ["adapter.npz", "adapter_config.json"]
    assert convert_adapter.main([str(tmp_path / "as_npz"), str(tmp_path / "back" / "a.safetensors")]) == 0
    assert convert_adapter.main([str(tmp_path / "run"), str(tmp_path / "st"), "--to", "safetensors"]) == 0
    for out in (tmp_path / "as_npz", tmp_path / "back" / "a.safetensors", tmp_path / "st"):
        got, got_config = load_adapter(out)
        assert got_config == config
        assert got.keys() == arrays.keys() and all(mx.array_equal(got[k], v).item() for k, v in arrays.items())


def test_convert_rejects_bad_input_and_never_overwrites(tmp_path, capsys):
    arrays = {"a.lora_a": mx.ones((2, 2))}
    step_dir = write_checkpoint(tmp_path / "run", step=1, version=1, adapter=arrays, adapter_config={"num_layers": 1})
    assert convert_adapter.main([str(step_dir), str(tmp_path / "x.npz")]) == 0
    cases = [
        ([step_dir, tmp_path / "x.npz"], "already exists"),
        ([tmp_path / "missing", tmp_path / "y"], "adapter not found"),
        ([step_dir / "adapter_config.json", tmp_path / "y"], "not an adapter file"),
        ([step_dir, tmp_path / "y.npz", "--to", "safetensors"], "suffix says npz"),
        ([step_dir, tmp_path / "y", "--to", "pt"], "invalid choice"),
    ]
    for args, message in cases:
        assert convert_adapter.main(list(map(str, args))) == 2
        assert_one_line_error(capsys.readouterr().err, message)
    assert not (tmp_path / "y").exists()
    result = run_tool("convert_adapter", tmp_path / "missing", tmp_path / "y")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "adapter not found")


# --- show-checkpoint ---


def test_show_lists_steps_metrics_sizes_and_the_latest(tmp_path, capsys):
    arrays = {"a.lora_a": mx.ones((64, 64))}
    write_initial_adapter(tmp_path, arrays, {"num_layers": 1})
    for step in (10, 20, 30):
        write_checkpoint(
            tmp_path,
            step=step,
            version=step + 1,
            adapter=arrays,
            adapter_config={"num_layers": 1},
            trainer_state={
                "metrics": {"loss": 0.5 / step, "reward_mean": step / 100},
                "source_state": {"next_group": 7, "seed": 0, "task": "t:t"},  # as the learner writes it
                "config": {"model": {"base_path": "models/tiny"}},
            },
        )
    assert show_checkpoint.main([str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"checkpoints in {tmp_path / 'checkpoints'}"
    assert lines[1].split()[0] == "initial_adapter"
    size = show_checkpoint.human_size(
        sum(p.stat().st_size for p in (tmp_path / "checkpoints" / "step_000030").iterdir())
    )
    assert size.endswith(" KB")
    assert [line.split()[:3] for line in lines[2:5]] == [
        ["step_000010", *size.split()],
        ["step_000020", *size.split()],
        ["*", "step_000030", size.split()[0]],
    ]
    assert "v31" in lines[4] and "loss=0.01667" in lines[4] and "reward_mean=0.3" in lines[4]
    assert lines[-1] == "latest: step_000030"

    assert show_checkpoint.main([str(tmp_path / "checkpoints" / "step_000020")]) == 0
    out = capsys.readouterr().out
    assert "  step: 20" in out and "loss=0.025" in out
    assert '  source_state: {"next_group": 7, "seed": 0, "task": "t:t"}' in out
    assert "adapters.safetensors" in out and "  base model: models/tiny" in out


def test_show_names_the_bad_file_of_a_damaged_checkpoint(tmp_path, capsys):
    arrays = {"a.lora_a": mx.ones((8, 8))}
    for step in (1, 2):
        write_checkpoint(tmp_path, step=step, version=step, adapter=arrays, adapter_config={"num_layers": 1})
    bad = tmp_path / "checkpoints" / "step_000001" / "adapters.safetensors"
    data = bytearray(bad.read_bytes())
    data[-1] ^= 1
    bad.write_bytes(bytes(data))

    assert show_checkpoint.main([str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert f"DAMAGED: {bad}: sha256" in out
    assert_one_line_error(err, str(bad))
    assert show_checkpoint.main([str(tmp_path / "checkpoints" / "step_000001")]) == 2
    assert_one_line_error(capsys.readouterr().err, str(bad))
    assert show_checkpoint.main([str(tmp_path), "--no-verify"]) == 0  # sizes still match
    capsys.readouterr()


def test_show_rejects_a_dir_without_checkpoints(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert show_checkpoint.main([str(tmp_path / "empty")]) == 2
    assert_one_line_error(capsys.readouterr().err, str(tmp_path / "empty"), "no checkpoints")
    result = run_tool("show_checkpoint", tmp_path / "missing")
    assert result.returncode == 2
    assert_one_line_error(result.stderr, str(tmp_path / "missing"))
