"""A tiny deterministic random-weight model dir for tests and benchmarks, built offline in about a second.

In: an output dir, a layout ("qwen3" or "llama"), a seed, a dtype (float32; bfloat16 or float16 as most published
MLX models are), optionally a bit width for mlx-lm's affine quantization (group size 64). Out: a dir with config.json,
model.safetensors and Hugging Face tokenizer
files that `mlx_lm.load` and `transformers.AutoTokenizer` both accept. The tokenizer is a byte-level BPE
trained here on an embedded English + arithmetic corpus, with ChatML special tokens and chat template.
Same arguments, same bytes: weights come from NumPy's seeded generator, the BPE trainer is deterministic.
Every linear input dim is a multiple of 64, or mlx-lm would silently leave that layer unquantized.
"""

import contextlib
import importlib
import io
from pathlib import Path
from typing import Any

import numpy as np

from paraloop.builders import CHATML_TEMPLATE, write_model_dir

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
VOCAB_SIZE = 1024  # including the special tokens
LAYOUTS = ("qwen3", "llama")
QUANTIZE_BITS = (2, 3, 4, 5, 6, 8)  # mlx affine modes
DTYPES = ("float32", "bfloat16", "float16")
GROUP_SIZE = 64

DIMS: dict[str, Any] = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "intermediate_size": 256,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}

PROSE = """\
The morning was cold and clear, and the river ran fast under the old stone bridge. A small boat
drifted past the mill while two children counted the ducks that swam along the bank. Their mother
called them home for breakfast: bread, butter, honey, apples and a pot of hot tea.
In the village there is a market every Saturday. Farmers bring eggs, cheese, potatoes, onions,
carrots and fresh fish from the coast. The baker opens his shop before dawn, and by seven o'clock
the street smells of warm loaves. People talk about the weather, the harvest and the price of wool.
A good answer is short and correct. When someone asks a question, read it carefully, think about
what is being asked, and then reply in plain words. If you do not know, say so. If the question
is about numbers, show the steps of the calculation and give the final result at the end.
The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid,
and the capital of Germany is Berlin. London is the largest city in England, and it stands on
the river Thames. Japan is an island nation in the east; its capital is Tokyo.
Water freezes at zero degrees and boils at one hundred degrees Celsius at sea level. The sun is a
star, and the earth moves around it once every year. The moon goes around the earth about once
a month, and its light is only the light of the sun reflected back to us.
Computers follow instructions written by programmers. A program reads input, does some work, and
writes output. Good programs are simple, tested and easy to change. A bug is a mistake in a
program; finding it often takes longer than fixing it. Always check your work twice.
She opened the letter slowly. It was from her brother, who had moved to the mountains to work as
a teacher. He wrote about the snow, the long walks to school, the students who were curious about
everything, and the quiet evenings spent reading by the fire. He promised to visit in the summer.
Question: What is the sum of the numbers? Answer: First add the tens, then add the ones, and
finally combine them. Question: Which is larger? Answer: Compare the digits from left to right.
The assistant helps the user. The user asks, and the assistant answers politely and clearly.
Thank you very much for your help today. You are welcome; please let me know if you need more.
Autumn brought heavy rain, and the gardener hurried to cover the tomatoes, peppers and pumpkins.
Neighbours borrowed ladders, hammers, nails and rope to repair roofs damaged during the storm.
Musicians practised their violins, trumpets and drums in the library hall every Wednesday night,
while librarians catalogued newspapers, journals, dictionaries, atlases and forgotten novels.
Scientists measure temperature, pressure, distance and velocity with careful instruments; they
record observations in notebooks, compare hypotheses, and publish experiments others can repeat.
Elephants, giraffes, zebras, lions, penguins, dolphins and squirrels appear in picture books.
Yesterday, tomorrow, Monday, Tuesday, Thursday, Friday, Sunday, January, February, March, April,
June, July, August, September, October, November and December are words for time and calendars.
"""


def corpus() -> str:
    """The tokenizer training text: the prose above plus arithmetic lines, so digits and operators get merges."""
    lines = [PROSE]
    for a in range(0, 40, 3):
        for b in range(1, 30, 7):
            lines.append(f"{a} + {b} = {a + b}. {a} times {b} is {a * b}. {a + b} - {b} = {a}.")
    return "\n".join(lines)


def train_tokenizer() -> Any:
    """Byte-level BPE (individual digits, like SmolLM2 and Qwen) with ChatML specials at ids 0, 1, 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus().splitlines(keepends=True), trainer=trainer)
    return tok


def model_config(*, layout: str, vocab_size: int, dtype: str = "float32") -> dict[str, Any]:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    return {
        "model_type": layout,
        "architectures": ["Qwen3ForCausalLM" if layout == "qwen3" else "LlamaForCausalLM"],
        "vocab_size": vocab_size,
        "torch_dtype": dtype,
        "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
        **DIMS,
    }


def random_weights(model: Any, *, seed: int) -> dict[str, Any]:
    """N(0, 0.02) for matrices and ones for norm scales, drawn in sorted-name order from one seeded generator."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    rng = np.random.default_rng(seed)
    weights = {}
    for name, param in sorted(tree_flatten(model.parameters())):
        if param.ndim == 1:
            weights[name] = mx.ones(param.shape, dtype=mx.float32)
        else:
            weights[name] = mx.array(rng.normal(0.0, 0.02, size=param.shape).astype(np.float32))
    return weights


def build_tiny_model(
    out_dir: Path | str,
    *,
    quantize_bits: int | None = None,
    layout: str = "qwen3",
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write the tiny model to `out_dir` (absent or empty) and return its path.

    `dtype` rounds the float32 weights (bfloat16: the layout of mlx-community's models); `quantize_bits` (e.g. 4)
    then stores mlx-lm's affine quantization, group size 64, with scales and biases in that dtype.
    """
    if quantize_bits is not None and quantize_bits not in QUANTIZE_BITS:
        raise ValueError(f"quantize_bits must be one of {QUANTIZE_BITS} or None, got {quantize_bits!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    tokenizer = train_tokenizer()
    config = model_config(layout=layout, vocab_size=tokenizer.get_vocab_size(), dtype=dtype)

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import quantize_model

    arch = importlib.import_module(f"mlx_lm.models.{layout}")  # mlx-lm's registry: module = model_type
    model = arch.Model(arch.ModelArgs.from_dict(config))
    weights = random_weights(model, seed=seed)
    model.load_weights(list(weights.items()))
    if dtype != "float32":
        model.set_dtype(getattr(mx, dtype))
        weights = dict(tree_flatten(model.parameters()))
    if quantize_bits is not None:
        with contextlib.redirect_stdout(io.StringIO()):  # quantize_model prints bits per weight
            model, config = quantize_model(model, config, GROUP_SIZE, quantize_bits)
        weights = dict(tree_flatten(model.parameters()))
    return write_model_dir(
        out_dir,
        weights,
        config,
        tokenizer,
        chat_template=CHATML_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=DIMS["max_position_embeddings"],
    )
