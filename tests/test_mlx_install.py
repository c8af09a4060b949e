"""MLX's Linux backends share one library file: paraloop names a clash of them, and a backend that cannot load, in
one line (`paraloop.mlx_install`, called by the `paraloop` command before anything imports mlx.core)."""

import base64
import hashlib
import sys
from pathlib import Path

import pytest

from paraloop import cli, logs, mlx_install

LIBRARY = "mlx/lib/libmlx.so"


def fake_backend(site: Path, name: str, version: str, library: bytes) -> None:
    """A dist-info for backend package `name` whose RECORD lists `library` as its mlx/lib/libmlx.so."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    digest = base64.urlsafe_b64encode(hashlib.sha256(library).digest()).rstrip(b"=").decode()
    (info / "RECORD").write_text(f"{LIBRARY},sha256={digest},{len(library)}\n{info.name}/METADATA,,\n")


def put_library(site: Path, content: bytes) -> None:
    (site / LIBRARY).parent.mkdir(parents=True, exist_ok=True)
    (site / LIBRARY).write_bytes(content)


@pytest.fixture
def linux(monkeypatch):
    monkeypatch.setattr(mlx_install.sys, "platform", "linux")


def test_one_backend_is_no_problem(tmp_path, linux):
    fake_backend(tmp_path, "mlx-cuda-13", "0.32.4", b"cuda build")
    put_library(tmp_path, b"cuda build")
    assert mlx_install.installed_backends([str(tmp_path)]) == {"mlx-cuda-13": "0.32.4"}
    assert mlx_install.install_problem([str(tmp_path)]) is None


def test_two_backends_are_named_with_whose_library_is_in_place_and_the_fix(tmp_path, linux):
    fake_backend(tmp_path, "mlx-cuda-13", "0.32.4", b"the cuda build, larger")
    fake_backend(tmp_path, "mlx-cpu", "0.32.4", b"the cpu build")
    put_library(tmp_path, b"the cpu build")  # mlx[cpu] installed last: a CUDA user now computes on the CPU
    problem = mlx_install.install_problem([str(tmp_path)])
    assert "several MLX backends are installed (mlx-cpu 0.32.4, mlx-cuda-13 0.32.4)" in problem
    assert "mlx-cpu's library is the one in place" in problem
    assert (
        "`pip uninstall -y mlx-cpu mlx-cuda-13`, then `pip install 'mlx[cpu]==0.32.4' or "
        "'mlx[cuda13]==0.32.4'`" in problem
    )
    assert "\n" not in problem


def test_libraries_of_the_same_size_are_told_apart_by_their_hash(tmp_path, linux):
    fake_backend(tmp_path, "mlx-cuda-12", "0.32.4", b"cuda 12 build")
    fake_backend(tmp_path, "mlx-cuda-13", "0.32.4", b"cuda 13 build")
    put_library(tmp_path, b"cuda 13 build")
    assert "mlx-cuda-13's library is the one in place" in mlx_install.install_problem([str(tmp_path)])
    put_library(tmp_path, b"cuda 14 build")
    assert "none of their libraries is intact" in mlx_install.install_problem([str(tmp_path)])


def test_uninstalling_one_of_two_leaves_no_library_and_says_so(tmp_path, linux):
    fake_backend(tmp_path, "mlx-cpu", "0.32.4", b"cpu")
    fake_backend(tmp_path, "mlx-cuda-12", "0.32.4", b"cuda")  # the file both RECORDs list was deleted
    assert "none of their libraries is intact" in mlx_install.install_problem([str(tmp_path)])


def test_no_check_off_linux(tmp_path, monkeypatch):
    monkeypatch.setattr(mlx_install.sys, "platform", "darwin")
    fake_backend(tmp_path, "mlx-cpu", "0.32.4", b"a")
    fake_backend(tmp_path, "mlx-cuda-13", "0.32.4", b"b")
    assert mlx_install.install_problem([str(tmp_path)]) is None


def test_the_command_warns_about_a_clash_and_goes_on(monkeypatch, capsys):
    monkeypatch.setattr(logs, "setup_logging", lambda: None)  # the root logger stays as pytest set it
    monkeypatch.setattr(mlx_install, "install_problem", lambda: "several MLX backends are installed (...)")
    assert cli.main(["config", "show"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "paraloop: warning: several MLX backends are installed (...)\n"
    assert "[model]" in captured.out


def test_a_cuda_build_without_a_driver_is_one_error_line_naming_the_cpu_build(monkeypatch, capsys):
    def no_driver(name):
        raise ImportError("libcuda.so.1: cannot open shared object file: No such file or directory")

    monkeypatch.setattr(logs, "setup_logging", lambda: None)
    monkeypatch.setattr(cli.importlib, "import_module", no_driver)
    monkeypatch.setattr(mlx_install, "installed_backends", lambda path=None: {"mlx-cuda-13": "0.32.4"})
    assert cli.main(["run", "configs/tiny.toml"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("paraloop: error: MLX's CUDA build (mlx-cuda-13) cannot load")
    assert "`pip uninstall -y mlx-cuda-13 && pip install 'mlx[cpu]'`" in err


def test_this_environment_has_exactly_one_backend():
    """`make install` puts one backend into the venv on Linux (MLX_BACKEND, cpu by default); macOS has mlx-metal."""
    expected = 1 if sys.platform == "linux" else 0
    assert len(mlx_install.installed_backends()) == expected, mlx_install.installed_backends()
    assert mlx_install.install_problem() is None
