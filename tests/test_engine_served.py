"""The engine's index of served policy completions (engine/served.py): Atropos groups fetched back get the adapter
version that generated them, and their kept sets; staleness then applies to them in both modes."""

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import anyio
import msgspec
import pytest
import support

from paraloop.config import EngineConfig, LoraConfig, RLTrainingConfig
from paraloop.engine import Engine
from paraloop.engine.served import ServedIndex, trained_segments
from paraloop.learn.mismatch import row_versions, staleness_metrics
from paraloop.lora import AdapterSlots, adapter_arrays, adapter_config, attach_lora
from paraloop.messages import GenerateRequest, RolloutBatch, SamplingParams, ScoredGroup
from paraloop.model import load_model
from paraloop.run.buffer import too_stale


def test_rows_find_their_version_and_kept_sets_by_token_ids():
    index = ServedIndex(8)
    index.record([1, 2, 3], [10, 11, 12], [4, 4, 5], [0, 0, 0], stopped=False)
    index.record([1, 2, 3], [20, 21, 2], [6, 6, 6], [3, 5, 1], stopped=True)  # ended on a stop token (2)
    group, known = index.annotate(support.group(prompt=[1, 2, 3], completions=[[10, 11, 12], [20, 21, 2]]))
    assert known == 2 and group.versions == [4, 6]
    assert group.sampling_kept == [[0, 0, 0, 0, 0, 0], [0, 0, 0, 3, 5, 1]]
    dropped_eos = support.group(prompt=[1, 2, 3], completions=[[20, 21]])  # the environment dropped the EOS
    trimmed, known = index.annotate(dropped_eos)
    assert known == 1 and trimmed.versions == [6] and trimmed.sampling_kept == [[0, 0, 0, 3, 5]]


def test_a_group_with_an_unknown_row_gets_no_guessed_versions():
    index = ServedIndex(8)
    index.record([1], [10], [3], [0], stopped=False)
    group, known = index.annotate(support.group(prompt=[1], completions=[[10], [99]]))
    assert known == 1 and group.versions is None
    given = support.group(prompt=[1], completions=[[10]], versions=[7])
    assert index.annotate(given) == (given, 1)  # versions the group already carries win


def test_multi_turn_rows_take_the_oldest_version_of_their_turns():
    index = ServedIndex(8)
    index.record([1, 2], [10, 11], [3, 3], [0, 0], stopped=False)  # turn 1
    index.record([1, 2, 10, 11, 50, 51], [12, 13], [5, 5], [0, 0], stopped=False)  # turn 2 after the env's ids
    row = [1, 2, 10, 11, 50, 51, 12, 13]
    mask = [-100, -100, 10, 11, -100, -100, 12, 13]
    assert trained_segments(mask) == [(2, 4), (6, 8)]
    group, known = index.annotate(ScoredGroup(tokens=[row], masks=[mask], scores=[1.0]))
    assert known == 1 and group.versions == [3]


def test_the_index_is_bounded_and_forgets_the_oldest_first():
    index = ServedIndex(3)
    for i in range(5):
        index.record([1], [100 + i], [i], [0], stopped=False)
    assert len(index) == 3
    assert index.annotate(support.group(prompt=[1], completions=[[100]]))[1] == 0  # forgotten
    assert index.annotate(support.group(prompt=[1], completions=[[104]]))[0].versions == [4]
    with pytest.raises(ValueError):
        ServedIndex(0)


def test_staleness_applies_to_atropos_rollouts_in_both_modes():
    atropos = {"api_url": "http://localhost:8001"}
    assert RLTrainingConfig(atropos=atropos).staleness_applies  # sync mode too: environments generate ahead
    assert RLTrainingConfig(atropos=atropos, mode="async").staleness_applies
    assert RLTrainingConfig(mode="async").staleness_applies and not RLTrainingConfig().staleness_applies
    index = ServedIndex(4)
    index.record([1], [10], [2], [0], stopped=False)
    group, _ = index.annotate(support.group(prompt=[1], completions=[[10]]))
    assert too_stale(group, 4, 1) and not too_stale(group, 3, 1)
    assert not too_stale(support.group(prompt=[1], completions=[[10]]), 9, 1)  # unknown version: never stale
    batch = RolloutBatch(groups=[group, support.group(prompt=[1], completions=[[11]])], source="atropos")
    assert staleness_metrics(row_versions(batch), 5) == {
        "staleness_mean": 3.0,
        "staleness_max": 3.0,
        "version_known_fraction": 0.5,
    }


def test_the_engine_records_policy_completions_with_the_version_that_served_them(tiny_model_path):
    """Served by the engine before and after an adapter swap, fetched back as Atropos would hand them over: each
    row gets its version; base-model completions are not recorded (they train nothing)."""
    model, tokenizer, _, _ = load_model(tiny_model_path)
    cfg = adapter_config(LoraConfig(rank=4, num_layers=2, dropout=0.0), model)
    attach_lora(model, cfg, seed=0)
    slots = AdapterSlots(model)
    engine = Engine(model, tokenizer, config=EngineConfig(), batch_size=8, adapter=slots)
    engine.served = ServedIndex(64)
    prompt = tokenizer.encode("The capital of France is")
    params = SamplingParams(temperature=1.0, max_tokens=6, top_k=5, seed=3)

    async def main():
        async with anyio.create_task_group() as tg:
            await tg.start(engine.run)
            with anyio.fail_after(60):
                first = await engine.complete(GenerateRequest(request_id="a", prompt_tokens=prompt, n=2, params=params))
                await engine.swap_adapter(adapter_arrays(model), 1)
                second = await engine.complete(
                    GenerateRequest(
                        request_id="b", prompt_tokens=prompt, n=2, params=msgspec.structs.replace(params, seed=4)
                    )
                )
                base = await engine.complete(
                    GenerateRequest(request_id="c", prompt_tokens=prompt, n=1, params=params, adapter="base")
                )
            tg.cancel_scope.cancel()
        return first, second, base

    first, second, base = anyio.run(main, backend="asyncio")
    assert engine.served.recorded == 4  # the base-model row is not recorded
    assert len({tuple(c.tokens) for c in first + second}) == 4  # (identical ids: the latest serve would win)
    group, known = engine.served.annotate(support.group(prompt=prompt, completions=[c.tokens for c in first + second]))
    assert known == 4 and group.versions == [0, 0, 1, 1]
    assert [row[len(prompt) :] for row in group.sampling_kept] == [c.kept for c in first + second]
    assert all(1 <= k <= 5 for c in first for k in c.kept)


def test_the_atropos_client_annotates_fetched_groups_and_counts_them():
    from paraloop.atropos.client import AtroposClient
    from paraloop.config import AtroposConfig

    index = ServedIndex(4)
    index.record([1], [10], [2], [0], stopped=False)
    client = AtroposClient(
        AtroposConfig(api_url="http://localhost:1"),
        batch_size=2,
        token_budget=64,
        total_steps=1,
        checkpoint_dir="/tmp",
        served=index,
    )
    groups = client._annotate([support.group(prompt=[1], completions=[[c]]) for c in (10, 11)])
    assert [g.versions for g in groups] == [[2], None]
    assert client.status()["sequences_version_known"] == 1
