"""The engine actor on the tiny model, driven in-process: a fresh engine, running it around a test body, requests,
and what one full forward pass says the log-probs are (the reference the engine and the server are checked against)."""

from collections.abc import Awaitable, Callable
from typing import Any

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import anyio
import mlx.core as mx
import mlx.nn as nn
import numpy as np

from paraloop.config import EngineConfig, LoraConfig
from paraloop.engine import Engine
from paraloop.lora import AdapterSlots, adapter_arrays, adapter_config, attach_lora
from paraloop.messages import GenerateRequest, SamplingParams
from paraloop.model import load_model


def make_engine(
    path, *, compute: str = "auto", lora: bool = True, wrap=None, eos_ids=None, **kwargs
) -> tuple[Engine, nn.Module]:
    """An engine on a fresh load of the tiny model (with a rank-4 all-linear LoRA unless lora=False).
    Returns (engine, the model with LoRA); `wrap` wraps the model the engine serves; `eos_ids` replaces the
    tokenizer's EOS ids."""
    model, tokenizer, _, _ = load_model(path, compute=compute)
    if eos_ids is not None:
        tokenizer.eos_token_ids = eos_ids
    slots = None
    if lora:
        attach_lora(model, adapter_config(LoraConfig(rank=4, keys="all", num_layers=-1), model), seed=0)
        slots = AdapterSlots(model)
    served = wrap(model) if wrap else model
    engine = Engine(served, tokenizer, config=EngineConfig(max_n=8, max_tokens_limit=512), adapter=slots, **kwargs)
    return engine, model


def serve(engine: Engine, body: Callable[[Engine], Awaitable[Any]], *, deadline: float = 120) -> Any:
    """Run the engine actor, await body(engine) under a deadline, then stop the engine."""

    async def main() -> Any:
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            with anyio.fail_after(deadline):
                result = await body(engine)
            tg.cancel_scope.cancel()
        return result

    return anyio.run(main)


def request(prompt: list[int], *, n: int = 1, rid: str = "r", **params) -> GenerateRequest:
    return GenerateRequest(request_id=rid, prompt_tokens=prompt, n=n, params=SamplingParams(**params))


def reference_logprobs(
    model: nn.Module, prompt: list[int], completion: list[int], temperature: float, kept: list[int] | None = None
) -> list[float]:
    """log_softmax(logits / T)[token] of each completion token from one full forward over prompt + completion;
    renormalised over the `kept[j]` most likely tokens where kept[j] > 0 (a top-k / top-p / min-p row)."""
    logits = model(mx.array(prompt + completion)[None])[0, len(prompt) - 1 : -1].astype(mx.float32)
    scaled = np.array(logits / (temperature or 1.0), np.float64)
    out = []
    for j, token in enumerate(completion):
        z = scaled[j]
        k = kept[j] if kept else 0
        support = np.sort(z)[::-1][:k] if k > 0 else z
        out.append(float(z[token] - support.max() - np.log(np.exp(support - support.max()).sum())))
    return out


def prompts(tokenizer) -> list[list[int]]:
    texts = [
        "The capital of France is",
        "12 + 7 = 19. 30 + 4 =",
        "Once",
        "Water freezes at zero degrees and boils at one",
    ]
    return [tokenizer.encode(t) for t in texts]


class ForwardLog(nn.Module):
    """The served model, recording the shape of every forward pass."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.shapes: list[tuple[int, ...]] = []

    @property
    def layers(self) -> list:
        return self.inner.layers

    @property
    def args(self) -> Any:
        return self.inner.args

    def __call__(self, inputs: mx.array, cache: Any = None) -> mx.array:
        self.shapes.append(tuple(inputs.shape))
        return self.inner(inputs, cache=cache)


def changed_adapter(model: nn.Module, seed: int) -> dict[str, mx.array]:
    """Arrays like the model's adapter, with a non-zero B so outputs change."""
    key = mx.random.key(seed)
    arrays = {
        k: 0.2 * mx.random.normal(v.shape, key=mx.random.split(key, 2)[i % 2])
        for i, (k, v) in enumerate(adapter_arrays(model).items())
    }
    mx.eval(arrays)
    return arrays


def greedy_logprobs(model, prompt: list[int], tokens: list[int]) -> list[float]:
    """log-softmax of the model's logits at each generated position, for the tokens given (temperature 1)."""
    import mlx.core as mx

    logits = model(mx.array(prompt + tokens[:-1])[None])[0].astype(mx.float32)[len(prompt) - 1 :]
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return logp[mx.arange(len(tokens)), mx.array(tokens)].tolist()
