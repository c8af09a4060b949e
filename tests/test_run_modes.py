"""`paraloop run` in its other modes, end to end on the tiny model: async generation keeping stale rollouts with
capped importance weights, and full-weight training (no LoRA)."""

import numpy as np

from paraloop.checkpoint import read_checkpoint
from support.runs import read_metrics, run_to_end


def test_async_with_stale_policy_cap_trains_on_stale_rollouts_with_capped_weights(tiny_model_path, tmp_path):
    # max_staleness 0: every rollout generated while the learner stepped is stale; "cap" keeps it, capped at 1.5
    run_dir = tmp_path / "run"
    done = run_to_end(
        tiny_model_path,
        run_dir,
        "--steps",
        "8",
        "--mode",
        "async",
        "--max-staleness",
        "0",
        "--set",
        "rl_training.stale_policy=cap",
        "--set",
        "rl_training.importance_cap=1.5",
        "--no-plot",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(r["dropped_stale"] == 0 and r["sequences"] == 16 for r in rows), "cap keeps every stale group"
    weights = [r["importance_weight_mean"] for r in rows]
    assert all(0 < w <= 1.5 for w in weights), weights
    # rollouts a version or more behind: the learner's policy differs from the one that sampled them
    assert any(abs(w - 1.0) > 1e-3 for w in weights[1:]), weights


def test_a_full_weight_run_trains_every_weight_and_checkpoints_them(tiny_model_path, tmp_path):
    import mlx.core as mx
    import mlx_lm
    from mlx.utils import tree_flatten

    run_dir = tmp_path / "run"
    done = run_to_end(
        tiny_model_path,
        run_dir,
        "--steps",
        "3",
        "--learning-rate",
        "1e-4",
        "--no-plot",
        "--set",
        "rl_training.train_mode=full",
        "--set",
        "rl_training.temperature=1.0",
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = read_metrics(run_dir)
    assert [r["version"] for r in rows] == [1, 2, 3] and not any(r["skipped"] for r in rows)
    assert not (run_dir / "checkpoints" / "initial_adapter").exists(), "no adapter to start from"

    final = read_checkpoint(run_dir)
    assert final.step == 3 and final.adapter_config == {"fine_tune_type": "full"}
    base, _ = mlx_lm.load(str(tiny_model_path))
    weights = dict(tree_flatten(base.parameters()))
    assert set(final.adapter) <= set(weights) and len(final.adapter) > len(weights) // 2, "the weights, not LoRA"
    moved = [k for k, v in final.adapter.items() if not np.array_equal(np.array(v), np.array(weights[k]))]
    assert len(moved) > len(final.adapter) // 2, "training moved the weights"

    # the step directory loads as mlx-lm's full fine-tune: base + these weights
    tuned, _ = mlx_lm.load(str(tiny_model_path), adapter_path=str(run_dir / "checkpoints" / "step_000003"))
    tuned_weights = dict(tree_flatten(tuned.parameters()))
    for k in moved[:5]:
        assert mx.array_equal(tuned_weights[k], final.adapter[k]).item(), k
