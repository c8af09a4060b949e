"""The commands the user guides show, run as a user runs them, on the tiny model where a page uses a real one:
docs/resume.md, docs/tasks.md, docs/models.md (and its Qwen3 thinking switch reaching the chat template)."""

import json
import re
import shlex
import shutil
import sys
from pathlib import Path

import anyio
import pytest

import procs
from paraloop.checkpoint import read_checkpoint
from test_run import RUN_ENV, TINY_CONFIG, read_metrics

DOCS = Path(__file__).resolve().parents[1] / "docs"
pytestmark = pytest.mark.timeout(300)


def blocks(page: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", (DOCS / page).read_text(), re.M | re.S)


def commands(page: str) -> list[str]:
    """Each command line of the page's bash blocks, without its trailing comment."""
    out = []
    for block in blocks(page, "bash"):
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line:
                out.append(line)
    return out


def run_as_user(command: str, *, tiny: Path, tmp: Path, cwd: Path | None = None, env: dict | None = None) -> str:
    """Run one documented command with the tiny model standing in for the page's: configs/demo.toml becomes
    configs/tiny.toml on the tiny model (2 steps unless the command says otherwise), runs/ and models/ go to tmp."""
    text = re.sub(r"(?<![\w/-])(runs|models)/", rf"{tmp}/\1/", command)
    text = text.replace("configs/demo.toml", f"{TINY_CONFIG} --model-path {tiny} --run-dir {tmp}/runs/demo "
                                              "--port 0 --no-plot --steps 2")  # fmt: skip
    argv = shlex.split(text)
    if argv[0] == "paraloop":
        argv = [sys.executable, "-m", "paraloop", *argv[1:]]
    elif argv[0] == "mlx_lm.convert":
        argv = [sys.executable, "-m", "mlx_lm", "convert", *argv[1:]]
    else:
        raise AssertionError(f"the test does not know how to run {argv[0]!r}: {command}")
    done = procs.run(argv, timeout=240, cwd=cwd, env={**RUN_ENV, **(env or {})})
    assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"
    return done.stdout


def test_resume_page(tiny_model_path, tmp_path):
    outputs = [run_as_user(c, tiny=tiny_model_path, tmp=tmp_path) for c in commands("resume.md")]
    run_dir = tmp_path / "runs" / "demo"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 21)), "steps 1-10, then 11-20 after the resume"
    assert "* step_000020" in outputs[-1] and "latest: step_000020" in outputs[-1]
    final = read_checkpoint(run_dir)
    assert final.step == 20 and final.trainer_state["source_state"]["next_group"] == 20 * 4
    shown = procs.run([sys.executable, "-m", "paraloop", "show-checkpoint", str(final.path)], timeout=60)
    assert '"next_group": 80' in shown.stdout, shown.stdout  # the rollout source's position, as the page says


def test_tasks_page(tiny_model_path, tmp_path):
    [module] = blocks("tasks.md", "python")
    (tmp_path / "my_task.py").write_text(module)
    [command] = commands("tasks.md")
    # The page runs paraloop from the directory holding my_task.py; PYTHONPATH keeps this test about the example
    # (that the current directory is on the import path is tested with the task loader).
    run_as_user(command, tiny=tiny_model_path, tmp=tmp_path, cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    run_dir = tmp_path / "runs" / "sums"
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2] and all(0.0 <= r["reward_mean"] <= 1.0 for r in rows)
    assert read_checkpoint(run_dir).trainer_state["source_state"]["task"] == "my_task:sums"

    sys.path.insert(0, str(tmp_path))
    try:
        from my_task import score, sums
    finally:
        sys.path.remove(str(tmp_path))
    from paraloop.envs.tasks import Sample

    prompt = [{"role": "user", "content": "What is 12 plus 30? Answer with the number only."}]
    assert sums().prompt(__import__("random").Random(0))[0]["content"].endswith("Answer with the number only.")
    assert score(Sample(prompt=prompt, text="42", finish_reason="stop")) == 1.0
    assert score(Sample(prompt=prompt, text=" 41.", finish_reason="stop")) == 0.5
    assert score(Sample(prompt=prompt, text="42", finish_reason="length")) == 0.0
    assert score(Sample(prompt=prompt, text="forty-two", finish_reason="stop")) == 0.0


def test_models_page(tiny_model_path, tmp_path):
    for command in commands("models.md"):
        # the hub ids the page names become the tiny model (offline); its Qwen3 stands in with the converted one
        command = command.replace("Qwen/Qwen2.5-0.5B-Instruct", str(tiny_model_path))
        command = command.replace("models/qwen3-0.6b-4bit", "models/qwen2.5-0.5b-4bit")
        run_as_user(command, tiny=tiny_model_path, tmp=tmp_path)
    converted = tmp_path / "models" / "qwen2.5-0.5b-4bit"
    assert json.loads((converted / "config.json").read_text())["quantization"]["bits"] == 4
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "qwen2.5-0.5b")] == [1, 2]
    assert [r["step"] for r in read_metrics(tmp_path / "runs" / "demo")] == [1, 2]


QWEN3_TEMPLATE = (  # the part of Qwen3's chat template that the thinking switch changes
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}"
    "{% endif %}"
)


class OneRowEngine:
    """Records the prompt of each request and answers every row with one EOS token."""

    def __init__(self) -> None:
        self.prompts: list[list[int]] = []

    async def complete(self, request):
        from paraloop.messages import Completion

        self.prompts.append(request.prompt_tokens)
        return [Completion(row=i, tokens=[2], logprobs=[-0.1], versions=[0], text="", finish_reason="stop")
                for i in range(request.n)]  # fmt: skip


def test_the_qwen3_thinking_switch_reaches_the_chat_template(tiny_model_path, tmp_path):
    from mlx_lm.utils import load_tokenizer

    from paraloop.config import load_config
    from paraloop.envs.mock import MockEnvironment

    model_dir = tmp_path / "qwen3-like"
    shutil.copytree(tiny_model_path, model_dir)
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    (model_dir / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN3_TEMPLATE}))
    tokenizer = load_tokenizer(model_dir)

    def prompt_text(thinking: str) -> str:
        toml = tmp_path / f"thinking-{thinking}.toml"
        toml.write_text('[rl_training.mock]\ntask = "paraloop.envs.tasks:capitals"\ngroup_size = 2\n'
                        f"chat_template_kwargs = {{ enable_thinking = {thinking} }}\n")  # fmt: skip
        settings = load_config(toml)
        engine = OneRowEngine()
        env = MockEnvironment(engine, tokenizer, config=settings.rl_training.mock, temperature=1.0, max_tokens=4)
        anyio.run(env.group)
        return tokenizer.decode(engine.prompts[0])

    # (mlx-lm passes enable_thinking = True by default when the vocabulary has <think> tokens, as Qwen3's does)
    assert prompt_text("false").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompt_text("true").endswith("<|im_start|>assistant\n")


def test_every_guide_is_linked_from_the_readme():
    readme = (DOCS.parent / "README.md").read_text()
    for page in ("models.md", "tasks.md", "troubleshooting.md", "resume.md", "metrics.md"):
        assert f"docs/{page}" in readme, page
