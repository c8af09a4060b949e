"""The Trainer on the tiny model: its config, a fresh trainer, random batches, and the loss options the ring
trainer check runs (tests/test_distributed_trainer.py, and each rank of tests/scripts/distributed_trainer_script.py)."""

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import mlx.core as mx
import numpy as np
import pytest

from paraloop.config import LoraConfig, RLTrainingConfig
from paraloop.learn import Trainer
from paraloop.learn.batch import collate
from paraloop.learn.logprobs import forward_logprobs
from paraloop.lora import adapter_config
from paraloop.messages import RolloutBatch, ScoredGroup
from paraloop.model import load_model, twin


@pytest.fixture(scope="module")
def base(tiny_model_path):
    """The float32 tiny model, loaded once per module (conftest.py re-exports this fixture)."""
    model, _, _, _ = load_model(tiny_model_path)
    return model


def make_config(**overrides) -> RLTrainingConfig:
    lora = {"rank": 4, "num_layers": 2, "dropout": 0.0, **overrides.pop("lora", {})}
    return RLTrainingConfig(**{"learning_rate": 1e-3, **overrides}, lora=LoraConfig(**lora))


def make_trainer(base, **overrides) -> Trainer:
    config = make_config(**overrides)
    learner = twin(base)
    return Trainer(learner, config=config, adapter_config=adapter_config(config.lora, learner))


def random_batch(seed: int, *, groups: int = 2, size: int = 4, inference: bool = False) -> RolloutBatch:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(groups):
        tokens, masks, lps = [], [], []
        for _ in range(size):
            prompt, new = int(rng.integers(3, 7)), int(rng.integers(2, 14))
            seq = rng.integers(3, 1000, size=prompt + new).tolist()
            tokens.append(seq)
            masks.append([-100] * prompt + seq[prompt:])
            lps.append([1.0] * prompt + rng.uniform(-8.0, -6.0, size=new).tolist())
        out.append(
            ScoredGroup(
                tokens=tokens,
                masks=masks,
                scores=rng.random(size).tolist(),
                inference_logprobs=lps if inference else None,
            )
        )
    return RolloutBatch(groups=out, source="test")


def with_logprobs(batch: RolloutBatch, trainer: Trainer, *, field: str, shift: float = 0.0) -> RolloutBatch:
    """The batch with `field` set to the learner's current eval-mode log-probs (+ shift) at trained positions."""
    groups = []
    for group in batch.groups:
        tb = collate(RolloutBatch(groups=[group], source="test"))
        logp, _ = forward_logprobs(
            trainer.model, mx.array(tb.input_ids), mx.array(tb.targets), mx.array(tb.temperature)
        )
        logp = np.array(logp) + shift
        rows = [[1.0] + logp[i, : len(t) - 1].tolist() for i, t in enumerate(group.tokens)]
        groups.append(ScoredGroup(**{**{f: getattr(group, f) for f in group.__struct_fields__}, field: rows}))
    return RolloutBatch(groups=groups, source="test")


CASES = {
    "token-mean": {},
    "seq-mean-token-mean": {"loss_aggregation": "seq-mean-token-mean"},
    "dr-grpo": {"loss_aggregation": "seq-mean-token-sum-norm", "scale_rewards": "none"},
    "kl-batch-scale-epochs": {
        "kl_beta": 0.1,
        "kl_estimator": "k3",
        "ref_ema": 0.9,
        "scale_rewards": "batch",
        "update_epochs": 2,
        "entropy_weight": 0.01,
    },
    "reinforce-clip-high": {"algorithm": "reinforce", "max_grad_norm": 0.05},
    # Rows carry engine log-probs ~1 nat from the model's: the mask rejects some tokens on each rank, and the
    # recomputed denominators count every rank's rejections.
    "token-mask-seq-mean": {
        "importance_cap": 1.5,
        "importance_mode": "mask",
        "loss_aggregation": "seq-mean-token-mean",
        "inference": True,
    },
}
