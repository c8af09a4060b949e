"""Local Tinker: the official SDK (tinker 0.38) driving `paraloop tinker` on SmolLM2-135M (4-bit).

Everything goes through the SDK, as a Tinker program would, against a `paraloop tinker` child; the OpenAI baseline is
a `paraloop serve` child on the same model (both stay up; only one is measured at a time). Lines:
- RL steps/minute: the SDK's RL loop (examples/tinker_rl.py: sample the groups, `importance_sampling`
  forward_backward, optim_step, a new sampling client) against a `paraloop tinker` child of its own, over
  `paraloop run` on configs/demo.toml, the same steps (4 prompts x 8 completions of <= 24 tokens, LoRA rank 16,
  one_word): measured first, one after the other (that child is stopped before `paraloop run` starts), before the
  children below start. The median step after the first of each (bench/tinker_steps.py says how a step is timed and
  what cannot be the same). Target >= 0.8 (paraloop run's step time over the SDK loop's).
- sampler weights to the first token: `save_weights_and_get_sampling_client` then a 1-token sample (the adapter goes
  into the engine from memory), over the disk path a program would otherwise take (`save_state` writes the
  checkpoint, `create_sampling_client(model_path=...)` reads and installs it, then the same sample). Each round
  follows an optim_step, so the weights are new. Target <= 0.05.
- sampling tokens/s: the same requests (8 prompts x 4 samples, 32 tokens each, EOS off) through the SDK and through
  /v1/completions (token-id prompts, n = 4, ignore_eos), all in flight at once. Target >= 0.9.
- two training clients vs one: the server's resident memory added by the second client (its adapter, AdamW moments
  and gradients, rank 32), over docs/tinker.md's estimate of 16 * rank * sum(in + out) bytes; and tokens/s of the
  two clients' samplers sampling together (each half the requests, two adapters in one decode batch) over one
  sampler taking all of them.
"""

import concurrent.futures
import statistics
import time
from pathlib import Path

from bench import tinker_steps
from bench.harness import Child, Context, Line, free_port, python_cmd, wait_until

NAME = "tinker"
TITLE = "15. Local Tinker: the Tinker SDK against `paraloop tinker` (SmolLM2-135M 4-bit)"
BUDGET_S = 600
PROMPTS, SAMPLES, TOKENS = 8, 4, 32
RANK = 32


def rss_bytes(pid: int) -> int:
    for text in Path(f"/proc/{pid}/status").read_text().splitlines():
        if text.startswith("VmRSS:"):
            return int(text.split()[1]) * 1024
    raise OSError(f"no VmRSS for {pid}")


def healthy(url: str) -> bool:
    import httpx

    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def start_tinker(ctx: Context, name: str, model: Path) -> tuple[Child, str]:
    """A `paraloop tinker` child on a free port, once it serves: (child, URL)."""
    port = free_port()
    state = f"tinker.state_dir={ctx.log_dir / f'{name}-state'}"
    cmd = python_cmd("-m", "paraloop", "tinker", "--model-path", str(model), "--port", str(port), "--set", state)
    child, url = ctx.spawn(name, cmd), f"http://127.0.0.1:{port}"
    wait_until(lambda: healthy(f"{url}/api/v1/healthz"), timeout_s=300, what=f"paraloop tinker ({name})")
    return child, url


def prompts(vocab: int) -> list[list[int]]:
    return [[(97 * i + 13 * j) % (vocab - 10) + 5 for j in range(24)] for i in range(PROMPTS)]


def sdk_tokens_per_s(samplers: list, batches: list[list[list[int]]]) -> float:
    from tinker import types

    params = types.SamplingParams(max_tokens=TOKENS, temperature=1.0, stop=[])
    start = time.perf_counter()
    futures = [
        s.sample(types.ModelInput.from_ints(p), num_samples=SAMPLES, sampling_params=params)
        for s, batch in zip(samplers, batches, strict=True)
        for p in batch
    ]
    tokens = sum(len(seq.tokens) for f in futures for seq in f.result().sequences)
    return tokens / (time.perf_counter() - start)


def openai_tokens_per_s(url: str, batch: list[list[int]]) -> float:
    import httpx

    model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]

    def one(prompt: list[int]) -> int:
        body = {
            "model": model,
            "prompt": prompt,
            "n": SAMPLES,
            "max_tokens": TOKENS,
            "temperature": 1.0,
            "ignore_eos": True,
        }
        r = httpx.post(f"{url}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
        tokens = sum(pool.map(one, batch))
    return tokens / (time.perf_counter() - start)


def block_sizes(model_path: Path) -> int:
    """sum(in + out) over every linear layer of every block, from config.json (Llama/Qwen layout)."""
    import json

    c = json.loads((model_path / "config.json").read_text())
    h, inter = c["hidden_size"], c["intermediate_size"]
    kv = c.get("num_key_value_heads", c["num_attention_heads"]) * (h // c["num_attention_heads"])
    per_block = 2 * (h + h) + 2 * (h + kv) + 3 * (h + inter)
    return per_block * c["num_hidden_layers"]


def run(ctx: Context) -> list[Line]:
    import tinker
    from tinker import types

    model = ctx.model_q4
    rounds = 3 if ctx.quick else 8
    steps = 3 if ctx.quick else 6  # the first of each is left out
    rl_server, rl_url = start_tinker(ctx, "tinker-rl-server", model)
    sdk_run = tinker_steps.sdk_loop(ctx, rl_url, model, steps)
    ctx.stop(rl_server)
    run_run = tinker_steps.paraloop_run(ctx, model, steps)

    oport = free_port()
    ctx.spawn("serve", python_cmd("-m", "paraloop", "serve", "--model-path", str(model), "--port", str(oport)))
    tk, turl = start_tinker(ctx, "tinker", model)
    ourl = f"http://127.0.0.1:{oport}"
    wait_until(lambda: healthy(f"{ourl}/health"), timeout_s=300, what="paraloop serve")

    service = tinker.ServiceClient(base_url=turl, api_key="tml-bench")
    rss_before = rss_bytes(tk.proc.pid)
    tc = service.create_lora_training_client(base_model=str(model), rank=RANK).result()
    vocab = len(tc.get_tokenizer())
    batch = prompts(vocab)
    datum = types.Datum(
        model_input=types.ModelInput.from_ints(batch[0][:-1]),
        loss_fn_inputs={"target_tokens": batch[0][1:], "weights": [1.0] * 23},
    )

    def step(client: tinker.TrainingClient) -> None:
        client.forward_backward([datum], "cross_entropy").result()
        client.optim_step(types.AdamParams(learning_rate=1e-4)).result()

    step(tc)
    rss_one = rss_bytes(tk.proc.pid)
    prompt, one_token = types.ModelInput.from_ints(batch[1]), types.SamplingParams(max_tokens=1, stop=[])
    memory_s, disk_s = [], []
    for i in range(rounds):
        step(tc)
        start = time.perf_counter()
        sampler = tc.save_weights_and_get_sampling_client().result()
        sampler.sample(prompt, num_samples=1, sampling_params=one_token).result()
        memory_s.append(time.perf_counter() - start)
        step(tc)
        start = time.perf_counter()
        path = tc.save_state(f"bench-{i}").result().path
        from_disk = service.create_sampling_client(model_path=path).result()
        from_disk.sample(prompt, num_samples=1, sampling_params=one_token).result()
        disk_s.append(time.perf_counter() - start)

    base = service.create_sampling_client(base_model=str(model)).result()
    sdk_tps = sdk_tokens_per_s([base], [batch])
    openai_tps = openai_tokens_per_s(ourl, batch)

    second = service.create_lora_training_client(base_model=str(model), rank=RANK).result()
    step(second)
    rss_two = rss_bytes(tk.proc.pid)
    estimate = 16 * RANK * block_sizes(model)
    sa = tc.save_weights_and_get_sampling_client().result()
    sb = second.save_weights_and_get_sampling_client().result()
    one_tps = sdk_tokens_per_s([sa], [batch])
    two_tps = sdk_tokens_per_s([sa, sb], [batch[: PROMPTS // 2], batch[PROMPTS // 2 :]])

    ms, mb = 1e3, 1 / 2**20
    mem, disk = statistics.median(memory_s), statistics.median(disk_s)
    detail = {
        "memory_s": memory_s,
        "disk_s": disk_s,
        "rss_before_clients": rss_before,
        "rss_one_client": rss_one,
        "rss_two_clients": rss_two,
        "estimate_bytes_per_client": estimate,
    }
    shape = tinker_steps.demo_shape()
    lengths = [statistics.mean(r["completion_length_mean"][1:]) for r in (sdk_run, run_run)]
    return [
        Line(
            NAME,
            f"RL steps/minute, the Tinker SDK's loop over `paraloop run` (demo.toml's steps: {shape['prompts']} x "
            f"{shape['group']}, <= {shape['max-tokens']} tokens)",
            60 / sdk_run["median_s"],
            60 / run_run["median_s"],
            "steps/min",
            ">= 0.8",
            note=f"median of {steps - 1} steps after the first: {sdk_run['median_s']:.1f} s vs "
            f"{run_run['median_s']:.1f} s; mean completion {lengths[0]:.1f} vs {lengths[1]:.1f} tokens",
            detail={"sdk_loop": sdk_run, "paraloop_run": run_run, "shape": shape},
        ),
        Line(
            NAME,
            "save_weights_and_get_sampling_client + first token, over save_state + "
            "create_sampling_client(model_path) + first token",
            mem * ms,
            disk * ms,
            "ms",
            "<= 0.05",
            note=f"median of {rounds}; both include the SDK's HTTP round trips",
            detail=detail,
        ),
        Line(
            NAME,
            f"sampling tokens/s, SDK over /v1/completions ({PROMPTS} prompts x {SAMPLES}, {TOKENS} tokens)",
            sdk_tps,
            openai_tps,
            "tok/s",
            ">= 0.9",
        ),
        Line(
            NAME,
            f"memory added by a second training client (rank {RANK}, after one step), over the estimate",
            (rss_two - rss_one) * mb,
            estimate * mb,
            "MiB",
            note="RSS delta; MLX's allocator cache makes it coarse",
        ),
        Line(
            NAME,
            "tokens/s, two clients' samplers together over one sampler alone",
            two_tps,
            one_tps,
            "tok/s",
            ">= 0.9",
            note="two adapters in one decode batch vs one",
        ),
    ]
