"""Relative paths in a TOML file are relative to that file's directory, so a configuration means the same thing from
any working directory (`cd examples && paraloop run ../configs/demo.toml`). Flags and environment variables are
typed in a shell, so their relative paths stay relative to the current directory, as every command's are.

In: the TOML tree as read and the file's path. Out: the same tree with the path-like keys rewritten. A model
(model.base_path) that names no existing path next to the
file and reads as `org/name` stays a Hugging Face repo id.
"""

import os
import re
from pathlib import Path
from typing import Any

# (section, ..., key) -> kind: "path", "path_or_repo", "paths" (list), "path_values" (table), "task" (module:function),
# "teacher" (a URL or a server.lora_modules name stays as it is; a path is joined when it exists there)
PATH_KEYS: dict[tuple[str, ...], str] = {
    ("model", "base_path"): "path_or_repo",
    ("model", "lora_path"): "path",
    ("server", "lora_modules"): "path_values",
    ("server", "lora_dirs"): "paths",
    ("checkpoint", "dir"): "path",
    ("checkpoint", "resume"): "path",
    ("rl_training", "checkpoint_dir"): "path",  # the predecessor's spelling of checkpoint.dir
    ("rl_training", "mock", "task"): "task",
    ("eval", "task"): "task",
    ("distill", "teacher"): "teacher",
}

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_repo_id(text: str) -> bool:
    """`org/name`, as the Hugging Face hub spells repo ids (no `./`, `../`, leading `/` or `~`)."""
    return bool(REPO_ID.fullmatch(text)) and ".." not in text


def _join(base: Path, value: str) -> str:
    path = Path(value).expanduser()
    if path.is_absolute():
        return str(path)
    return os.path.normpath(base / path)


def _resolve(kind: str, value: Any, base: Path) -> Any:
    if kind == "paths" and isinstance(value, list):
        return [_join(base, v) if isinstance(v, str) else v for v in value]
    if kind == "path_values" and isinstance(value, dict):
        return {k: _join(base, v) if isinstance(v, str) else v for k, v in value.items()}
    if not isinstance(value, str) or not value:
        return value
    if kind == "path":
        return _join(base, value)
    if kind == "path_or_repo":
        joined = _join(base, value)
        if not Path(joined).exists() and looks_like_repo_id(value):
            return value
        return f"./{joined}" if looks_like_repo_id(joined) else joined  # a path, never taken for a repo id later
    if kind == "teacher":
        if value.startswith(("http://", "https://")):
            return value
        joined = _join(base, value)
        return joined if Path(joined).exists() or "/" in value or os.sep in value else value
    if kind == "task":  # only the file form `path/to/file.py:function`; a module name is imported as it is
        module, sep, attr = value.rpartition(":")
        if sep and (module.endswith(".py") or "/" in module or os.sep in module):
            return f"{_join(base, module)}:{attr}"
    return value


def resolve_toml_paths(tree: dict[str, Any], config_path: str | os.PathLike) -> dict[str, Any]:
    """A copy of `tree` with each path-like key made relative to the directory of `config_path` (itself relative
    to the current directory when given so: `configs/demo.toml`'s `../runs/demo` becomes `runs/demo`)."""
    base = Path(os.path.dirname(os.fspath(config_path)) or ".")

    def walk(node: Any, loc: tuple[str, ...]) -> Any:
        if not isinstance(node, dict):
            return _resolve(PATH_KEYS[loc], node, base) if loc in PATH_KEYS else node
        if loc in PATH_KEYS:
            return _resolve(PATH_KEYS[loc], node, base)
        return {k: walk(v, (*loc, k)) for k, v in node.items()}

    return walk(tree, ())


def absolute_paths(data: dict[str, Any]) -> dict[str, Any]:
    """`data` (a dumped configuration) with its relative paths made absolute against the current directory: what
    `paraloop config show` prints, so that its output means the same wherever it is saved and loaded again."""
    return resolve_toml_paths(data, Path.cwd() / "paraloop.toml")
