"""Many adapters on one base, in one decode batch: each row gives exactly what a single-adapter engine gives it,
whatever else shares the batch and whatever joins, leaves, loads or unloads meanwhile.

On the tiny float32 model, both decode steps (`cpu`: NumPy sampling; `mlx-lm`: its lazy, pipelined step).
"""

import json
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import anyio
import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers
from mlx_lm.utils import save_config

from support import engines
from support.adapter_files import random_adapter
from support.compute_paths import ADAPTER_ROWS_TOL, LOGPROB_TOL, assert_within, max_gap
from paraloop.config import EngineConfig, LoraConfig
from paraloop.engine import Engine, EngineBusy
from paraloop.engine.adapters import AdapterError, AdapterNotFound
from paraloop.lora import AdapterSlots, apply_adapter, read_for_serving
from paraloop.messages import Completion, GenerateRequest, SamplingParams
from paraloop.model import load_model

DECODES = ("cpu", "mlx-lm")
TEXTS = [
    "The capital of France is",
    "12 + 7 = 19. 30 + 4 =",
    "Once",
    "Water freezes at zero degrees and boils",
    "A B C D E",
    "Hello",
    "It was the best of times",
    "def f(x):",
    "1 2 3",
    "Why is the sky",
    "Dear Sir,",
    "Roses are red",
]
# Named adapters beside the policy: of another rank (8) and of other layers (q/v only; the last block only).
SHAPES = {
    "all4": LoraConfig(rank=4, keys="all", num_layers=-1, scale=2.0),
    "all8": LoraConfig(rank=8, keys="all", num_layers=-1, scale=1.5),
    "qv4": LoraConfig(rank=4, keys=["self_attn.q_proj", "self_attn.v_proj"], num_layers=-1, scale=3.0),
    "last2": LoraConfig(rank=2, keys="all", num_layers=1, scale=4.0),
}
POLICY = LoraConfig(rank=4, keys="all", num_layers=-1, scale=2.0)


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    out = {
        name: random_adapter(root / name, tiny_model_path, cfg, seed=i + 1)
        for i, (name, cfg) in enumerate(SHAPES.items())
    }
    out["policy"] = random_adapter(root / "policy", tiny_model_path, POLICY, seed=99)
    return out


def make_engine(
    model_path: Path, policy: Path | None, *, decode: str = "cpu", compute: str = "auto", **kwargs: Any
) -> Engine:
    """An engine whose policy is the adapter at `policy` (None: the bare base model)."""
    model, tokenizer, _, _ = load_model(model_path, compute=compute)
    slots = None
    if policy is not None:
        apply_adapter(model, policy)
        slots = AdapterSlots(model)
    config = EngineConfig(decode=decode, prefix_cache_mb=kwargs.pop("prefix_cache_mb", 0))
    return Engine(model, tokenizer, config=config, adapter=slots, **kwargs)


serve = partial(engines.serve, deadline=60)


def ask(tokens: list[int], adapter: str | None, *, rid: str = "r", **params: Any) -> GenerateRequest:
    params = {"temperature": 0, "max_tokens": 10, "ignore_eos": True, **params}
    return GenerateRequest(request_id=rid, prompt_tokens=tokens, adapter=adapter, params=SamplingParams(**params))


def mixed_specs(tokenizer) -> list[tuple[str | None, dict[str, Any]]]:
    """(adapter, sampling) per request: every adapter once greedy and once seeded-sampled, interleaved."""
    names = [*SHAPES, "base", "policy"]
    greedy = [(name, {}) for name in names]
    seeded = [(name, {"temperature": 1.0, "top_p": 0.9, "seed": 7 + i}) for i, name in enumerate(names)]
    return [spec for pair in zip(greedy, seeded, strict=True) for spec in pair]


@pytest.mark.parametrize(
    "decode, model, compute",
    [
        ("cpu", "tiny_model_path", "auto"),
        ("mlx-lm", "tiny_model_path", "auto"),
        ("cpu", "tiny_q4_model_path", "quantized"),  # MLX's quantized kernels under the LoRA terms (Metal, CUDA)
    ],
)
def test_a_batch_mixing_adapters_gives_each_row_exactly_what_a_single_adapter_engine_gives_it(
    request, adapters, decode, model, compute
):
    """Four named adapters (two ranks, three layer sets), the policy and the base model in one batch: every row's
    tokens equal those of an engine serving only that adapter (as its policy, or no adapter at all for the base),
    fed the same batch of prompts, and its log-probs agree within ADAPTER_ROWS_TOL.

    Not bitwise: a mixed batch adds each row's LoRA term through gathered per-row matrices, a single-adapter engine
    through one plain matmul, and BLAS kernels group those sums differently (equal on OpenBLAS's Zen kernel, last
    float32 bits apart on Haswell). The seeded rows' tokens stay equal: a token changes only if a uniform draw falls
    within ~1e-6 of a boundary of the cumulative distribution."""
    model_path = request.getfixturevalue(model)
    engine = make_engine(model_path, adapters["policy"], decode=decode, compute=compute)
    tokens = [engine.tokenizer.encode(t) for t in TEXTS]  # distinct prompts: no prefill is shared
    specs = mixed_specs(engine.tokenizer)

    async def mixed(engine: Engine) -> list[Completion]:
        for name in SHAPES:
            await engine.adapters.load(name, adapters[name])
        out = await engine.complete_many([ask(tokens[i], name, rid=str(i), **p) for i, (name, p) in enumerate(specs)])
        return [rows[0] for rows in out]

    got = serve(engine, mixed)
    worst = 0.0
    for name in [*SHAPES, "base", "policy"]:
        alone = make_engine(model_path, None if name == "base" else adapters[name], decode=decode, compute=compute)

        async def single(engine: Engine) -> list[Completion]:
            out = await engine.complete_many([ask(tokens[i], None, rid=str(i), **p) for i, (_, p) in enumerate(specs)])
            return [rows[0] for rows in out]

        want = serve(alone, single)
        for i, (adapter, _) in enumerate(specs):
            if adapter == name:
                assert got[i].adapter == name
                assert got[i].tokens == want[i].tokens, (name, i)
                worst = max(worst, max_gap(got[i].logprobs, want[i].logprobs))
    assert_within("mixed-adapter row vs single-adapter engine", worst, ADAPTER_ROWS_TOL)
    assert len({tuple(c.tokens) for c in got}) > len(specs) // 2  # the adapters really differ


@pytest.mark.parametrize("decode", DECODES)
def test_rows_leave_and_join_a_mixed_batch_mid_decode_without_changing_the_others(tiny_model_path, adapters, decode):
    """A row of one adapter finishes while rows of others go on, and a row of a third adapter joins mid-decode:
    every row still gets its single-adapter tokens (greedy) and log-probs."""
    engine = make_engine(tiny_model_path, adapters["policy"], decode=decode)
    prompt_long, prompt_short, prompt_late = (engine.tokenizer.encode(t) for t in TEXTS[:3])

    async def body(engine: Engine) -> dict[str, Completion]:
        for name in ("all4", "qv4", "all8"):
            await engine.adapters.load(name, adapters[name])
        out: dict[str, Completion] = {}
        short_done = anyio.Event()

        async def long() -> None:
            rows: list[Any] = []
            async for event in engine.generate(ask(prompt_long, "all4", max_tokens=40)):
                rows.append(event)
                if len(rows) == 12:  # mid-decode, after the short row of another adapter has finished
                    assert short_done.is_set()
                    tg.start_soon(late)
            out["long"] = Completion(
                row=0,
                tokens=[e.token for e in rows],
                logprobs=[e.logprob for e in rows],
                versions=[e.version for e in rows],
                text="",
                finish_reason="length",
            )

        async def short() -> None:
            out["short"] = (await engine.complete(ask(prompt_short, "qv4", max_tokens=4)))[0]
            short_done.set()

        async def late() -> None:
            out["late"] = (await engine.complete(ask(prompt_late, "all8", max_tokens=8)))[0]

        async with anyio.create_task_group() as tg:
            tg.start_soon(long)
            tg.start_soon(short)
        return out

    got = serve(engine, body)
    for key, name, prompt, max_tokens in (
        ("long", "all4", prompt_long, 40),
        ("short", "qv4", prompt_short, 4),
        ("late", "all8", prompt_late, 8),
    ):
        alone = make_engine(tiny_model_path, adapters[name], decode=decode)
        want = serve(alone, lambda e, p=prompt, m=max_tokens: e.complete(ask(p, None, max_tokens=m)))[0]
        assert got[key].tokens == want.tokens, key
        assert_within(
            "mixed-adapter row vs single-adapter engine", max_gap(got[key].logprobs, want.logprobs), ADAPTER_ROWS_TOL
        )


def test_unloading_and_loading_while_rows_run_leaves_them_undisturbed(tiny_model_path, adapters):
    """Unloading an adapter takes its name away at once (new requests: AdapterNotFound) but its running row ends
    with its own tokens; the arrays go only then. Loading another one meanwhile changes nothing either."""
    engine = make_engine(tiny_model_path, adapters["policy"])
    prompt = engine.tokenizer.encode(TEXTS[0])

    async def body(engine: Engine) -> tuple[Completion, Completion]:
        await engine.adapters.load("all4", adapters["all4"])
        events: list[Any] = []
        async for event in engine.generate(ask(prompt, "all4", max_tokens=30)):
            events.append(event)
            if len(events) == 5:
                engine.adapters.unload("all4")
                with pytest.raises(AdapterNotFound):
                    await engine.complete(ask(prompt, "all4"))
                await engine.adapters.load("qv4", adapters["qv4"])
                assert engine.stats()["adapters_loaded"] == 1  # qv4; all4's arrays stay until its row ends
        await engine.complete(ask(prompt, "qv4", max_tokens=1))  # the inbox has passed the Uninstall by now
        assert engine._worker._positions == {3}  # noqa: SLF001
        got = Completion(
            row=0,
            tokens=[e.token for e in events],
            logprobs=[e.logprob for e in events],
            versions=[e.version for e in events],
            text="",
            finish_reason="length",
        )
        # The same name can be loaded again (another load: the prefix cache never mixes the two).
        await engine.adapters.load("all4", adapters["all4"])
        again = (await engine.complete(ask(prompt, "all4", max_tokens=30)))[0]
        return got, again

    got, again = serve(engine, body)
    want = serve(
        make_engine(tiny_model_path, adapters["all4"]), lambda e: e.complete(ask(prompt, None, max_tokens=30))
    )[0]
    assert got.tokens == want.tokens == again.tokens
    assert_within("mixed-adapter row vs single-adapter engine", max_gap(got.logprobs, want.logprobs), ADAPTER_ROWS_TOL)


def test_checkpoints_load_on_demand_are_bounded_and_evicted_least_recently_used(tiny_model_path, adapters, tmp_path):
    """Names a `find` function resolves (a run's `policy@step_N`) load when first requested; past max_loras the
    least recently used one no request holds goes; with every slot in use the request is refused (EngineBusy)."""
    steps = {}
    for i, name in enumerate(["all4", "qv4", "all8"], start=1):
        steps[f"step_{i:06d}"] = step = tmp_path / f"step_{i:06d}"
        shutil.copytree(adapters[name], step)
        (step / "trainer_state.json").write_text(json.dumps({"step": i, "version": 10 * i}))
    engine = make_engine(tiny_model_path, adapters["policy"], max_loras=2, find_adapter=steps.get)
    prompt = engine.tokenizer.encode(TEXTS[1])

    async def body(engine: Engine) -> None:
        with pytest.raises(AdapterNotFound):
            await engine.complete(ask(prompt, "policy@step_000009"))
        held = engine.generate(ask(prompt, "policy@step_000001", max_tokens=200))
        first = await anext(held)  # step 1 loaded, and held by a running request
        assert (first.adapter, first.version) == ("policy@step_000001", 10)  # the checkpoint's adapter version
        await engine.complete(ask(prompt, "policy@step_000002", max_tokens=2))
        await engine.complete(ask(prompt, "policy@step_000003", max_tokens=2))  # evicts step 2, not step 1
        assert [a.name for a in engine.adapters.loaded()] == ["policy@step_000001", "policy@step_000003"]
        other = engine.generate(ask(prompt, "policy@step_000003", max_tokens=200))
        await anext(other)
        with pytest.raises(EngineBusy):  # both slots hold adapters in use
            await engine.complete(ask(prompt, "policy@step_000002", max_tokens=2))
        await held.aclose()
        await other.aclose()
        got = (await engine.complete(ask(prompt, "policy@step_000002", max_tokens=6)))[0]  # room again
        assert got.adapter == "policy@step_000002"
        return got

    got = serve(engine, body)
    want = serve(make_engine(tiny_model_path, adapters["qv4"]), lambda e: e.complete(ask(prompt, None, max_tokens=6)))[
        0
    ]
    assert got.tokens == want.tokens


def test_the_prefix_cache_reuses_kv_only_under_the_adapter_that_made_it(tiny_model_path, adapters):
    engine = make_engine(tiny_model_path, adapters["policy"], prefix_cache_mb=64)
    prompt = engine.tokenizer.encode(TEXTS[3] * 3)

    async def body(engine: Engine) -> list[Completion]:
        await engine.adapters.load("all4", adapters["all4"])
        out = []
        for adapter, hits in (("all4", 0), ("base", 0), ("policy", 0), ("all4", 1), ("base", 2)):
            out.append((await engine.complete(ask(prompt, adapter)))[0])
            assert engine.stats()["prefix_cache_hits"] == hits, adapter
        return out

    got = serve(engine, body)
    assert got[0].tokens == got[3].tokens and got[1].tokens == got[4].tokens
    assert len({tuple(c.tokens) for c in got[:3]}) == 3


def write_mlx_lm_adapter(model_path: Path, out: Path) -> Path:
    """An adapter as `mlx_lm.lora` writes one: its own LoRA layers (default keys for the model type), the trainable
    parameters in adapters.safetensors, and its whole argument namespace in adapter_config.json."""
    model, _, _, _ = load_model(model_path)
    model.freeze()
    params = {"rank": 8, "dropout": 0.0, "scale": 20.0}
    linear_to_lora_layers(model, 2, params)
    mx.random.seed(5)
    weights = {k: mx.random.normal(v.shape) * 0.05 for k, v in tree_flatten(model.trainable_parameters())}
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), weights)
    save_config(
        {
            "model": str(model_path),
            "fine_tune_type": "lora",
            "num_layers": 2,
            "lora_parameters": params,
            "seed": 0,
            "iters": 10,
            "adapter_path": str(out),
        },
        out / "adapter_config.json",
    )
    return out


def test_an_adapter_trained_by_mlx_lm_is_served_as_mlx_lm_loads_it(tiny_model_path, tmp_path):
    from mlx_lm import load as mlx_lm_load

    path = write_mlx_lm_adapter(tiny_model_path, tmp_path / "mlx-lm-adapter")
    engine = make_engine(tiny_model_path, None)
    prompt = engine.tokenizer.encode(TEXTS[0])

    async def body(engine: Engine) -> Completion:
        await engine.adapters.load("trained", path)
        return (await engine.complete(ask(prompt, "trained", max_tokens=8)))[0]

    got = serve(engine, body)
    model, _ = mlx_lm_load(str(tiny_model_path), adapter_path=str(path))
    logits = model(mx.array(prompt + got.tokens)[None])[0, len(prompt) - 1 : -1].astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    assert got.tokens == mx.argmax(logprobs, axis=-1).tolist()
    chosen = mx.take_along_axis(logprobs, mx.array(got.tokens)[:, None], axis=-1)[:, 0].tolist()
    assert_within("adapter row vs its own forward", max_gap(got.logprobs, chosen), LOGPROB_TOL["dequantized"])


def test_adapters_that_cannot_be_served_are_refused_naming_why(tiny_model_path, adapters, tmp_path):
    def variant(name: str, change) -> Path:
        out = tmp_path / name
        out.mkdir()
        arrays = mx.load(str(adapters["all4"] / "adapters.safetensors"))
        config = json.loads((adapters["all4"] / "adapter_config.json").read_text())
        arrays, config = change(arrays, config)
        mx.save_safetensors(str(out / "adapters.safetensors"), arrays)
        (out / "adapter_config.json").write_text(json.dumps(config))
        return out

    a_key = "model.layers.0.self_attn.q_proj.lora_a"
    cases = {
        "dora": (variant("dora", lambda a, c: (a, {**c, "fine_tune_type": "dora"})), "dora"),
        "layer": (
            variant("layer", lambda a, c: ({**a, "model.layers.99.mlp.up_proj.lora_a": a[a_key]}, c)),
            "block 99",
        ),
        "shape": (variant("shape", lambda a, c: ({**a, a_key: mx.zeros((3, 4))}, c)), "do not fit"),
        "rank": (variant("rank", lambda a, c: (a, c)), "rank 4 is over"),
        "half": (variant("half", lambda a, c: ({k: v for k, v in a.items() if k != a_key}, c)), "needs both"),
        "scale": (variant("scale", lambda a, c: (a, {**c, "lora_parameters": {"rank": 4}})), "scale"),
    }
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "adapter_config.json").write_text((adapters["all4"] / "adapter_config.json").read_text())
    with open(huge / "adapters.safetensors", "wb") as f:
        f.truncate(1 << 30)  # sparse: refused by its size before a byte is read
    cases["huge"] = (huge, "more than an adapter")
    engine = make_engine(tiny_model_path, adapters["policy"], max_lora_rank=8)

    async def body(engine: Engine) -> None:
        for name, (path, words) in cases.items():
            if name == "rank":
                engine.adapters.max_rank = 2
            with pytest.raises(AdapterError) as info:
                await engine.adapters.load(name, path)
            engine.adapters.max_rank = 8
            assert info.value.field == "lora_path" and words in info.value.message, (name, info.value.message)
        for bad in ("policy", "base", "policy@step_000001", "", "a b"):
            with pytest.raises(AdapterError, match="lora_name"):
                await engine.adapters.load(bad, adapters["all4"])
        await engine.adapters.load("ok", adapters["all4"])
        with pytest.raises(AdapterError, match="already loaded"):
            await engine.adapters.load("ok", adapters["all4"])
        assert [a.name for a in engine.adapters.loaded()] == ["ok"]

    serve(engine, body)


def test_a_replaced_adapter_serves_its_new_arrays_as_its_new_version(tiny_model_path, adapters):
    """Adapters.replace (paraloop tinker's inflight saves): the name serves the new arrays, labelled with the new
    version, exactly as a fresh adapter of them does (no KV cached under the old arrays is reused); an older
    version is refused, and a name not served answers False (the caller puts it anew). Mid-row replacement is
    test_tinker_inflight.py's."""
    engine = make_engine(tiny_model_path, None, prefix_cache_mb=64)
    prompt = engine.tokenizer.encode(TEXTS[3] * 3)
    old = read_for_serving(adapters["all4"], engine.adapters.targets, max_rank=64)
    new = read_for_serving(adapters["all8"], engine.adapters.targets, max_rank=64)

    async def body(engine: Engine) -> tuple[Completion, Completion, Completion, float]:
        await engine.adapters.put("x", old, 1)
        before = (await engine.complete(ask(prompt, "x")))[0]
        assert await engine.adapters.replace("x", new, 2)
        after = (await engine.complete(ask(prompt, "x")))[0]
        hits = engine.stats()["prefix_cache_hits"]
        await engine.adapters.put("fresh", new, 2)
        fresh = (await engine.complete(ask(prompt, "fresh")))[0]
        with pytest.raises(ValueError, match="older"):
            await engine.adapters.replace("x", old, 1)
        assert not await engine.adapters.replace("nothing", new, 3)
        return before, after, fresh, hits

    before, after, fresh, hits = serve(engine, body)
    assert hits == 0
    assert before.versions == [1] * 10 and after.versions == fresh.versions == [2] * 10
    assert after.tokens == fresh.tokens != before.tokens
    assert after.logprobs == fresh.logprobs
