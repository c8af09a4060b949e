"""What `paraloop run` builds before its actors start: the model twins and trainer, and the rollout source.

`build_models` runs on the learner's MLX thread (the arrays it makes belong to that thread's stream). Problems
with what the user asked for (missing model, untrainable model, bad checkpoint) raise SetupError, which
`paraloop run` prints as one line and exits 2.

Its imports of MLX, mlx-lm and the trainer are inside the functions (and for types only, under TYPE_CHECKING):
the command line imports this module for SetupError before anything loads (run/preflight.py, --dry-run).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from paraloop.config import Settings

if TYPE_CHECKING:
    import mlx.nn as nn
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    from paraloop.checkpoint import Checkpoint
    from paraloop.engine import Engine
    from paraloop.learn.trainer import Trainer
    from paraloop.messages import RolloutBatch
    from paraloop.run.journal import Replay

log = logging.getLogger("paraloop.run")


class SetupError(RuntimeError):
    """A problem with what the user asked for (missing model, untrainable model, bad checkpoint)."""


@dataclass
class Models:
    """The model loaded once: the learner's twin (trained by `trainer`) and the engine's, sharing base weights."""

    learner_model: nn.Module
    engine_model: nn.Module
    tokenizer: TokenizerWrapper
    adapter_config: dict[str, Any] | None
    trainer: Trainer
    resumed: Checkpoint | None  # the checkpoint resumed from (paraloop's or the predecessor's)


def build_models(settings: Settings, *, adapter_layout: Callable[[], dict | None] | None = None) -> Models:
    """Load the model once; the learner and the engine get twins sharing its base weights. Runs on the learner's
    MLX thread. `adapter_layout`: a follower rank of a distributed run takes its adapter layout from rank 0 (called
    once the model is loaded, so the ranks load in parallel) instead of reading resume or lora_path itself."""
    import mlx.core as mx

    from paraloop import checkpoint
    from paraloop.learn.trainer import Trainer
    from paraloop.lora import adapter_arrays, adapter_config, attach_lora
    from paraloop.model import ModelNotFoundError, load_model, twin
    from paraloop.predecessor import apply_adapter_assuming, assumed_adapter_config, read_for_resume

    rl = settings.rl_training
    if not settings.model.base_path:
        raise SetupError("model.base_path is not set (TOML [model] base_path, or --model-path)")
    try:
        model, tokenizer, _, quantized = load_model(
            settings.model.base_path,
            compute=settings.model.compute,
            trust_remote_code=settings.model.trust_remote_code,
            revision=settings.model.revision,
        )
    except ModelNotFoundError as e:
        raise SetupError(str(e)) from None
    except (FileNotFoundError, ValueError) as e:
        raise SetupError(f"cannot load model {settings.model.base_path}: {e}") from None

    resumed = None
    if settings.checkpoint.resume and adapter_layout is None:
        try:
            resumed = read_for_resume(settings.checkpoint.resume)  # paraloop's, or the predecessor's step_N
        except (FileNotFoundError, checkpoint.CheckpointError) as e:
            raise SetupError(f"cannot resume: {e}") from None

    cfg = None
    if rl.train_mode == "lora":
        if adapter_layout is not None:
            cfg = adapter_layout()
            attach_lora(model, cfg, seed=rl.seed)
        elif resumed is not None:
            if resumed.adapter_config.get("fine_tune_type", "lora") != "lora":
                raise SetupError(f"{resumed.path} is a full-weight checkpoint: resume it with train_mode = 'full'")
            try:
                cfg = resumed.adapter_config or assumed_adapter_config(resumed.path, resumed.adapter, model, rl.lora)
            except ValueError as e:
                raise SetupError(f"cannot resume from {resumed.path}: {e}") from None
            attach_lora(model, cfg, seed=rl.seed)
        elif settings.model.lora_path:
            try:
                cfg = apply_adapter_assuming(model, settings.model.lora_path, seed=rl.seed, assume=rl.lora)
            except (FileNotFoundError, ValueError) as e:
                raise SetupError(str(e)) from None
        elif settings.model.auto_init_lora:
            cfg = adapter_config(rl.lora, model)
            attach_lora(model, cfg, seed=rl.seed)
        else:
            raise SetupError(
                "nothing to train: set model.auto_init_lora = true or model.lora_path"
                + ("" if quantized else ", or rl_training.train_mode = 'full'")
            )
        mx.eval(adapter_arrays(model))
    elif quantized:
        raise SetupError(
            "train_mode = 'full' needs a non-quantized model: quantized weights have no gradient "
            "(QuantizedMatmul has no vjp for them); use train_mode = 'lora' on a quantized model"
        )

    engine_model = twin(model)  # same base arrays, own LoRA slots
    engine_model.eval()
    model.train()
    trainer = Trainer(model, config=rl, adapter_config=cfg, version=0, distill=settings.distill)
    if resumed is not None and resumed.trainer_state.get("predecessor"):
        # The predecessor saved no optimizer state: continue at its step number (the learning-rate schedule too)
        # with fresh AdamW moments, and the initial adapter as the KL reference.
        state = trainer.state()
        state["trainer"].update(step_count=resumed.step, version=resumed.step)
        trainer.load_state(state, resumed.adapter, None)
        log.warning(
            "%s is a predecessor checkpoint (adapter only): resuming at step %d with a fresh optimizer "
            "(it saved no optimizer state)",
            resumed.path,
            resumed.step,
        )
    elif resumed is not None:
        if "trainer" not in resumed.trainer_state or resumed.optimizer_state is None:
            raise SetupError(
                f"cannot resume from {resumed.path}: it has no trainer/optimizer state (an adapter-only "
                "checkpoint: start a new run from it with model.lora_path instead)"
            )
        trainer.load_state(
            {"optimizer": resumed.optimizer_state, "trainer": resumed.trainer_state["trainer"]},
            resumed.adapter,
            resumed.reference,
        )
    return Models(model, engine_model, tokenizer, cfg, trainer, resumed)


def make_source(
    settings: Settings,
    engine: Engine,
    tokenizer: TokenizerWrapper,
    resumed: Checkpoint | None,
    *,
    share: tuple[int, int] = (0, 1),
    replay: list[Replay] = (),
    vocab: int | None = None,
) -> tuple[AsyncIterator[RolloutBatch], Callable[[], dict[str, Any]]]:
    """The rollout source: (async iterator of RolloutBatch, status() -> dict). Each batch carries the source's
    position (RolloutBatch.source_state), which checkpoints keep for an exact resume. `share` (rank, size): the
    mock environment of one rank of a distributed run generates its part of each batch. `replay`: the journaled
    batches a resumed Atropos run trains first (run/journal.py); `vocab`: the model's vocabulary size (an Atropos
    group with a token id outside it is rejected)."""
    rl = settings.rl_training
    if rl.rollout_source == "sessions":
        raise SetupError("the sessions source is the run's own HTTP routes (run/wiring.build_parts), not made here")
    if rl.atropos.api_url:
        from paraloop.atropos.client import AtroposClient
        from paraloop.engine.served import ServedIndex

        if rl.atropos.served_index and engine is not None:  # the policy completions served, found again by ids
            engine.served = ServedIndex(rl.atropos.served_index)

        client = AtroposClient(
            rl.atropos,
            batch_size=rl.batch_size,
            token_budget=rl.token_budget,
            total_steps=rl.total_steps,
            checkpoint_dir=settings.checkpoint.dir,
            starting_step=atropos_step(resumed, replay),
            checkpoint_interval=settings.checkpoint.interval,
            vocab_size=vocab,
            served=getattr(engine, "served", None),
        )
        return client.batches(), client.status
    from paraloop.envs.mock import MockEnvironment

    env = MockEnvironment(
        engine,
        tokenizer,
        config=rl.mock,
        temperature=rl.temperature,
        max_tokens=rl.mock.max_tokens or rl.max_tokens,
        seed=rl.seed,
        share=share,
    )
    if resumed is not None and resumed.trainer_state.get("source_state"):
        env.load_state(resumed.trainer_state["source_state"])
    return env.batches(rl.batch_size), env.status


def atropos_step(resumed: Checkpoint | None, replay: list[Replay]) -> int:
    """Where a resumed run's Atropos client counts from: one Atropos step per batch fetched, so the newest batch
    fetched before the restart (its checkpoint's, or a journaled one it had not trained yet)."""
    if resumed is None:
        return 0
    steps = [resumed.step, (resumed.trainer_state.get("source_state") or {}).get("atropos_step", 0)]
    steps += [(r.batch.source_state or {}).get("atropos_step", 0) for r in replay]
    return max(s for s in steps if isinstance(s, int))
