"""`paraloop merge`: fuse a LoRA adapter into its base model and write a standalone mlx-lm model dir.

    paraloop merge --base-model M --adapter A --output O [--dequantize]

A is a checkpoint step dir, a run dir (-> its latest checkpoint), an adapter dir (adapters.safetensors or
adapter.npz + adapter_config.json) or an adapter file. The fusion is mlx-lm's own (`LoRALinear.fuse`, as in
mlx_lm/fuse.py): W' = W + scale * B^T A^T. A quantized base stays quantized (each adapted layer is
dequantized, fused and requantized with the same group size and bits) unless --dequantize, which writes float
weights. A full fine-tune checkpoint (fine_tune_type "full") simply replaces the base weights.
O (weights, config.json, tokenizer files) is staged next to itself and renamed into place: it is never
overwritten and never left half-written. Bad input: one `paraloop: error: ...` line, exit code 2.
"""

import time
from pathlib import Path

from paraloop.tools import ERRORS, ArgumentParser, fail, parse, resolve_adapter


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="paraloop merge", description="Fuse a LoRA adapter into its base model.")
    parser.add_argument(
        "--base-model", required=True, type=Path, metavar="M", help="base model dir (mlx-lm format)"
    )
    parser.add_argument(
        "--adapter",
        required=True,
        type=Path,
        metavar="A",
        help="checkpoint dir, run dir (its latest checkpoint), adapter dir or adapter file",
    )
    parser.add_argument(
        "--output", required=True, type=Path, metavar="O", help="new model dir (must not exist)"
    )
    parser.add_argument(
        "--dequantize", action="store_true", help="write float weights even if the base is quantized"
    )
    return parser


def merge(base_model: Path, adapter: Path, output: Path, *, dequantize: bool = False) -> Path:
    """Fuse `adapter` into `base_model`, save the result to `output` (absent or empty); return `output`."""
    from mlx.utils import tree_unflatten
    from mlx_lm.utils import dequantize_model, load, save

    from paraloop.builders import check_out_dir, staged_out_dir
    from paraloop.lora import apply_adapter, load_adapter

    check_out_dir(output)
    if not (base_model / "config.json").is_file():  # else mlx-lm would try the Hugging Face hub
        raise FileNotFoundError(f"not a model directory (no config.json): {base_model}")
    source = resolve_adapter(adapter)
    arrays, adapter_config = load_adapter(source)
    model, tokenizer, config = load(str(base_model), return_config=True)
    full = (adapter_config or {}).get("fine_tune_type") == "full"  # a train_mode = "full" checkpoint
    if full:
        model.load_weights(list(arrays.items()), strict=False)
    else:
        apply_adapter(model, source)
        fused = [
            (name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules() if hasattr(m, "fuse")
        ]
        model.update_modules(tree_unflatten(fused))
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    with staged_out_dir(output) as scratch:
        save(scratch, str(base_model), model, tokenizer, config, donate_model=False)
    return output


def main(argv: list[str]) -> int:
    args = parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    start = time.perf_counter()
    try:
        out = merge(args.base_model, args.adapter, args.output, dequantize=args.dequantize)
    except ERRORS as e:
        return fail(e)
    print(f"merged {args.adapter} into {args.base_model}: wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0
