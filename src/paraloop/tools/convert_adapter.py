"""`paraloop convert-adapter`: mlx-lm's adapters.safetensors <-> the predecessor's adapter.npz.

    paraloop convert-adapter SRC DST [--to safetensors|npz]

SRC: an adapter file, an adapter dir, a checkpoint step dir or a run dir (-> its latest checkpoint).
DST: a file ending in .safetensors or .npz, or a directory (created) that receives adapters.safetensors or
adapter.npz. adapter_config.json travels along. The target format is --to, else DST's suffix, else the other
format than SRC's. Nothing existing is overwritten; each file appears whole (written aside, then renamed).
Bad input: one `paraloop: error: ...` line, exit code 2.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

from paraloop.tools import ERRORS, ArgumentParser, fail, parse, resolve_adapter

SUFFIX_FORMAT = {".safetensors": "safetensors", ".npz": "npz"}


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="paraloop convert-adapter", description="Convert an adapter: safetensors <-> npz.")
    parser.add_argument("src", type=Path, help="adapter file or dir, checkpoint dir, or run dir")
    parser.add_argument("dst", type=Path, help="output file (.safetensors / .npz) or directory")
    parser.add_argument("--to", choices=sorted(SUFFIX_FORMAT.values()), help="target format (default: from DST)")
    return parser


def source_file(src: Path, target: str | None) -> Path:
    """The weights file to read: SRC itself, or in a dir the one not in the target format (npz first)."""
    from paraloop.lora import NPZ_NAME, SAFETENSORS_NAME

    path = resolve_adapter(src)
    if path.is_file():
        return path
    names = [SAFETENSORS_NAME, NPZ_NAME] if target == "npz" else [NPZ_NAME, SAFETENSORS_NAME]
    return next(path / n for n in names if (path / n).is_file())


def convert(src: Path, dst: Path, *, to: str | None = None) -> Path:
    """Write SRC's adapter to DST in the target format (see the module docstring); return the new file."""
    from paraloop.lora import CONFIG_NAME, NPZ_NAME, SAFETENSORS_NAME, load_adapter, save_adapter

    if dst.suffix in SUFFIX_FORMAT and to is not None and SUFFIX_FORMAT[dst.suffix] != to:
        raise ValueError(f"{dst}: the suffix says {SUFFIX_FORMAT[dst.suffix]} but --to says {to}")
    to = to or SUFFIX_FORMAT.get(dst.suffix)
    file = source_file(src, to)
    to = to or ("safetensors" if file.suffix == ".npz" else "npz")
    arrays, config = load_adapter(file)
    if dst.suffix in SUFFIX_FORMAT:
        out_dir, out_file = dst.parent, dst
    else:
        out_dir, out_file = dst, dst / (SAFETENSORS_NAME if to == "safetensors" else NPZ_NAME)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory")
    if out_file.exists():
        raise FileExistsError(f"{out_file} already exists")
    out_config = out_dir / CONFIG_NAME
    if config is not None and out_config.is_file() and json.loads(out_config.read_text()) != config:
        raise FileExistsError(f"{out_config} already exists with a different adapter config")

    out_dir.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir))
    try:
        save_adapter(scratch, arrays, config or {}, fmt=to)
        os.replace(scratch / (SAFETENSORS_NAME if to == "safetensors" else NPZ_NAME), out_file)
        if config is not None and not out_config.exists():
            os.replace(scratch / CONFIG_NAME, out_config)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out_file


def main(argv: list[str]) -> int:
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        out = convert(args.src, args.dst, to=args.to)
    except ERRORS as e:
        return fail(e)
    note = "" if (out.parent / "adapter_config.json").is_file() else " (no adapter_config.json found next to SRC)"
    print(f"wrote {out}{note}")
    return 0
