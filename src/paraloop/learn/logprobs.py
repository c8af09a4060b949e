"""Token log-probabilities and entropies from logits, and the model forward that produces them.

In: logits (B, T, V) or a model and input ids (B, T), targets (B, T), per-row temperatures (B,). Out: float32
log p(target) (B, T) of the temperature-scaled distribution softmax(logits / T) - the distribution the rollout
was sampled from - and that distribution's entropy (B, T). Vectorised: logsumexp-based log-softmax in float32 and
a take_along_axis gather; no one-hot tensors, no per-token Python loops.
"""

import mlx.core as mx
import mlx.nn as nn


def token_logprobs(
    logits: mx.array, targets: mx.array, temperature: mx.array, *, with_entropy: bool = True
) -> tuple[mx.array, mx.array | None]:
    """(log p(targets), entropy or None), both (B, T) float32."""
    z = logits.astype(mx.float32) / temperature.astype(mx.float32)[:, None, None]
    lse = mx.logsumexp(z, axis=-1)  # (B, T)
    logp = mx.take_along_axis(z, targets[..., None], axis=-1).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    probs = mx.exp(z - lse[..., None])
    entropy = lse - mx.sum(probs * z, axis=-1)  # H = -sum p log p = lse - sum p z
    return logp, entropy


def forward_logprobs(
    model: nn.Module,
    input_ids: mx.array,
    targets: mx.array,
    temperature: mx.array,
    *,
    with_entropy: bool = True,
) -> tuple[mx.array, mx.array | None]:
    """Run the model on (B, T) right-padded ids and score each next token."""
    return token_logprobs(model(input_ids), targets, temperature, with_entropy=with_entropy)
