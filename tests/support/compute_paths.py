"""The two ways the frozen base computes (`[model] compute`), and the tolerance each needs in tests.

The core suite (engine, learner, `paraloop run`, merge) runs on the tiny 4-bit model once per path:

- `dequantized`: what `compute = "auto"` means on the CPU backend (CI, Linux). The 4-bit weights are expanded to
  float32 at load and every matmul is a float32 GEMM (OpenBLAS).
- `quantized`: what `compute = "auto"` means on Metal and CUDA (every Mac user with a 4-bit model). The base keeps
  MLX's QuantizedLinear / QuantizedEmbedding and its matmuls run in MLX's quantized kernels. Their CPU versions
  are about 10x slower than the float32 GEMM here, so the quantized `paraloop run` tests are the few that matter.

Both paths compute the same function of the same 4-bit weights (`quantized_matmul(x, W4)` is `x @ dequantize(W4).T`
up to rounding; measured: logits agree to 1.9e-6), and on the tiny model every activation is float32 (its scales
are float32). What a test compares is one forward pass with another grouped differently: a decode step (one
row, the matrix-vector kernel, a KV cache) against a full forward (the matrix-matrix kernel), or the learner's
padded batch against the engine's rows. Both paths accumulate in float32, so they need the same tolerances.
The worst gaps measured (`bash scripts/measure-tolerances.sh Haswell Sandybridge`, which runs the numerics tests
with PARALOOP_TOLERANCE_REPORT under each OpenBLAS kernel) on a 2-core AMD EPYC (Zen 3, AVX2), and the bounds,
which leave at least 5x room for other BLAS/GPU kernels' summation orders (logits here are of magnitude ~1):

| comparison (assert_within's name)               | Zen     | Haswell | Sandybridge | bound  |
|--------------------------------------------------|---------|---------|-------------|--------|
| engine vs one full forward                       | 1.9e-6  | 1.9e-6  | 1.9e-6      | 1e-4   |
| learner vs engine (dequantized / quantized)      | 2.4e-6 / 1.9e-6 | 2.4e-6 / 1.9e-6 | 1.9e-6 / 1.9e-6 | 2e-4 |
| mixed-adapter row vs single-adapter engine       | 1.4e-6  | 1.4e-6  | 0           | 1e-5   |
| cached prefix vs fresh prefill                   | 9.5e-7  | 9.5e-7  | 0           | 1e-5   |
| chunked vs whole prefill keys (deq. / quant.)    | 9.5e-7 / 1.2e-6 | 9.5e-7 / 1.2e-6 | 0 / 0 | 1e-5 |
| quantized vs dequantized logits                  | 1.9e-6  | 1.9e-6  | 0           | 1e-5   |

A bfloat16 4-bit model on quantized kernels (mlx-community's layout, the Mac default) computes in bfloat16: each
logit is rounded to 8 significant bits, so two forwards grouped differently may disagree by about 2^-8 of a
logit's size per log-prob (~1e-2 on the tiny model, whose logits stay below ~1.1; ~0.1 on a real model with
logits ~20). Measured here: 1.4e-6 (both kernels mostly round to the same bfloat16 values). The engine and the
learner both take the log-softmax in float32, so paraloop adds no rounding of its own.
"""

import json
import os

COMPUTES = ("dequantized", "quantized")

# |engine log-prob - one full forward's log-prob|, per token.
LOGPROB_TOL = {"dequantized": 1e-4, "quantized": 1e-4, "quantized-bfloat16": 1e-2}
# |learner log-prob - engine-recorded log-prob| (the learner's padded batch adds one more grouping of the sums).
PARITY_TOL = {"dequantized": 2e-4, "quantized": 2e-4, "quantized-bfloat16": 1e-2}
# Cached prompt keys: chunked prefill against a whole-prompt prefill.
CACHE_TOL = {"dequantized": 1e-5, "quantized": 1e-5}
# Logits of the quantized and the dequantized path on the same 4-bit weights (same function, two kernels).
SAME_FUNCTION_TOL = 1e-5
# A row of a mixed-adapter batch (gathered per-row LoRA matrices) against a single-adapter engine (plain matmul).
ADAPTER_ROWS_TOL = 1e-5
# Cached prefix + the rest prefilled at another shape, against a fresh prefill of the whole prompt.
PREFIX_TOL = 1e-5

_worst: dict[str, float] = {}


def assert_within(what: str, gap: float, tol: float) -> None:
    """Assert `gap <= tol`, remembering the largest gap seen per comparison: with PARALOOP_TOLERANCE_REPORT=FILE the
    session writes them there (`scripts/measure-tolerances.sh` runs the numerics tests under each OpenBLAS kernel)."""
    _worst[what] = max(_worst.get(what, 0.0), float(gap))
    assert gap <= tol, f"{what}: {gap:.3g} > {tol:.3g}"


def max_gap(a, b) -> float:
    """The largest |a - b| over two equally long sequences of numbers (or arrays)."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max()) if a.size else 0.0


def write_tolerance_report() -> None:
    path = os.environ.get("PARALOOP_TOLERANCE_REPORT")
    if path and _worst:
        with open(path, "w") as f:
            json.dump(dict(sorted(_worst.items())), f, indent=1)
