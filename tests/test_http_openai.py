"""The OpenAI-compatible routes, driven by the official `openai` client against the real engine on the tiny model."""

import openai
import pytest

from support.http_harness import running_server
from paraloop.lora import AdapterSlots, adapter_arrays
from paraloop.server import STATE

MESSAGES = [{"role": "user", "content": "What is 2 plus 3?"}]
NO_EOS = {"ignore_eos": True}  # every completion runs to max_tokens: lengths and texts are exact


@pytest.fixture(scope="module")
def server(tiny_model_path):
    with running_server(tiny_model_path, overrides={"server": {"served_model_name": "m"}}) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


def chat_prompt_tokens(server, messages) -> list[int]:
    tok = server.engine.tokenizer
    return tok.encode(
        tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
        add_special_tokens=False,
    )


def test_chat_completion_applies_the_chat_template_and_counts_tokens(server, client):
    r = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6, extra_body=NO_EOS)
    [choice] = r.choices
    assert r.object == "chat.completion" and r.model == server.app[STATE].model_name
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    extra = choice.model_extra
    assert len(extra["token_ids"]) == len(extra["token_logprobs"]) == 6
    assert choice.message.content == server.engine.tokenizer.decode(extra["token_ids"], skip_special_tokens=True)
    assert all(lp <= 0 for lp in extra["token_logprobs"])
    assert extra["adapter_versions"] == [0] and r.model_extra["adapter_version"] == 0
    assert r.usage.prompt_tokens == len(chat_prompt_tokens(server, MESSAGES))
    assert r.usage.completion_tokens == 6 and r.usage.total_tokens == r.usage.prompt_tokens + 6


def test_completions_n4_gives_four_independent_samples_and_sums_usage(server, client):
    prompt = "The capital of France is"
    r = client.completions.create(model="m", prompt=prompt, n=4, max_tokens=8, temperature=1.0, extra_body=NO_EOS)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    token_ids = [c.model_extra["token_ids"] for c in r.choices]
    assert len({tuple(t) for t in token_ids}) > 1, "n samples must not be copies of one sample"
    # The text leaves special tokens out (a random model samples <|endoftext|> now and then).
    assert [c.text for c in r.choices] == [
        server.engine.tokenizer.decode(t, skip_special_tokens=True) for t in token_ids
    ]
    assert r.usage.prompt_tokens == len(server.engine.tokenizer.encode(prompt))
    assert r.usage.completion_tokens == 4 * 8


def test_completions_accept_token_id_prompts(client):
    r = client.completions.create(model="m", prompt=[5, 6, 7, 8], max_tokens=3, extra_body=NO_EOS)
    assert r.usage.prompt_tokens == 4 and len(r.choices[0].model_extra["token_ids"]) == 3


def test_completions_logprobs_report_top_alternatives(client):
    r = client.completions.create(
        model="m", prompt="Water freezes at", max_tokens=5, temperature=0, logprobs=3, extra_body=NO_EOS
    )
    [choice] = r.choices
    lp = choice.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.token_logprobs == choice.model_extra["token_logprobs"]
    assert "".join(lp.tokens) == choice.text and lp.text_offset[0] == 0
    for sampled, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3
        assert sampled == pytest.approx(max(top.values()))  # greedy: the sampled token is the top-1


def test_chat_logprobs_follow_the_openai_shape(client):
    r = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=4, logprobs=True, top_logprobs=2, extra_body=NO_EOS
    )
    [choice] = r.choices
    content = choice.logprobs.content
    assert [c.logprob for c in content] == choice.model_extra["token_logprobs"]
    assert all(len(c.top_logprobs) == 2 and c.bytes == list(c.token.encode()) for c in content)


def test_the_same_seed_reproduces_a_completion(client):
    args = dict(model="m", prompt="Once upon", max_tokens=6, n=2, seed=1234, extra_body=NO_EOS)
    first = client.completions.create(**args)
    second = client.completions.create(**args)
    assert [c.model_extra["token_ids"] for c in first.choices] == [c.model_extra["token_ids"] for c in second.choices]


def test_streaming_chat_sends_per_choice_chunks_then_usage(server, client):
    stream = client.chat.completions.create(
        model="m",
        messages=MESSAGES,
        n=2,
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=NO_EOS,
    )
    chunks = list(stream)
    *token_chunks, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 10
    assert usage_chunk.usage.prompt_tokens == len(chat_prompt_tokens(server, MESSAGES))
    for index in (0, 1):
        mine = [c.choices[0] for c in token_chunks if c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and all(c.delta.role is None for c in mine[1:])
        assert [c.finish_reason for c in mine] == [None] * 4 + ["length"]
        ids = [t for c in mine for t in c.model_extra["token_ids"]]
        assert "".join(c.delta.content for c in mine) == server.engine.tokenizer.decode(ids, skip_special_tokens=True)
        assert all(c.model_extra["adapter_versions"] == [0] for c in mine)
    assert all(c.usage is None for c in token_chunks)


def test_streaming_completions_match_the_plain_answer_for_a_seed(client):
    args = dict(model="m", prompt="The river", max_tokens=6, seed=7, logprobs=1, extra_body=NO_EOS)
    plain = client.completions.create(**args)
    chunks = list(client.completions.create(stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    ids = [t for c in chunks for t in c.choices[0].model_extra["token_ids"]]
    assert ids == plain.choices[0].model_extra["token_ids"]
    offsets = [o for c in chunks for o in c.choices[0].logprobs.text_offset]
    assert offsets == plain.choices[0].logprobs.text_offset
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_live_adapter_swap_changes_the_policy_between_two_tokens(tiny_model_path):
    """Every token's logprob is the one the adapter version it is tagged with gives: version 0 (the initial
    adapter) up to the swap, then version 1 (a random adapter that moves the logprobs far)."""
    import mlx.core as mx  # here, not at the top: paraloop's OpenBLAS preload must come first
    from mlx_lm.models.cache import make_prompt_cache

    prompt = [5, 6]
    with running_server(tiny_model_path, lora=True, overrides={"server": {"served_model_name": "m"}}) as s:
        initial = dict(adapter_arrays(s.model))
        swapped = {
            k: mx.random.normal(v.shape, key=mx.random.key(i)) * 0.2 for i, (k, v) in enumerate(sorted(initial.items()))
        }
        mx.eval(swapped)
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(
            model="m", prompt=prompt, n=2, max_tokens=4000, stream=True, extra_body=NO_EOS
        )
        rows: dict[int, list[tuple[int, float, int]]] = {0: [], 1: []}  # (token, logprob, version)
        for chunk in stream:
            [choice] = chunk.choices
            extra = choice.model_extra
            [version] = extra["adapter_versions"]  # one token per chunk
            rows[choice.index] += [
                (t, lp, version) for t, lp in zip(extra["token_ids"], extra["token_logprobs"], strict=True)
            ]
            if s.engine.version == 0:  # swap once generation is under way; returns when applied
                s.portal.call(s.engine.swap_adapter, swapped, 1)
            if all(any(v == 1 for *_, v in row) for row in rows.values()):
                break
        stream.close()
        client.close()
        assert s.get("/health").json()["adapter_version"] == 1
    slots = AdapterSlots(s.model)  # the server is gone: its model is ours to run
    arrays = {0: initial, 1: swapped}

    def replay(row: list[tuple[int, float, int]], versions: list[int]) -> list[float]:
        """Decode the row again one token at a time, step i under adapter versions[i]. The swap is live, so keys
        and values cached before it stay those of version 0, as in the engine."""
        cache = make_prompt_cache(s.model)
        slots.swap(initial)
        s.model(mx.array(prompt[:-1])[None], cache=cache)
        inputs = [prompt[-1]] + [t for t, *_ in row[:-1]]
        out = []
        for (token, *_), fed, version in zip(row, inputs, versions, strict=True):
            slots.swap(arrays[version])
            logits = s.model(mx.array([[fed]]), cache=cache)[0, -1].astype(mx.float32)
            out.append((logits - mx.logsumexp(logits))[token].item())
        return out

    moved = []
    for row in rows.values():
        versions = [v for *_, v in row]
        assert versions[0] == 0 and versions[-1] == 1 and versions == sorted(versions)  # 0 up to the swap, never back
        served = [lp for _, lp, _ in row]
        assert served == pytest.approx(replay(row, versions), abs=2e-3)
        unswapped = replay(row, [0] * len(row))
        moved += [abs(a - b) for a, b, v in zip(served, unswapped, versions, strict=True) if v == 1]
    assert max(moved) > 0.05, "the swapped adapter changed nothing"


def test_models_and_health(server, client):
    served, base = client.models.list().data  # the served model (its default adapter), and the bare base model
    assert (served.id, base.id) == ("m", "base") and base.model_extra["parent"] == "m"
    health = server.get("/health")
    assert health.status_code == 200 and health.json() == {"status": "ok", "adapter_version": 0}
