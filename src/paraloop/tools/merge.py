"""`paraloop merge`: fuse a LoRA adapter into its base model and write a standalone mlx-lm model dir.

    paraloop merge --base-model M --adapter A --output O [--dequantize] [--upload-repo ORG/NAME]

M is a model dir or a Hugging Face repo id (found as mlx-lm finds it: the hub cache, HF_HUB_OFFLINE, --revision).
A is a checkpoint step dir, a run dir (-> its latest checkpoint), an adapter dir (adapters.safetensors or
adapter.npz + adapter_config.json) or an adapter file; the predecessor's adapter.npz without adapter_config.json
takes its layout from its arrays and its scale from --lora-scale (default: the predecessor's run's
initial_adapter/adapter_config.json, else 10.0, the predecessor's default). The predecessor's spellings
--lora-path, --output-path and --push-to-hub are accepted. The fusion is mlx-lm's own (`LoRALinear.fuse`, as in
mlx_lm/fuse.py): W' = W + scale * B^T A^T. A quantized base stays quantized (each adapted layer is dequantized,
fused and requantized with the same group size and bits) unless --dequantize, which writes float weights. A full
fine-tune checkpoint (fine_tune_type "full") simply replaces the base weights.
O (weights, config.json, tokenizer files, a model card naming a repo-id base) is staged next to itself and renamed
into place: it is never overwritten and never left half-written. --upload-repo then uploads it as
`mlx_lm.fuse --upload-repo` does (mlx_lm.utils.upload_to_hub); what can fail before the merge (the repo name,
offline mode, no token) is checked first, and a failed upload keeps O. Bad input: one `paraloop: error: ...`
line, exit code 2; a failed upload: exit code 1.
"""

import logging
import sys
import time
from pathlib import Path

from paraloop.tools import ERRORS, ArgumentParser, fail, parse, resolve_adapter

PREDECESSOR_SCALE = 10.0  # mlx_parallm's LoRA scale (init_lora_if_needed, --lora-scale default)
log = logging.getLogger("paraloop.merge")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="paraloop merge", description="Fuse a LoRA adapter into its base model.")
    parser.add_argument("--base-model", required=True, metavar="M", help="base model dir or Hugging Face repo id")
    parser.add_argument("--revision", help="branch, tag or commit when M is a Hugging Face repo id")
    parser.add_argument(
        "--adapter",
        "--adapter-path",
        "--lora-path",
        dest="adapter",
        required=True,
        type=Path,
        metavar="A",
        help="checkpoint dir, run dir (its latest checkpoint), adapter dir or adapter file",
    )
    parser.add_argument(
        "--output",
        "--output-path",
        dest="output",
        required=True,
        type=Path,
        metavar="O",
        help="new model dir (must not exist)",
    )
    parser.add_argument("--dequantize", action="store_true", help="write float weights even if the base is quantized")
    parser.add_argument(
        "--lora-scale",
        type=float,
        metavar="S",
        help=f"LoRA scale of an adapter without adapter_config.json (default {PREDECESSOR_SCALE:g})",
    )
    parser.add_argument(
        "--upload-repo",
        "--push-to-hub",
        dest="upload_repo",
        metavar="ORG/NAME",
        help="upload the merged model to this Hugging Face repo (as mlx_lm.fuse --upload-repo)",
    )
    return parser


def merge(
    base_model: str | Path,
    adapter: Path,
    output: Path,
    *,
    dequantize: bool = False,
    revision: str | None = None,
    lora_scale: float | None = None,
) -> Path:
    """Fuse `adapter` into `base_model`, save the result to `output` (absent or empty); return `output`."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model, load, save

    from paraloop.builders import check_out_dir, staged_out_dir
    from paraloop.config import LoraConfig
    from paraloop.lora import load_adapter, load_into
    from paraloop.model import resolve_model_path
    from paraloop.predecessor import assumed_adapter_config

    check_out_dir(output)
    base_dir = resolve_model_path(base_model, revision=revision)
    source = resolve_adapter(adapter)
    arrays, adapter_config = load_adapter(source)
    if adapter_config is not None and lora_scale is not None:
        raise ValueError(f"--lora-scale is for adapters without adapter_config.json, and {source} has one")
    model, tokenizer, config = load(str(base_dir), return_config=True)
    full = (adapter_config or {}).get("fine_tune_type") == "full"  # a train_mode = "full" checkpoint
    if full:
        model.load_weights(list(arrays.items()), strict=False)
    else:
        if adapter_config is None:
            given = lora_scale is not None
            adapter_config = assumed_adapter_config(
                source,
                arrays,
                model,
                LoraConfig(scale=lora_scale if given else PREDECESSOR_SCALE),
                origin="--lora-scale" if given else "the predecessor's default",
                use_sibling=not given,
            )
        load_into(model, arrays, adapter_config, source=source)
        fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules() if hasattr(m, "fuse")]
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    with staged_out_dir(output) as scratch:
        save(scratch, str(base_dir), model, tokenizer, config, donate_model=False)
        if str(base_dir) != str(base_model):  # a repo id: the card names it, as mlx_lm.fuse's does
            write_model_card(scratch, str(base_model), base_dir)
    return output


def write_model_card(out_dir: Path, base_repo: str, snapshot: Path) -> None:
    """mlx-lm's model card (mlx_lm.utils.create_model_card) with base_model = the repo id, built from the base's
    cached README.md when there is one, never from the network."""
    from huggingface_hub import ModelCard, ModelCardData

    card = None
    if (snapshot / "README.md").is_file():
        try:
            card = ModelCard.load(snapshot / "README.md")
        except Exception as e:  # a card whose metadata does not parse: start from the template, as without one
            log.warning("%s: unreadable model card (%s): writing a new one", snapshot / "README.md", e)
    card = card or ModelCard.from_template(ModelCardData(language="en"))
    card.data.library_name = "mlx"
    card.data.pipeline_tag = "text-generation"
    card.data.tags = [*(card.data.tags or []), *([] if "mlx" in (card.data.tags or []) else ["mlx"])]
    card.data.base_model = base_repo
    card.text = ""
    card.save(str(out_dir / "README.md"))


def check_upload(repo: str) -> None:
    """What would make the upload fail, checked before the merge: the repo name, offline mode, a missing token."""
    from huggingface_hub import constants, get_token
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo)
    except ValueError as e:
        raise ValueError(f"--upload-repo {repo!r}: {e}") from None
    if "/" not in repo:
        raise ValueError(f"--upload-repo {repo!r}: expected ORG/NAME (your user name or an organisation)")
    if constants.is_offline_mode():
        raise ValueError(f"--upload-repo {repo}: HF_HUB_OFFLINE=1 forbids uploading")
    if get_token() is None:
        raise ValueError(f"--upload-repo {repo}: no Hugging Face token (log in with `hf auth login`, or set HF_TOKEN)")


def upload(output: Path, repo: str) -> None:
    from mlx_lm import utils

    utils.upload_to_hub(str(output), repo)  # the card's text, create_repo(exist_ok), upload_large_folder


def main(argv: list[str]) -> int:
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    logging.basicConfig(level=logging.INFO, format="paraloop: %(message)s", stream=sys.stderr)
    start = time.perf_counter()
    try:
        if args.upload_repo:
            check_upload(args.upload_repo)
        out = merge(
            args.base_model,
            args.adapter,
            args.output,
            dequantize=args.dequantize,
            revision=args.revision,
            lora_scale=args.lora_scale,
        )
    except ERRORS as e:
        return fail(e)
    print(f"merged {args.adapter} into {args.base_model}: wrote {out} in {time.perf_counter() - start:.1f} s")
    if args.upload_repo:
        try:
            upload(out, args.upload_repo)
        except Exception as e:  # network, auth, quota: the merged model stays; say how to retry
            reason = (str(e).strip().splitlines() or [""])[0]
            print(
                f"paraloop: error: uploading {out} to {args.upload_repo} failed ({type(e).__name__}: {reason}); "
                f"the merged model is kept: retry with `hf upload {args.upload_repo} {out}`",
                file=sys.stderr,
            )
            return 1
    return 0
