"""Token log-probabilities and entropies: from logits, or from a model's hidden states a chunk of tokens at a time.

In: logits (B, T, V) or a model and input ids (B, T), targets (B, T), per-row temperatures (B,). Out: float32
log p(target) (B, T) of the temperature-scaled distribution softmax(logits / T) - the distribution the rollout
was sampled from - and that distribution's entropy (B, T). Vectorised: logsumexp-based log-softmax in float32 and
a take_along_axis gather; no one-hot tensors, no per-token Python loops.

The chunked path never holds (B, T, V): the final hidden states go through the LM head `chunk_tokens` tokens at a
time (a custom function whose backward recomputes each chunk's logits and applies the analytic gradient of
log-softmax and entropy), so the head's memory is one chunk's logits and a few arrays of that size. It equals the
full path to float32 rounding (the same operations, summed in a different order: ~1e-6 relative on log-probs and
gradients; tests/test_learn_logprobs.py states the tolerances). With `positions` only those flattened (row, token)
positions are scored (the trained ones); the others read 0, which the loss never weights. With `keep_logits` the
forward keeps every chunk's log-softmax for the backward instead of recomputing the chunk (one head matmul fewer
per scored token, for (scored tokens x vocab) float32 bytes held until the backward): what the learner does when
its memory target allows (learn/memory.py); the results are the same operations on the same values, bit for bit.

Sampling-mask replay: a position with `kept` = k > 0 was sampled by the engine from its top-k / top-p / min-p kept
set, the k most likely tokens of the tempered distribution. Both paths then score it over the same set rebuilt
from the learner's own logits: the k largest z = logits / T (ties at the k-th value included) plus the target
itself (so a boundary token the learner ranks (k+1)-th by rounding still has a finite log-prob), i.e.
log p = z_target - logsumexp_{kept}(z), and the entropy of that renormalised distribution; gradients flow to the
kept logits only. kept = 0 (or None) is the full vocabulary, as before.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from paraloop.logits_head import LogitsHead

CHUNK_BYTES = 16 * 2**20  # float32 logits per chunk when the size is automatic (MLX keeps a few chunks in flight)
MIN_CHUNK_TOKENS = 16


def auto_chunk_tokens(vocab: int) -> int:
    """Tokens per chunk so one chunk's float32 logits take CHUNK_BYTES (SmolLM2's 49k vocabulary: 85 tokens)."""
    return max(MIN_CHUNK_TOKENS, CHUNK_BYTES // (4 * max(1, vocab)))


def kept_set(z: mx.array, targets: mx.array, kept: mx.array) -> mx.array:
    """(..., V) bool: each position's kept set, its `kept` largest z (ties included) and its target; every token
    where kept is 0. z (..., V), targets and kept (...)."""
    vocab = z.shape[-1]
    k = mx.clip(kept.astype(mx.int32), 0, vocab)
    index = mx.where(k > 0, vocab - k, 0)[..., None]
    threshold = mx.stop_gradient(mx.take_along_axis(mx.sort(z, axis=-1), index, axis=-1))
    return (z >= threshold) | (mx.arange(vocab) == targets[..., None])


def token_logprobs(
    logits: mx.array,
    targets: mx.array,
    temperature: mx.array,
    *,
    with_entropy: bool = True,
    kept: mx.array | None = None,
) -> tuple[mx.array, mx.array | None]:
    """(log p(targets), entropy or None), both (B, T) float32; over each position's kept set where `kept` (B, T)
    says the engine sampled from one (see the module docstring)."""
    z = logits.astype(mx.float32) / temperature.astype(mx.float32)[:, None, None]
    zk = z if kept is None else mx.where(kept_set(z, targets, kept), z, -mx.inf)
    lse = mx.logsumexp(zk, axis=-1)  # (B, T)
    logp = mx.take_along_axis(z, targets[..., None], axis=-1).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    probs = mx.exp(zk - lse[..., None])  # 0 outside the kept set
    entropy = lse - mx.sum(probs * z, axis=-1)  # H = -sum p log p = lse - sum p z
    return logp, entropy


def forward_logprobs(
    model: nn.Module,
    input_ids: mx.array,
    targets: mx.array,
    temperature: mx.array,
    *,
    with_entropy: bool = True,
    head: LogitsHead | None = None,
    chunk_tokens: int | None = None,
    positions: np.ndarray | None = None,
    entropy_grad: bool = True,
    keep_logits: bool = False,
    kept: mx.array | None = None,
) -> tuple[mx.array, mx.array | None]:
    """Run the model on (B, T) right-padded ids and score each next token.

    head None: the full path, model(ids) -> (B, T, V) logits. Otherwise the chunked path through `head` (see the
    module docstring), `chunk_tokens` per chunk (None: automatic), scoring only the flat `positions` when given.
    entropy_grad False promises the caller never differentiates the entropy (its weight is 0), saving a pass.
    keep_logits: the chunked backward reads the forward's log-softmax instead of recomputing it (faster, more memory).
    kept (B, T): sampling-mask replay (module docstring); None: every position over the full vocabulary.
    """
    if head is None:
        return token_logprobs(model(input_ids), targets, temperature, with_entropy=with_entropy, kept=kept)
    hidden = head.hidden(model, input_ids)
    return chunked_logprobs(
        model,
        head,
        hidden,
        targets,
        temperature,
        chunk_tokens=chunk_tokens,
        positions=positions,
        with_entropy=with_entropy,
        entropy_grad=entropy_grad,
        keep_logits=keep_logits,
        kept=kept,
    )


def chunked_logprobs(
    model: nn.Module,
    head: LogitsHead,
    hidden: mx.array,
    targets: mx.array,
    temperature: mx.array,
    *,
    chunk_tokens: int | None = None,
    positions: np.ndarray | None = None,
    with_entropy: bool = True,
    entropy_grad: bool = True,
    keep_logits: bool = False,
    kept: mx.array | None = None,
) -> tuple[mx.array, mx.array | None]:
    """(B, T) log-probs (and entropies) from (B, T, D) hidden states through `head`, one chunk of tokens at a time."""
    b, t, d = hidden.shape
    flat = hidden.reshape(b * t, d)
    tgt = targets.reshape(-1)
    inv_t = mx.broadcast_to((1.0 / temperature.astype(mx.float32))[:, None], (b, t)).reshape(-1)
    flat_kept = None if kept is None else kept.reshape(-1)
    if positions is not None:
        index = mx.array(np.asarray(positions, np.int32))
        flat, tgt, inv_t = flat[index], tgt[index], inv_t[index]
        flat_kept = None if flat_kept is None else flat_kept[index]
    n = int(flat.shape[0])
    if n == 0:
        zeros = mx.zeros((b, t), mx.float32)
        return zeros, (zeros if with_entropy else None)
    module = head.module(model)
    chunk = chunk_tokens or auto_chunk_tokens(_vocab_of(module))
    scores = _scores_function(
        head,
        module,
        tgt,
        inv_t,
        chunk,
        with_entropy,
        entropy_grad and with_entropy,
        flat.dtype,
        keep_logits,
        flat_kept,
    )
    outs = scores(flat, module.trainable_parameters())
    logp, entropy = outs[0], (outs[1] if with_entropy else None)
    if positions is not None:
        back = np.full(b * t, n, np.int32)  # position -> its score, or the trailing 0 when not scored
        back[np.asarray(positions)] = np.arange(n, dtype=np.int32)
        back = mx.array(back)
        pad = mx.zeros((1,), mx.float32)
        logp = mx.concatenate([logp, pad])[back]
        entropy = None if entropy is None else mx.concatenate([entropy, pad])[back]
    return logp.reshape(b, t), (None if entropy is None else entropy.reshape(b, t))


def _vocab_of(module: nn.Module) -> int:
    """Rows of the head's weight: the vocabulary for a Linear, an Embedding and their quantized forms alike."""
    weight = module.get("weight")
    return int(weight.shape[0]) if isinstance(weight, mx.array) and weight.ndim == 2 else 32768


def _scores_function(
    head: LogitsHead,
    module: nn.Module,
    targets: mx.array,
    inv_t: mx.array,
    chunk: int,
    with_entropy: bool,
    entropy_grad: bool,
    dtype: mx.Dtype,
    keep_logits: bool = False,
    kept: mx.array | None = None,
):
    """A custom function (x (N, D), head params) -> (logp (N,), entropy (N,)) with a chunk-recomputing backward.
    keep_logits: it also returns each chunk's float32 logits z (chunk, V), which the backward reads instead of
    recomputing. `kept` (N,): score over each position's kept set (sampling-mask replay); None: the full vocabulary."""
    project = head.projection(module)
    transform = head.transform
    n = int(targets.shape[0])
    spans = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    # A linear head (no bias, no softcap) in float32: 1/T and the logit scale fold into the (chunk, D) input
    # instead of a pass over (chunk, V) logits, forward and backward.
    fold = transform.softcap is None and "bias" not in module and dtype == mx.float32
    fold_scale = (inv_t * transform.scale)[:, None] if fold else None

    def logits_of(x: mx.array, s: int, e: int) -> tuple[mx.array, mx.array]:
        """(the projection's input, float32 z = logits / T) of one chunk."""
        if fold:
            a = x * fold_scale[s:e]
            return a, project(a)
        return x, transform(project(x)).astype(mx.float32) * inv_t[s:e, None]

    def restricted(z: mx.array, s: int, e: int) -> tuple[mx.array, mx.array | None]:
        """(z with -inf outside the chunk's kept sets, the kept mask or None when every token is kept)."""
        if kept is None:
            return z, None
        keep = kept_set(z, targets[s:e], kept[s:e])
        return mx.where(keep, z, -mx.inf), keep

    @mx.custom_function
    def scores(x: mx.array, params: dict) -> tuple[mx.array, ...]:
        if params:
            module.update(params)
        logps, entropies, saved = [], [], []
        for s, e in spans:
            # Chain the chunks: each starts after the previous one's results, so MLX evaluates them one at a time
            # (independent branches would otherwise be scheduled side by side, every chunk's logits alive at once).
            xc = mx.depends(x[s:e], logps[-1:] + entropies[-1:]) if logps else x[s:e]
            _, z = logits_of(xc, s, e)
            zk, _ = restricted(z, s, e)
            lse = mx.logsumexp(zk, axis=-1)
            logps.append(mx.take_along_axis(z, targets[s:e, None], axis=-1)[:, 0] - lse)
            if with_entropy:  # H = -sum p log p = lse - sum p z (p = 0 outside the kept set)
                entropies.append(lse - mx.sum(mx.softmax(zk, axis=-1, precise=True) * z, axis=-1))
            if keep_logits:
                saved.append(z)
        out = (mx.concatenate(logps),)
        out = (*out, mx.concatenate(entropies)) if with_entropy else out
        return (*out, *saved)

    @scores.vjp
    def scores_vjp(primals: tuple, cotangents: tuple, outputs: tuple) -> tuple[mx.array, dict]:
        x, params = primals
        g_logp = cotangents[0]
        flat = tree_flatten(params)
        names, values = [k for k, _ in flat], [v for _, v in flat]

        def projection(a: mx.array, *p: mx.array) -> mx.array:
            if p:
                module.update(tree_unflatten(list(zip(names, p, strict=True))))
            return project(a)

        saved = outputs[(2 if with_entropy else 1) :]
        dxs, dparams = [], None
        for i, (s, e) in enumerate(spans):
            xc = mx.depends(x[s:e], [dxs[-1], *dparams]) if dxs else x[s:e]
            if keep_logits:  # the forward's logits: no matmul of size V here (a is the (chunk, D) input alone)
                a, z = (xc * fold_scale[s:e] if fold else xc), saved[i]
            else:
                a, z = logits_of(xc, s, e)  # recomputed: the forward kept nothing of size V
            zk, mask = restricted(z, s, e)
            g = g_logp[s:e, None]
            if entropy_grad:  # dH/dz_k = -p_k (log p_k + H), 0 outside the kept set
                logq = zk - mx.logsumexp(zk, axis=-1, keepdims=True)
                q = mx.exp(logq)  # 0 outside the kept set
                if mask is not None:
                    logq = mx.where(mask, logq, 0.0)  # so that 0 * log q is 0 there, not 0 * -inf = NaN
                dz = -q * (g + cotangents[1][s:e, None] * (logq + outputs[1][s:e, None]))
            else:
                dz = mx.softmax(zk, axis=-1, precise=True) * -g
            idx = targets[s:e, None]  # d log p_t / dz_k = [k = t] - p_k
            dz = mx.put_along_axis(dz, idx, mx.take_along_axis(dz, idx, axis=-1) + g, axis=-1)
            if fold:
                draw = dz
            else:
                y = transform(project(a))
                draw = transform.backward(y, (dz * inv_t[s:e, None]).astype(y.dtype))
            # The projection's vjp never reads its output, so (lazily) this recomputation of it never runs.
            _, (da, *dp) = mx.vjp(projection, [a, *values], [draw])
            dxs.append(da * fold_scale[s:e] if fold else da)
            dparams = dp if dparams is None else [u + v for u, v in zip(dparams, dp, strict=True)]
        return mx.concatenate(dxs), tree_unflatten(list(zip(names, dparams or [], strict=True)))

    return scores
