"""What the guides say beyond their commands (tests/test_documented_commands.py runs those): docs/tasks.md's example
task scores as the page says, Qwen3's thinking switch (docs/models.md) reaches the chat template, and every page is
linked from docs/README.md and the README."""

import json
import re
import shutil
from pathlib import Path

import anyio

DOCS = Path(__file__).resolve().parents[1] / "docs"


def blocks(page: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", (DOCS / page).read_text(), re.M | re.S)


def test_the_tasks_page_example_scores_as_the_page_says(tmp_path, monkeypatch):
    [module] = blocks("tasks.md", "python")
    (tmp_path / "my_task.py").write_text(module)
    monkeypatch.syspath_prepend(str(tmp_path))
    from my_task import score, sums

    from paraloop.envs.tasks import Sample

    prompt = [{"role": "user", "content": "What is 12 plus 30? Answer with the number only."}]
    assert sums().prompt(__import__("random").Random(0))[0]["content"].endswith("Answer with the number only.")
    assert score(Sample(prompt=prompt, text="42", finish_reason="stop")) == 1.0
    assert score(Sample(prompt=prompt, text=" 41.", finish_reason="stop")) == 0.5
    assert score(Sample(prompt=prompt, text="42", finish_reason="length")) == 0.0
    assert score(Sample(prompt=prompt, text="forty-two", finish_reason="stop")) == 0.0


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
        return [
            Completion(row=i, tokens=[2], logprobs=[-0.1], versions=[0], text="", finish_reason="stop")
            for i in range(request.n)
        ]


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
        toml.write_text(
            '[rl_training.mock]\ntask = "paraloop.envs.tasks:capitals"\ngroup_size = 2\n'
            f"chat_template_kwargs = {{ enable_thinking = {thinking} }}\n"
        )
        settings = load_config(toml)
        engine = OneRowEngine()
        env = MockEnvironment(engine, tokenizer, config=settings.rl_training.mock, temperature=1.0, max_tokens=4)
        anyio.run(env.group)
        return tokenizer.decode(engine.prompts[0])

    # (mlx-lm passes enable_thinking = True by default when the vocabulary has <think> tokens, as Qwen3's does)
    assert prompt_text("false").endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert prompt_text("true").endswith("<|im_start|>assistant\n")


def test_every_page_is_in_the_docs_index_and_the_guides_are_linked_from_the_readme():
    index = (DOCS / "README.md").read_text()
    pages = sorted(p.name for p in DOCS.glob("*.md") if p.name != "README.md")
    assert [p for p in pages if f"]({p})" not in index] == [], "docs/README.md links every page"
    readme = (DOCS.parent / "README.md").read_text()
    assert "](docs/install.md)" in readme.split("## Two commands")[1].split("```")[0], "install.md comes first"
    for page in ("install.md", "models.md", "tasks.md", "troubleshooting.md", "resume.md", "metrics.md", "README.md"):
        assert f"](docs/{page})" in readme, page
