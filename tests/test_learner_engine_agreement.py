"""The learner's log-probs of tokens the engine sampled equal the engine's recorded log-probs at the same adapter
version: this is what makes the ratio pi / pi_old mean what it says (ratio 1 on the first epoch of fresh rollouts).
On the tiny 4-bit model, once per compute path (support/compute_paths.py)."""

import anyio
import mlx.core as mx
import numpy as np
import pytest

from paraloop.config import EngineConfig, LoraConfig, RLTrainingConfig
from paraloop.engine import Engine
from paraloop.envs.mock import scored_group
from paraloop.learn.batch import collate
from paraloop.learn.logprobs import forward_logprobs
from paraloop.learn.trainer import Trainer
from paraloop.lora import adapter_arrays, adapter_config, attach_lora
from paraloop.messages import GenerateRequest, RolloutBatch, SamplingParams
from paraloop.model import load_model, twin
from support.compute_paths import PARITY_TOL, assert_within


def engine_rollouts(engine_model, tokenizer, requests):
    async def main():
        engine = Engine(engine_model, tokenizer, config=EngineConfig(), batch_size=16, adapter=None)
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            results = await engine.complete_many(requests)
            tg.cancel_scope.cancel()
        return results

    return anyio.run(main, backend="asyncio")


def learner_engine_gap(model_path, compute: str, temperature: float) -> float:
    """max |learner log-prob - engine-recorded log-prob| over 3 prompts x 3 rows x 12 sampled tokens, with a
    non-zero adapter."""
    model, tokenizer, _, _ = load_model(model_path, compute=compute)
    cfg = adapter_config(LoraConfig(rank=4, num_layers=-1, dropout=0.0, keys="all"), model)
    attach_lora(model, cfg, seed=0)
    # A non-zero adapter, so the check covers the LoRA path too.
    for name, array in adapter_arrays(model).items():
        if name.endswith("lora_b"):
            owner = dict(model.named_modules())[name.rsplit(".", 1)[0]]
            owner.lora_b = mx.random.normal(array.shape, key=mx.random.key(len(name))) * 0.05
    mx.eval(model.parameters())
    engine_model = twin(model)
    engine_model.eval()

    prompts = [tokenizer.encode(text) for text in ("The river runs", "Count to three:", "A short story about")]
    requests = [
        GenerateRequest(
            request_id=f"r{i}",
            prompt_tokens=p,
            n=3,
            params=SamplingParams(temperature=temperature, max_tokens=12, seed=i, ignore_eos=True),
        )
        for i, p in enumerate(prompts)
    ]
    results = engine_rollouts(engine_model, tokenizer, requests)
    groups = [
        scored_group(r.prompt_tokens, c, [float(j) for j in range(len(c))], temperature=temperature)
        for r, c in zip(requests, results, strict=True)
    ]
    batch = collate(RolloutBatch(groups=groups, source="mock"))

    # The learner's own forward (its twin, eval mode), exactly as the trainer scores tokens.
    trainer = Trainer(model, config=RLTrainingConfig(kl_beta=0.0), adapter_config=cfg)
    trainer.model.eval()
    logp, _ = forward_logprobs(
        trainer.model,
        mx.array(batch.input_ids),
        mx.array(batch.targets),
        mx.array(batch.temperature),
        with_entropy=False,
    )
    logp = np.array(logp)
    recorded = batch.inference_logprobs
    mask = batch.mask
    assert mask.sum() == 3 * 3 * 12
    return float(np.abs(logp[mask] - recorded[mask]).max())


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_learner_logprobs_match_engine_recorded_logprobs(tiny_q4_model_path, compute, temperature):
    gap = learner_engine_gap(tiny_q4_model_path, compute, temperature)
    assert_within(f"learner vs engine ({compute})", gap, PARITY_TOL[compute])


def test_a_bfloat16_model_on_quantized_kernels_agrees_to_bfloat16_precision(tiny_q4_bf16_model_path):
    """The Mac default: a bfloat16 4-bit model computing in bfloat16. The engine's logits reach float32 before the
    log-softmax, as the learner's do, so the gap is the bfloat16 rounding of two differently grouped forwards."""
    gap = learner_engine_gap(tiny_q4_bf16_model_path, "quantized", 1.0)
    assert_within("learner vs engine (bfloat16)", gap, PARITY_TOL["quantized-bfloat16"])
