"""Every command block of README.md, docs/*.md and examples/README.md runs as written and exits 0.

What runs: each ```bash, ```sh or ```console fence (in a console fence, the `$ ` lines), one command per line
(`\\` continues a line, `# ...` comments are dropped), in page order, from the repository root or from the
directory a `<!-- run in: DIR -->` comment right above the fence names. A block that cannot run offline on a CPU
in seconds carries `<!-- not run: REASON -->` right above its fence instead; the reason is required and
`test_every_skipped_block_says_why_and_pages_have_blocks_that_run` holds them to it. A fence of another language is
not run (```toml, ```python, output), except that a block under `<!-- save as: PATH -->` is written to PATH when the
page reaches it (docs/tasks.md's my_task.py). Pages are independent: README.md starts from a fresh clone (after the
install its install block describes); every other page starts where `make demo` ends (models/smollm2 built,
runs/demo trained). Commands run offline (HF_HUB_OFFLINE=1), `paraloop` and `python` being this interpreter.

What is substituted, and nothing else:
- the model: `paraloop model smollm2 DIR` builds the tiny test model instead (`paraloop model tiny DIR`), the Hugging
  Face ids in HUB_MODELS are the tiny model's directory, and models/smollm2 is that tiny model on the other pages;
- the step count, divided by 10: `--steps N` and `step_0000NN` names (rounded up), and the configurations'
  total_steps and checkpoint.interval through PARALOOP_RL_TRAINING__TOTAL_STEPS=2 and PARALOOP_CHECKPOINT__INTERVAL=1
  (demo.toml's 20 steps checkpointed every 10 become 2 steps checkpointed every 1);
- ports, so the test never collides with another server on the machine: 8000 becomes a free port (in the commands,
  and as the default through PARALOOP_SERVER__PORT), and
  `paraloop dashboard` without `--port` gets `--port 0`; `curl` gets `--fail` (an HTTP error fails the command).

A server (a `paraloop serve` or `paraloop dashboard` line, or any line ending in `&`) is started in its own process
group, probed until it answers HTTP, left running for the page's next lines and killed (the whole group) at the next
server line or at the end of the page. Each page runs in a copy of configs/ and examples/ under tmp_path; two pages
run at a time.
"""

import math
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from support import procs
from support import free_port

REPO = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")), "examples/README.md"]
FENCE = re.compile(r"^(?:<!-- (not run|run in|save as): ?(.*?) ?-->\n)?```(\w*)\n(.*?)^```", re.M | re.S)
SHELLS = ("bash", "sh", "console")
HUB_MODELS = ("Qwen/Qwen2.5-0.5B-Instruct",)  # converted by docs/models.md: the tiny model stands in (offline)
COMMAND_TIMEOUT_S = 240
pytestmark = pytest.mark.timeout(900)


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    skip: str | None  # why it does not run
    cwd: str  # relative to the repository root
    commands: tuple[str, ...]
    save_as: str | None = None  # a file block the page says to save (`<!-- save as: PATH -->`), and its text
    text: str = ""


def blocks(page: str) -> list[Block]:
    text = (REPO / page).read_text()
    out = []
    for m in FENCE.finditer(text):
        marker, value, language, body = m.groups()
        line = text[: m.start()].count("\n") + 1 + (marker is not None)
        if marker == "save as":
            out.append(Block(page, line, None, ".", (), save_as=value, text=body))
        elif language in SHELLS:
            out.append(
                Block(
                    page,
                    line,
                    value if marker == "not run" else None,
                    value if marker == "run in" else ".",
                    tuple(commands_of(body, language)),
                )
            )
    return out


def commands_of(body: str, language: str) -> list[str]:
    lines = body.splitlines()
    if language == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    out, pending = [], ""
    for line in lines:
        line = re.sub(r"(^|\s+)#(\s.*)?$", "", line)  # a trailing comment (pages put none inside a string)
        line = pending + line
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1] + " "
            continue
        try:
            shlex.split(line)
        except ValueError:  # a quoted string goes on on the next line
            pending = line + "\n"
            continue
        pending = ""
        if line.strip():
            out.append(line.strip())
    assert not pending, f"an unfinished command: {pending!r}"
    return out


def as_run_here(command: str, *, tiny: Path, port: int) -> str:
    """The page's command with only the model, the step count and the ports substituted (see the module doc)."""
    command = re.sub(r"\bparaloop model smollm2\b", "paraloop model tiny", command)
    for hub_id in HUB_MODELS:
        command = command.replace(hub_id, str(tiny))
    command = re.sub(r"--steps (\d+)", lambda m: f"--steps {math.ceil(int(m[1]) / 10)}", command)
    command = re.sub(r"step_(\d{6})", lambda m: f"step_{math.ceil(int(m[1]) / 10):06d}", command)
    command = re.sub(r"(--port |localhost:|127\.0\.0\.1:)8000\b", rf"\g<1>{port}", command)
    if re.match(r"paraloop dashboard\b", command) and "--port" not in command:
        command = command.replace("paraloop dashboard", "paraloop dashboard --port 0", 1)
    return re.sub(r"(^|&& |\| )curl ", r"\1curl --fail --max-time 60 ", command)


def is_server(command: str) -> bool:
    return command.endswith("&") or bool(re.match(r"paraloop (serve|dashboard)\b", command))


class Shell:
    """Runs a page's commands in its sandbox; holds the page's one running server, if any."""

    def __init__(self, root: Path, env: dict[str, str], log: Path) -> None:
        self.root, self.env, self.log = root, env, log
        self.server: subprocess.Popen | None = None
        self.server_log: Path | None = None

    def run(self, command: str, cwd: str, where: str) -> None:
        if is_server(command):
            self.stop_server()
            self.start_server(command.rstrip("&").strip(), cwd, where)
            return
        done = subprocess.CompletedProcess([], 0)
        with procs.running(
            ["bash", "-c", command],
            cwd=self.root / cwd,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        ) as proc:
            try:
                out, _ = proc.communicate(timeout=COMMAND_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{where}: `{command}` ran past {COMMAND_TIMEOUT_S} s")
            done = subprocess.CompletedProcess(proc.args, proc.returncode, out)
        with self.log.open("a") as f:
            f.write(f"$ {command}\n{done.stdout}\n")
        assert done.returncode == 0, f"{where}: `{command}` exited {done.returncode}:\n{done.stdout[-3000:]}"

    def start_server(self, command: str, cwd: str, where: str) -> None:
        self.server_log = self.log.with_name(f"server-{time.monotonic_ns()}.log")
        with self.server_log.open("w") as out:
            self.server = procs.spawn(
                ["bash", "-c", f"exec {command}"],
                cwd=self.root / cwd,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + COMMAND_TIMEOUT_S
        while time.monotonic() < deadline:
            text = self.server_log.read_text()
            if self.server.poll() is not None:
                pytest.fail(f"{where}: server `{command}` exited {self.server.returncode}:\n{text[-3000:]}")
            m = re.search(r"http://(?:127\.0\.0\.1|localhost):(\d+)", text)
            if m and answers(int(m[1])):
                return
            time.sleep(0.2)
        pytest.fail(f"{where}: server `{command}` did not answer within {COMMAND_TIMEOUT_S} s")

    def stop_server(self) -> None:
        if self.server is not None:
            procs.kill_group(self.server)
            with self.log.open("a") as f:
                f.write(f"[server]\n{self.server_log.read_text()}\n")
            self.server = None


def answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
            return True
    except urllib.error.HTTPError:
        return True  # it speaks HTTP (the dashboard has no /health)
    except OSError:
        return False


def make_bin(tmp: Path) -> Path:
    """`paraloop` and `python` as this interpreter runs them (the worktree's source first on the path)."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "paraloop").write_text(f'#!/bin/sh\nexec "{sys.executable}" -m paraloop "$@"\n')
    (bin_dir / "paraloop").chmod(0o755)
    for name in ("python", "python3"):  # a script, not a link: a venv's python finds its venv from its own path
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
        (bin_dir / name).chmod(0o755)
    return bin_dir


def page_env(tmp: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not (k.startswith("PARALOOP_") and "__" in k)}
    env.update(
        PATH=f"{make_bin(tmp)}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH=str(REPO / "src"),
        HF_HUB_OFFLINE="1",
        PARALOOP_LOG="info",
        PYTHONUNBUFFERED="1",
        PARALOOP_RL_TRAINING__TOTAL_STEPS="2",
        PARALOOP_CHECKPOINT__INTERVAL="1",
        MPLBACKEND="Agg",
        PARALOOP_SERVER__PORT=str(port),
    )
    return env


def make_demo(root: Path, tiny: Path, tmp: Path) -> Path:
    """A checkout where `make demo` has run: models/smollm2 (the tiny model) and runs/demo, trained by
    configs/demo.toml as the Makefile runs it (2 steps)."""
    for name in ("configs", "examples"):
        shutil.copytree(REPO / name, root / name)
    shutil.copytree(tiny, root / "models" / "smollm2")
    tmp.mkdir()
    Shell(root, page_env(tmp, free_port()), tmp / "log.txt").run("paraloop run configs/demo.toml", ".", "make demo")
    return root


def run_page(page: str, *, start: Path | None, tiny: Path, tmp: Path) -> str | None:
    """Run the page's blocks in a copy of `start` (None: a fresh clone); None, or why the page failed."""
    root = tmp / "repo"
    if start is None:
        for name in ("configs", "examples"):
            shutil.copytree(REPO / name, root / name)
    else:
        shutil.copytree(start, root, symlinks=True)
    port = free_port()
    shell = Shell(root, page_env(tmp, port), tmp / "log.txt")
    try:
        for block in blocks(page):
            if block.save_as:
                (root / block.save_as).write_text(block.text)
            if block.skip is not None:
                continue
            for command in block.commands:
                shell.run(as_run_here(command, tiny=tiny, port=port), block.cwd, f"{page}:{block.line}")
    except BaseException as e:  # noqa: BLE001 - pytest.fail's Failed too: reported by the page's own test
        return f"{type(e).__name__}: {e}"
    finally:
        shell.stop_server()
    return None


def runnable_pages() -> list[str]:
    """The pages with a block to run, those with the most commands first (they set how long the pool takes)."""
    count = {page: sum(len(b.commands) for b in blocks(page) if b.skip is None) for page in PAGES}
    return sorted((page for page in PAGES if count[page]), key=lambda page: -count[page])


@pytest.fixture(scope="module")
def page_results(tiny_model_path, tmp_path_factory) -> dict[str, str | None]:
    """Every page run, two at a time (most of a command's time is one core importing MLX and loading a model):
    README.md from a fresh clone beside `make demo`, then the others from where `make demo` ends."""
    tmp = tmp_path_factory.mktemp("pages")
    pages = runnable_pages()
    with ThreadPoolExecutor(max_workers=2) as pool:
        fresh = pool.submit(run_page, "README.md", start=None, tiny=tiny_model_path, tmp=tmp / "README")
        demo = make_demo(tmp / "after-make-demo", tiny_model_path, tmp / "make-demo")
        futures = {
            page: pool.submit(run_page, page, start=demo, tiny=tiny_model_path, tmp=tmp / page.replace("/", "-"))
            for page in pages
            if page != "README.md"
        }
        return {"README.md": fresh.result(), **{page: f.result() for page, f in futures.items()}}


@pytest.mark.slow  # every page's commands: seconds each, a few minutes in all
@pytest.mark.parametrize("page", PAGES)
def test_every_command_block_of_the_page_runs(page, page_results):
    if page not in runnable_pages():
        pytest.skip(f"{page}: no runnable command block")
    assert page_results[page] is None, page_results[page]


def test_every_skipped_block_says_why_and_pages_have_blocks_that_run():
    skipped = [(b.page, b.line, b.skip) for page in PAGES for b in blocks(page) if b.skip is not None]
    assert all(reason.strip() for _, _, reason in skipped), skipped
    pages_run = {page for page in PAGES if any(b.skip is None and b.commands for b in blocks(page))}
    must_run = {
        "README.md",
        "docs/tasks.md",
        "docs/training.md",
        "docs/models.md",
        "docs/resume.md",
        "docs/checkpoints.md",
        "docs/api.md",
        "docs/configuration.md",
        "docs/observability.md",
        "examples/README.md",
    }
    assert must_run <= pages_run, must_run - pages_run


def test_the_substitutions_touch_only_model_steps_and_ports(tmp_path):
    tiny = tmp_path / "tiny"
    assert as_run_here("paraloop run configs/demo.toml --steps 20 --resume runs/demo", tiny=tiny, port=9) == (
        "paraloop run configs/demo.toml --steps 2 --resume runs/demo"
    )
    assert (
        as_run_here("paraloop model smollm2 models/smollm2", tiny=tiny, port=9) == "paraloop model tiny models/smollm2"
    )
    assert as_run_here("curl -s localhost:8000/v1/models", tiny=tiny, port=9) == (
        "curl --fail --max-time 60 -s localhost:9/v1/models"
    )
    assert as_run_here("paraloop serve --lora-path runs/demo/checkpoints/step_000010", tiny=tiny, port=9).endswith(
        "step_000001"
    )
    assert commands_of("a \\\n  b  # note\n# only a comment\n\nc\n", "bash") == ["a    b", "c"]
    assert commands_of("$ paraloop --help\nusage: ...\n", "console") == ["paraloop --help"]
    assert commands_of('curl -d \'{"a": 1,\n  "b": 2}\'  # c\nls\n', "bash") == [
        'curl -d \'{"a": 1,\n  "b": 2}\'',
        "ls",
    ]


def test_the_example_files_headers_are_the_commands_of_examples_readme():
    """examples/*.py open with the commands to run them: the same lines as examples/README.md's blocks (run above)."""
    readme = {c.rstrip("& ") for b in blocks("examples/README.md") for c in b.commands}
    for path in (REPO / "examples").glob("*.py"):
        header = (path.read_text().split('"""')[1]).splitlines()
        shown = [re.sub(r"\s+#\s.*$", "", line).strip() for line in header if line.startswith("    ")]
        for command in (c for c in shown if c.startswith(("paraloop ", "python ", "cd ")) and "..." not in c):
            assert command.rstrip("& ") in readme or command.startswith("cd "), (
                f"{path.name}: {command!r} is not in examples/README.md"
            )
