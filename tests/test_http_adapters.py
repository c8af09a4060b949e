"""Adapters over HTTP: the `model` field selects one (unknown: 404), /v1/models lists them, and
/v1/load_lora_adapter / /v1/unload_lora_adapter change them at run time, reading only inside server.lora_dirs."""

import signal
from pathlib import Path

import pytest

from support.adapter_files import random_adapter
from support.http_harness import running_server
from paraloop.config import LoraConfig
from paraloop.flags import settings_from_args
from paraloop.serve import main
from support.serving import Serve

CFG = LoraConfig(rank=4, keys="all", num_layers=-1, scale=2.0)
GREEDY = {"temperature": 0, "max_tokens": 6, "ignore_eos": True}


@pytest.fixture(scope="module")
def dirs(tiny_model_path, tmp_path_factory) -> dict[str, Path]:
    """An allowed directory with two adapters, and one outside it with a third."""
    root = tmp_path_factory.mktemp("lora")
    allowed, outside = root / "allowed", root / "outside"
    return {
        "allowed": allowed,
        "outside": outside,
        "one": random_adapter(allowed / "one", tiny_model_path, CFG, seed=1),
        "two": random_adapter(allowed / "two", tiny_model_path, CFG, seed=2),
        "elsewhere": random_adapter(outside / "elsewhere", tiny_model_path, CFG, seed=3),
    }


@pytest.fixture(scope="module")
def server(tiny_model_path, dirs):
    overrides = {"server": {"served_model_name": "tiny", "lora_dirs": [str(dirs["allowed"])], "max_loras": 3}}
    with running_server(tiny_model_path, lora=True, overrides=overrides) as s:
        yield s


def complete(server, model: str | None, **extra) -> dict:
    body = {"prompt": [5, 6, 7, 8], **GREEDY, **extra} | ({"model": model} if model is not None else {})
    reply = server.post("/v1/completions", body)
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_the_model_field_selects_the_adapter_and_every_answer_names_it(server, dirs):
    assert server.post("/v1/load_lora_adapter", {"lora_name": "one", "lora_path": str(dirs["one"])}).status_code == 200
    try:
        ids = [card["id"] for card in server.get("/v1/models").json()["data"]]
        assert ids == ["tiny", "policy", "base", "one"]
        answers = {name: complete(server, name) for name in ("tiny", "policy", "base", "one")}
        assert complete(server, None)["adapter"] == "policy"  # no model: the default, as the served name
        for name, answer in answers.items():
            assert answer["model"] == name  # echoed as given
            assert answer["adapter"] == answer["choices"][0]["adapter"] == ("policy" if name == "tiny" else name)
        assert answers["tiny"]["choices"][0]["token_ids"] == answers["policy"]["choices"][0]["token_ids"]
        assert answers["one"]["choices"][0]["token_ids"] != answers["base"]["choices"][0]["token_ids"]
        chat = server.post(
            "/v1/chat/completions", {"model": "one", "messages": [{"role": "user", "content": "hi"}], **GREEDY}
        ).json()
        generated = server.post(
            "/generate", {"model": "one", "prompt": {"prompt_token_ids": [5, 6, 7, 8]}, **GREEDY}
        ).json()
        assert chat["adapter"] == generated["adapter"] == "one"
        assert generated["token_ids"][0] == answers["one"]["choices"][0]["token_ids"]
        chunks = server.post("/v1/completions", {"model": "one", "prompt": [5, 6, 7, 8], **GREEDY, "stream": True})
        assert '"adapter":"one"' in chunks.text
    finally:
        server.post("/v1/unload_lora_adapter", {"lora_name": "one"})


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
        ("/generate", {"prompt": {"prompt_token_ids": [5, 6]}}),
    ],
)
def test_a_model_that_names_nothing_served_is_a_404_in_the_openai_shape(server, path, body):
    for name in ("nope", "policy@step_000001", "/etc/passwd"):
        reply = server.post(path, {**body, "model": name, "max_tokens": 1})
        error = reply.json()["error"]
        assert reply.status_code == 404 and error["param"] == "model" and error["code"] == "model_not_found"
        assert error["type"] == "not_found_error" and repr(name) in error["message"]


def test_adapters_load_and_unload_at_run_time(server, dirs):
    card = server.post("/v1/load_lora_adapter", {"lora_name": "two", "lora_path": str(dirs["two"])}).json()
    assert card["id"] == "two" and card["parent"] == "tiny" and card["load_s"] > 0
    tokens = complete(server, "two")["choices"][0]["token_ids"]
    again = server.post("/v1/load_lora_adapter", {"lora_name": "two", "lora_path": str(dirs["one"])})
    assert again.status_code == 400 and again.json()["error"]["param"] == "lora_name"
    for reserved in ("policy", "base", "tiny", "policy@step_000001"):
        reply = server.post("/v1/load_lora_adapter", {"lora_name": reserved, "lora_path": str(dirs["two"])})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "lora_name", reserved
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "two"}).json() == {
        "id": "two",
        "object": "model",
        "deleted": True,
    }
    assert server.post("/v1/completions", {"model": "two", "prompt": "x", "max_tokens": 1}).status_code == 404
    gone = server.post("/v1/unload_lora_adapter", {"lora_name": "two"})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name"
    assert server.post("/v1/unload_lora_adapter", {"lora_name": "policy"}).status_code == 400
    # The same files under another name: the same tokens.
    server.post("/v1/load_lora_adapter", {"lora_name": "two-again", "lora_path": str(dirs["two"])})
    assert complete(server, "two-again")["choices"][0]["token_ids"] == tokens
    server.post("/v1/unload_lora_adapter", {"lora_name": "two-again"})
    assert [c["id"] for c in server.get("/v1/models").json()["data"]] == ["tiny", "policy", "base"]
    assert server.engine.stats()["adapters_loaded"] == 0


def test_paths_outside_lora_dirs_are_refused_before_anything_is_read(server, dirs, tmp_path):
    inside = dirs["allowed"]
    link_dir = inside / "link-dir"  # a symlink inside the allowed dir, to an adapter outside it
    link_dir.symlink_to(dirs["elsewhere"], target_is_directory=True)
    link_files = inside / "link-files"  # a real dir inside whose files are symlinks to outside
    link_files.mkdir()
    for f in dirs["elsewhere"].iterdir():
        (link_files / f.name).symlink_to(f)
    try:
        for path in (
            dirs["elsewhere"],
            link_dir,
            link_files,
            inside / ".." / "outside" / "elsewhere",
            tmp_path / "does-not-exist",
            Path("/etc"),
        ):
            reply = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(path)})
            error = reply.json()["error"]
            assert reply.status_code == 403 and error["param"] == "lora_path", (path, reply.text)
            assert error["code"] == "forbidden_path"
        missing = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(inside / "nope")})
        assert missing.status_code == 400 and missing.json()["error"]["param"] == "lora_path"
        bad = inside / "bad"
        bad.mkdir(exist_ok=True)
        (bad / "adapter_config.json").write_text('{"fine_tune_type": "dora", "lora_parameters": {"scale": 1}}')
        (bad / "adapters.safetensors").write_bytes(b"")
        reply = server.post("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(bad)})
        assert reply.status_code == 400 and reply.json()["error"]["param"] == "lora_path"
        assert "x" not in [c["id"] for c in server.get("/v1/models").json()["data"]]
    finally:
        link_dir.unlink()
        for f in link_files.iterdir():
            f.unlink()
        link_files.rmdir()


def test_without_lora_dirs_loading_is_off_and_the_token_guards_both_routes(tiny_model_path, dirs):
    overrides = {"server": {"control_token": "t0k"}}
    with running_server(tiny_model_path, overrides=overrides) as server:
        body = {"lora_name": "one", "lora_path": str(dirs["one"])}
        for route in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            assert server.post(route, body).status_code == 401
        reply = server.post("/v1/load_lora_adapter", body, headers={"Authorization": "Bearer t0k"})
        assert reply.status_code == 403 and "server.lora_dirs" in reply.json()["error"]["message"]


def test_paraloop_serve_serves_lora_modules_from_the_start(tiny_model_path, dirs, capsys):
    with Serve(
        "--model-path",
        str(tiny_model_path),
        "--served-model-name",
        "tiny",
        "--lora-modules",
        f"one={dirs['one']}",
        f"two={dirs['two']}",
    ) as server:
        status, body = server.request("GET", "/v1/models")
        assert status == 200 and [c["id"] for c in body["data"]] == ["tiny", "base", "one", "two"]
        status, body = server.request("POST", "/v1/completions", {"model": "two", "prompt": "Hi", "max_tokens": 2})
        assert status == 200 and body["adapter"] == "two"
        status, body = server.request("POST", "/v1/completions", {"model": "tiny", "prompt": "Hi", "max_tokens": 2})
        assert status == 200 and body["adapter"] == "base"  # no policy: the served name is the base model
        assert server.stop(signal.SIGTERM) == 0
    assert main(["--port", "0", "--model-path", str(tiny_model_path), "--lora-modules", "x=/no/such/adapter"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("paraloop: error: server.lora_modules.x: ") and "/no/such/adapter" in line


def test_lora_modules_are_parsed_bounded_and_checked_before_a_model_loads(tmp_path):
    from paraloop.config import ConfigError, load_config
    from paraloop.serve import build_parser
    from paraloop.run.preflight import settings_problems

    args = build_parser().parse_args(["--lora-modules", f"a={tmp_path}", "b=/no/such", "--max-loras", "2"])
    settings = settings_from_args(args)
    assert settings.server.lora_modules == {"a": str(tmp_path), "b": "/no/such"}
    problems = settings_problems(settings)
    assert [p for p in problems if "lora_modules" in p] == [
        "server.lora_modules.b: /no/such: no such file or directory"
    ]
    with pytest.raises(ConfigError, match="more than max_loras"):
        load_config(None, {"server": {"lora_modules": {"a": "x", "b": "y"}, "max_loras": 1}})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--lora-modules", "no-equals-sign"])
