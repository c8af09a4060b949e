"""A Hugging Face hub cache built on disk, laid out as huggingface_hub writes it, so models load by repo id offline.

HF_HOME/hub/models--ORG--NAME/
    blobs/<sha256>                         each file's bytes
    snapshots/<commit>/<file> -> ../../blobs/<sha256>
    refs/<branch or tag>                   the commit it points at
"""

import hashlib
import os
from pathlib import Path

REPO_ID = "paraloop-test/tiny"


def add_snapshot(
    home: Path, model_dir: Path, *, repo: str = REPO_ID, commit: str, refs: tuple[str, ...] = ("main",)
) -> Path:
    """Put `model_dir`'s files into HF_HOME's cache as `repo` at `commit`, named by `refs`; return the snapshot."""
    root = home / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "blobs").mkdir(exist_ok=True)
    (root / "refs").mkdir(exist_ok=True)
    for file in sorted(model_dir.iterdir()):
        data = file.read_bytes()
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    for ref in refs:
        (root / "refs" / ref).write_text(commit)  # huggingface_hub writes the bare hash, no newline
    return snapshot


def offline_env(home: Path) -> dict[str, str]:
    """The environment of a process that finds models only in `home`'s cache and never reaches the network."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME")}
    return {**env, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PARALOOP_LOG": "warning", "PYTHONUNBUFFERED": "1"}
