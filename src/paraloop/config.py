"""Typed configuration: one TOML file, environment overrides, CLI flags on top.

Precedence (highest first): CLI flag > environment `PARALOOP_SECTION__KEY` > TOML file > default.
`load_config(path, overrides)` is the only entry point; nothing is global. Every field's docstring is its help text
and feeds docs/configuration.md (`paraloop config docs`).
"""

import json
import logging
import os
import tomllib
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, InitSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from paraloop.config_paths import absolute_paths, resolve_toml_paths

ENV_PREFIX = "PARALOOP_"
log = logging.getLogger("paraloop.config")

# Value sets of settings that code outside the config takes too (run/buffer.py checks its arguments against them).
BufferPriority = Literal["fifo", "abs_advantage"]
StalePolicy = Literal["drop", "cap"]


def check_choice(name: str, value: object, choices: Any) -> None:
    """ValueError naming `name` unless `value` is one of the Literal `choices`."""
    allowed = get_args(choices)
    if value not in allowed:
        raise ValueError(f"{name} must be {' or '.join(map(repr, allowed))}, got {value!r}")


def without_ignored(data: Any, key: str, message: str) -> Any:
    """`data` without `key`, logging `message % value` when it was there: a setting still accepted that no longer
    changes anything (for a before-validator)."""
    if isinstance(data, dict) and key in data:
        data = dict(data)
        log.warning(message, data.pop(key))
    return data


@dataclass(frozen=True)
class Staleness:
    """The staleness policy a run acts on: rollouts more than `max_versions` adapter versions old are dropped
    ("drop") or kept with capped importance weights ("cap"); `max_versions` None: none is acted on."""

    max_versions: int | None = None
    policy: StalePolicy = "drop"

    @property
    def drops(self) -> bool:
        return self.max_versions is not None and self.policy == "drop"

    @property
    def caps(self) -> bool:
        return self.max_versions is not None and self.policy == "cap"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class ServerConfig(Section):
    host: str = "127.0.0.1"
    """Address the HTTP server binds. A non-loopback address requires `control_token`."""
    port: int = Field(8000, ge=0, le=65535)
    """HTTP port (0 picks a free port)."""
    batch_size: int = Field(32, ge=1)
    """Most sequences decoded together (the continuous batch's width)."""
    max_concurrent_requests: int = Field(256, ge=1)
    """Admission queue bound: requests beyond it are answered 429."""
    control_token: str | None = None
    """Bearer token required by /control routes (and every route when set). Env: PARALOOP_SERVER__CONTROL_TOKEN."""
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    """Largest accepted request body; larger ones are answered 413 before they are read whole."""
    body_timeout_s: float = Field(30.0, gt=0)
    """Seconds a client may take to send a request body once its headers arrived (slower: HTTP 408)."""
    allowed_origins: list[str] = Field(default_factory=list)
    """Web origins (e.g. "https://my-dashboard.example") whose pages may call the API. A request with any other
    Origin header, which only browsers send, is answered 403: a page you visit cannot drive a local server."""
    max_json_depth: int = Field(32, ge=4, le=256)
    """Deepest nesting of arrays and objects accepted in a request body (deeper: HTTP 400)."""
    max_schema_bytes: int = Field(64 * 1024, ge=256)
    """Largest JSON schema compiled into a grammar for constrained output (`response_format`'s schema, or all tools'
    parameters together for a required tool call), measured as compact JSON; larger: HTTP 400. The compiler's own
    fuel limits (engine/grammar.py) bound the work a schema under this size can cause."""
    served_model_name: str | None = None
    """The model's id in /v1/models and in requests' `model` field (default: the model directory's name); it
    selects the default adapter: the policy when one is served, else the base model (docs/api.md, Adapters)."""
    lora_modules: dict[str, str] = Field(default_factory=dict)
    """Named LoRA adapters served from the start beside the policy, name -> path (an mlx-lm adapter dir or file);
    a request selects one with `"model": NAME`. CLI: --lora-modules NAME=PATH ..."""
    lora_dirs: list[str] = Field(default_factory=list)
    """Directories POST /v1/load_lora_adapter may load adapters from (a path elsewhere, symlinks resolved, is
    refused with 403). Empty: loading at run time is off."""
    max_loras: int = Field(8, ge=0, le=1024)
    """Most named adapters loaded at once (from lora_modules, over HTTP, and a run's checkpoints named by
    requests, which are evicted least recently used first)."""
    max_lora_rank: int = Field(64, ge=1, le=4096)
    """Highest LoRA rank of a named adapter (bounds the memory an adapter file may take before it is read)."""
    checkpoint_adapters: bool = True
    """`paraloop run`: serve the run's own checkpoints by name (`"model": "policy@step_000040"`), loaded the first
    time a request names one (counted in max_loras)."""

    @model_validator(mode="after")
    def _lora_modules_fit(self) -> "ServerConfig":
        if len(self.lora_modules) > self.max_loras:
            raise ValueError(f"{len(self.lora_modules)} lora_modules, more than max_loras = {self.max_loras}")
        return self


class ModelConfig(Section):
    base_path: str | None = None
    """Model directory (mlx-lm format, quantized or not), or a Hugging Face repo id such as
    `mlx-community/Qwen3-14B-4bit`, found as mlx-lm finds it: the hub cache (HF_HOME), downloaded when missing unless
    HF_HUB_OFFLINE=1. In a TOML file relative to the file's directory. CLI: --model-path."""
    revision: str | None = None
    """Branch, tag or commit of a Hugging Face repo id in base_path (default: main); unused for a directory.
    CLI: --revision."""
    lora_path: str | None = None
    """Adapter to start from (run) or to serve (serve): an mlx-lm adapter dir (adapters.safetensors +
    adapter_config.json), an adapter file, a paraloop or predecessor checkpoint, or a run dir (its newest checkpoint).
    A predecessor's adapter.npz without adapter_config.json takes its layout from its arrays and its scale and
    dropout from rl_training.lora. CLI: --adapter (also --adapter-path, --lora-path)."""
    auto_init_lora: bool = True
    """Attach fresh LoRA layers (rl_training.lora) when no lora_path is given."""
    compute: Literal["auto", "quantized", "dequantized"] = "auto"
    """How the frozen base computes: `auto` dequantizes to float32 on the CPU backend (much faster there with
    OpenBLAS) and keeps quantized kernels on Metal/CUDA."""
    trust_remote_code: bool = False
    """Passed to the tokenizer loader."""


class EngineConfig(Section):
    prefill_batch_size: int = Field(8, ge=1)
    """Prompts prefilled together."""
    prefill_step_size: int = Field(2048, ge=16)
    """Prompt tokens processed per prefill chunk."""
    max_prompt_tokens: int = Field(8192, ge=1)
    """Longest accepted prompt, in tokens (longer: HTTP 400)."""
    max_tokens_limit: int = Field(4096, ge=1)
    """Largest accepted `max_tokens` per request (larger: HTTP 400)."""
    default_max_tokens: int = Field(256, ge=1)
    """`max_tokens` when a request gives none."""
    max_n: int = Field(64, ge=1)
    """Largest accepted `n` per request."""
    max_kv_tokens: int = Field(1_048_576, ge=1)
    """KV-cache tokens the engine admits at once, summed over the requests waiting or running; a request costs
    n x (prompt + max_tokens). One that could never fit: HTTP 400; one that does not fit now: HTTP 429 with
    Retry-After. The cache takes 2 x layers x kv_heads x head_dim x bytes per token (SmolLM2-135M in float32:
    46 KB), so size this to the memory you can give it."""
    max_top_logprobs: int = Field(20, ge=0)
    """Largest accepted `top_logprobs` (chat) / `logprobs` (completions, /generate)."""
    max_stop_strings: int = Field(16, ge=0)
    """Most stop strings per request."""
    max_stop_string_chars: int = Field(256, ge=1)
    """Longest accepted stop string, in characters."""
    max_stop_token_ids: int = Field(64, ge=0)
    """Most `stop_token_ids` per request."""
    seed: int = 0
    """Base seed of the engine's sampler for requests without a seed."""
    decode: Literal["auto", "cpu", "mlx-lm"] = "auto"
    """The decode step. `cpu`: made for the CPU backend, where MLX computes exp and random bits one element at a
    time: the logits are evaluated and every row sampled in NumPy (vectorised; the log-probs come out with the
    tokens), and the MLP's swiglu uses an exp built from arithmetic that MLX fuses and vectorises. `mlx-lm`:
    mlx-lm's own step (lazy, double-buffered sampling in MLX). `auto`: `cpu` on the CPU backend, `mlx-lm` on Metal
    and CUDA."""
    prefix_cache_mb: int = Field(512, ge=0)
    """Memory for the prefix cache, in MiB: the KV caches of prompt prefixes and of finished rows (prompt +
    completion), reused by later requests that start with them (a shared system prompt, the next turn of a
    conversation) under the same adapter version; an adapter swap retires them. Least recently used entries go
    first. 0 turns it off (the rows of one `n > 1` request still share one prefill)."""

    @model_validator(mode="before")
    @classmethod
    def _diverse_mode(cls, data: Any) -> Any:
        """The predecessor's diverse_mode stopped its server from merging identical prompts into one sample;
        paraloop never merges them, so the setting cannot change anything: accepted with a warning."""
        return without_ignored(
            data,
            "diverse_mode",
            "--diverse-mode / engine.diverse_mode = %s has no effect: paraloop samples every completion "
            "independently (identical prompts are never merged, which is what diverse mode turned on in the "
            "predecessor); remove it",
        )


class LoraConfig(Section):
    rank: int = Field(16, ge=1)
    """LoRA rank. CLI: --lora-rank."""
    num_layers: int = Field(8, ge=-1)
    """How many of the last transformer blocks get LoRA (-1: all). CLI: --lora-layers."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """LoRA dropout while training (never while serving). CLI: --lora-dropout."""
    scale: float = 10.0
    """LoRA scale (output = base + scale * x A B). CLI: --lora-scale."""
    alpha: float | None = None
    """If set, scale = alpha / rank (PEFT convention); overrides `scale`."""
    keys: list[str] | Literal["all"] = Field(default_factory=lambda: ["self_attn.q_proj", "self_attn.v_proj"])
    """Module paths inside a block that get LoRA, or "all" for every linear layer. Alias: target_modules."""

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict) and "target_modules" in data:
            data = dict(data)
            data.setdefault("keys", data.pop("target_modules"))
        return data

    @property
    def effective_scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None else self.scale


class AtroposConfig(Section):
    api_url: str | None = None
    """Atropos API server URL (e.g. http://localhost:8001). Unset: the built-in mock environment. CLI: --atropos-url."""
    poll_interval: float = Field(1.0, gt=0)
    """Seconds between /batch polls while the queue is empty."""
    max_backoff: float = Field(30.0, gt=0)
    """Longest wait between retries while the API is unreachable."""
    wandb_group: str = "paraloop"
    """Sent to /register (Atropos requires it; wandb itself is not used by paraloop)."""
    wandb_project: str = "paraloop"
    """Sent to /register."""
    max_token_len: int = Field(4096, ge=1)
    """Longest sequence environments may send (sent to /register)."""
    starting_step: int | None = None
    """Override the step sent to /register as starting_step (default: 0, or on --resume the newest batch fetched
    before the restart: one Atropos step per batch fetched, see docs/checkpoints.md "No lost batch")."""
    served_index: int = Field(65536, ge=0)
    """Most policy completions the engine remembers by token ids (~200 bytes each), so that groups fetched back
    from Atropos get the adapter version that generated them (staleness, max_staleness, the mismatch check) and
    their kept sets (sampling-mask replay). 0: off (Atropos rows then have no version)."""
    max_response_bytes: int | None = Field(None, ge=1024)
    """Largest run-api answer read, in bytes (default: 128 bytes per token of a full batch, batch_size x
    max_token_len, and at least 16 MiB). A larger /batch answer is not read, so that garbage cannot exhaust memory:
    its batch is counted lost (run-api has already handed it out)."""


class MockEnvConfig(Section):
    task: str = "paraloop.envs.tasks:one_word"
    """Reward task as `module:function` returning a Task. Built in: `one_word` and `short_description`
    (SmolLM2-135M-Instruct learns them in minutes on a CPU; the reward needs a correct word, not just the format)
    and `capitals` (for the tiny random test model, at temperature <= 0.25); multi-turn:
    `paraloop.envs.calculator:calculator` (a calculator tool called in `<tool_call>` blocks)."""
    group_size: int = Field(8, ge=1)
    """Completions per prompt (one n=group_size request)."""
    max_tokens: int | None = None
    """Rollout length cap; default rl_training.max_tokens."""
    max_turns: int = Field(4, ge=1)
    """Most model turns per episode of a multi-turn task (one with `respond`, e.g.
    `paraloop.envs.calculator:calculator`); the task may end an episode sooner. Single-turn tasks ignore it."""
    max_episode_tokens: int = Field(2048, ge=16)
    """Longest multi-turn episode, in tokens (prompt, turns and the environment's messages): an episode ends
    before a turn whose prompt + max_tokens would pass it."""
    ignore_eos: bool = False
    """Generate exactly max_tokens per completion, past any EOS (length tests and memory benchmarks)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling of the rollouts (1: off). The learner replays each token's kept set (docs/training.md)."""
    top_k: int = Field(0, ge=0)
    """Top-k sampling of the rollouts (0: off)."""
    min_p: float = Field(0.0, ge=0, le=1)
    """Min-p sampling of the rollouts (0: off)."""
    concurrency: int = Field(4, ge=1)
    """Prompts in flight at once when the engine cannot admit a whole batch together (paraloop's engine can:
    there every group of a batch starts in the same decode step, which makes seeded runs repeatable)."""
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra variables for the tokenizer's chat template when prompts are built, e.g. `{enable_thinking = false}`
    for Qwen3, whose template starts a <think> block by default (docs/models.md)."""


class AgentSessionsConfig(Section):
    """[rl_training.sessions]: rollouts from agents' own traffic (rl_training.source = "sessions", docs/agents.md)."""

    group_size: int = Field(4, ge=1)
    """Rewarded sessions of one group key that form a GRPO group; the group goes to the learner once it has them."""
    max_open: int = Field(256, ge=1)
    """Most sessions recorded at once (not yet rewarded); a turn that would open one more is refused (429)."""
    max_session_tokens: int = Field(8192, ge=16)
    """Most tokens one session records (its samples together); a turn whose prompt + max_tokens would pass it is
    refused (400 naming max_tokens)."""
    max_age_s: float = Field(900.0, gt=0)
    """Seconds a session or an unfinished group may wait since its last turn or reward; older ones are dropped
    (counted as expired in /control/status)."""
    max_waiting_groups: int = Field(64, ge=1)
    """Most complete groups waiting for the learner plus unfinished group keys; a reward that would pass it is
    refused (429) and the session stays open."""


class RLTrainingConfig(Section):
    algorithm: Literal["grpo", "gspo", "cispo", "reinforce"] = "grpo"
    """Policy-gradient objective: grpo (PPO clip per token), gspo (PPO clip per sequence on the length-normalised
    sequence ratio), cispo (clipped stop-gradient importance weight times log-prob), reinforce (-A log p).
    docs/training.md has the math. CLI: --algorithm."""
    train_mode: Literal["lora", "full"] = "lora"
    """Train LoRA adapters (default) or every weight of a non-quantized model."""
    learning_rate: float = Field(1e-5, gt=0)
    """AdamW peak learning rate. CLI: --learning-rate."""
    batch_size: int = Field(8, ge=1)
    """Sequences per learner step (Atropos batch_size). CLI: --batch-size."""
    total_steps: int = Field(5, ge=1)
    """Learner steps to run. Alias: steps. CLI: --steps."""
    update_epochs: int = Field(1, ge=1)
    """Optimizer passes over each batch. CLI: --update-epochs."""
    kl_beta: float = Field(0.05, ge=0)
    """Weight of the KL penalty to the reference adapter (0 skips the reference forward). CLI: --kl-beta."""
    kl_estimator: Literal["k3", "mse", "abs"] = "k3"
    """k3: exp(r)-r-1 with r = ref-logp; mse: 0.5 (logp-ref)^2; abs: |logp-ref|. CLI: --kl-estimator."""
    ref_ema: float = Field(1.0, gt=0, le=1)
    """Reference adapter update ref = ema*ref + (1-ema)*policy each step; 1.0 keeps the initial adapter. CLI:
    --ref-ema."""
    entropy_weight: float = 0.0
    """Entropy bonus weight. CLI: --entropy-weight."""
    clip_ratio: float = Field(0.2, ge=0)
    """PPO clip epsilon (lower side, and upper side unless clip_ratio_high). CLI: --clip-ratio."""
    clip_ratio_high: float | None = Field(None, ge=0)
    """Upper clip epsilon (DAPO clip-higher)."""
    cispo_clip_max: float = Field(5.0, gt=0)
    """cispo: upper bound of the stop-gradient importance weight, 1 + eps_high (ScaleRL and TRL recommend 5.0)."""
    importance_cap: float | None = Field(None, gt=0)
    """Rollout correction: upper bound on the importance ratio pi_old/pi_rollout (learner over engine log-probs).
    Setting it (or importance_min) turns the correction on: the learner then computes pi_old itself (one forward
    more per step). None: off (pi_old is the engine's log-probs)."""
    importance_min: float | None = Field(None, ge=0)
    """Rollout correction, importance_mode = "mask" only: lower bound on the importance ratio (None: 1 /
    importance_cap, verl's default; no bound without a cap). Truncation caps from above only."""
    importance_level: Literal["token", "sequence"] = "token"
    """Rollout correction ratio per token, or per sequence (the product of its token ratios, on all its tokens)."""
    importance_mode: Literal["truncate", "mask"] = "truncate"
    """truncate (TIS): the weight is min(ratio, importance_cap); mask (MIS): the ratio inside [importance_min,
    importance_cap], and tokens outside are removed from the loss (its denominators, KL and entropy included)."""
    max_tokens: int = Field(256, ge=1)
    """Rollout generation cap for the mock environment. CLI: --max-tokens."""
    token_budget: int = Field(8192, ge=64)
    """Most tokens (padded rows x longest row) in one micro-batch; larger batches accumulate gradients. An upper
    bound on top of the memory target below. CLI: --token-budget."""
    max_memory_gb: float | None = Field(None, gt=0)
    """MLX memory target of a learner step, in GiB: weights, optimizer state and caches already held plus the
    step's activations. Set it to bound the process (a Mac shared with other work): micro-batches, sized from
    measured per-token costs, get smaller and blocks are checkpointed as far as it requires, trading speed for
    memory; a sequence too long to fit even alone is an error before anything is allocated. Overrides
    max_memory_fraction. See docs/memory.md. CLI: --max-memory-gb."""
    max_memory_fraction: float | None = Field(0.8, gt=0, le=1)
    """Memory target as a fraction of the device's memory (Metal: its recommended working set; CPU: physical
    memory, and never more than the process holds plus what the system has available) when max_memory_gb is
    unset. The default spends memory on speed: micro-batches as large as this and token_budget allow. None: no
    memory target, only token_budget."""
    logits_chunk_tokens: int | None = Field(None, ge=0)
    """Tokens whose logits the learner computes at once (the LM head runs chunk by chunk and recomputes each
    chunk in the backward pass, so (tokens x vocab) logits never exist). None: automatic, 16 MiB of float32
    logits per chunk; 0: the full-logits path."""
    activation_checkpointing: Literal["auto", "always", "never"] = "auto"
    """Recompute each trained transformer block in the backward pass instead of keeping its activations: 3-6x less
    learner memory for ~20-25% more compute (docs/memory.md). auto: for micro-batches whose rows would not fit the
    memory target one at a time otherwise; with no memory target, for rows of checkpoint_min_length tokens or more."""
    checkpoint_min_length: int = Field(1024, ge=1)
    """Without a memory target (max_memory_fraction = None), the row length (tokens) from which
    activation_checkpointing = "auto" checkpoints: where attention makes activations grow with the square of the
    length (SmolLM2, one row: 1.7 GB at 1024 tokens, 0.43 GB checkpointed). With a target, the target decides."""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """Advantage scaling: (r - group mean) / (std + eps) with std of the group, of the batch, or no division."""
    advantage_eps: float = Field(1e-4, gt=0)
    """eps in the advantage denominator."""
    loss_aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = "token-mean"
    """How token losses become one number (seq-mean-token-sum-norm is Dr. GRPO: token sums over a constant).
    Unset with algorithm = "gspo": seq-mean-token-mean, the GSPO paper's objective (token-mean weights each
    sequence by its length)."""
    loss_norm_length: int | None = Field(None, ge=1)
    """The constant seq-mean-token-sum-norm divides each sequence's token sum by (default: the generation cap,
    mock.max_tokens for the mock environment, else max_tokens; logged at start-up)."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop groups whose scores are all equal (no signal) and keep drawing rollouts until the
    batch is full."""
    dynamic_sampling_max_draws: int = Field(8, ge=1)
    """Most rollout batches drawn for one learner batch; after that the batch is filled with zero-signal groups."""
    overlong_buffer: int = Field(0, ge=0)
    """DAPO overlong shaping: the last N tokens before a completion's max_tokens ramp a penalty from 0 to
    -overlong_penalty (0: off)."""
    overlong_penalty: float = Field(1.0, ge=0)
    """Penalty added to the score of a completion that reaches max_tokens (with overlong_buffer > 0)."""
    mask_truncated: bool = False
    """Leave completions cut off at max_tokens out of the loss (DAPO overlong filtering)."""
    mismatch_threshold: float = Field(0.01, ge=0)
    """Warn (log and /control/status) when the mean |engine - learner| log-prob of tokens sampled by the adapter
    version being trained exceeds this many nats (0: never)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup steps."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: constant, or cosine decay to min_lr_ratio * learning_rate at total_steps."""
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """Floor of the cosine schedule."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Global gradient-norm clip (None: off)."""
    temperature: float = Field(1.0, gt=0)
    """Rollout temperature of the mock environment (Atropos groups carry their own)."""
    seed: int = 0
    """Seed of the LoRA initialisation, of dropout (drawn from (seed, step)) and of the mock environment's prompts
    and sampling (from (seed, group index)). The rollout buffer's order does not depend on it."""
    mode: Literal["sync", "async"] = "sync"
    """sync: rollouts wait while the learner steps (strictly on-policy with the mock environment; Atropos
    environments generate ahead, docs/architecture.md says what holds then). async: generation may overlap training;
    on the CPU backend it barely does (MLX throttles in-flight work process-wide; docs/benchmarks.md), so keep sync
    there."""
    max_staleness: int = Field(1, ge=0)
    """Rollouts more than this many adapter versions old are handled by stale_policy: in async mode, and for
    Atropos rollouts in both modes (an environment generates ahead; their versions come from the engine's index of
    served completions, atropos.served_index), and for agent sessions in both modes (each token's version is
    recorded). Dropped groups train no step: more are fetched."""
    stale_policy: StalePolicy = "drop"
    """drop stale rollouts, or keep them with importance weights capped at importance_cap (default 2.0)."""
    buffer_priority: BufferPriority = "fifo"
    """Rollout buffer order: arrival, or groups with the largest mean |advantage| first."""
    source: Literal["mock", "atropos", "sessions"] | None = None
    """Where rollouts come from: mock (the built-in environment, [rl_training.mock]), atropos (run-api at
    atropos.api_url), sessions (agents' own requests to this run's OpenAI routes, tagged with a session and rewarded
    over HTTP: docs/agents.md, [rl_training.sessions]). Default: atropos when atropos.api_url is set, else mock."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    atropos: AtroposConfig = Field(default_factory=AtroposConfig)
    mock: MockEnvConfig = Field(default_factory=MockEnvConfig)
    sessions: AgentSessionsConfig = Field(default_factory=AgentSessionsConfig)

    @model_validator(mode="before")
    @classmethod
    def _aliases(cls, data: Any) -> Any:
        if isinstance(data, dict) and "steps" in data:
            data = dict(data)
            data.setdefault("total_steps", data.pop("steps"))
        data = without_ignored(
            data,
            "activation_memory_ratio",
            "rl_training.activation_memory_ratio = %s is no longer used and is ignored: micro-batches now grow to "
            "the memory target, which is what bounds memory; set rl_training.max_memory_gb to the most the run "
            "may take (see docs/memory.md)",
        )
        if isinstance(data, dict) and data.get("algorithm") == "gspo" and data.get("loss_aggregation") is None:
            data = {**data, "loss_aggregation": "seq-mean-token-mean"}  # the GSPO paper's objective, unless set
        atropos = data.get("atropos") if isinstance(data, dict) else None
        if isinstance(atropos, dict) and "token_budget" in atropos:
            # The predecessor's [rl_training.atropos] token_budget bounded the tokens trained at once, as paraloop's
            # rl_training.token_budget does (per micro-batch; a larger batch is split, never cut).
            atropos = dict(atropos)
            value = atropos.pop("token_budget")
            data = {**data, "atropos": atropos}
            if "token_budget" not in data:
                data["token_budget"] = value
            elif data["token_budget"] != value:
                log.warning(
                    "rl_training.token_budget = %s and [rl_training.atropos] token_budget = %s (the predecessor's "
                    "spelling) both given: using rl_training.token_budget",
                    data["token_budget"],
                    value,
                )
        return data

    @property
    def rollout_source(self) -> Literal["mock", "atropos", "sessions"]:
        """`source`, or its default: atropos when atropos.api_url is set, else mock."""
        return self.source or ("atropos" if self.atropos.api_url else "mock")

    @model_validator(mode="after")
    def _source_matches(self) -> "RLTrainingConfig":
        if self.source == "atropos" and not self.atropos.api_url:
            raise ValueError("source = 'atropos' needs atropos.api_url (run-api's URL)")
        if self.source in ("mock", "sessions") and self.atropos.api_url:
            raise ValueError(f"source = {self.source!r} but atropos.api_url is set: unset one of them")
        return self

    @property
    def staleness(self) -> Staleness:
        """The staleness policy the run acts on: max_staleness / stale_policy in async mode, and on Atropos and agent
        sessions' rollouts in both modes (their clients generate ahead). The mock environment's sync rollouts are
        on-policy by construction: none there."""
        acts = self.mode == "async" or self.rollout_source != "mock"
        return Staleness(self.max_staleness, self.stale_policy) if acts else Staleness()

    @property
    def staleness_applies(self) -> bool:
        """Whether max_staleness / stale_policy act at all."""
        return self.staleness.max_versions is not None

    @model_validator(mode="after")
    def _importance_bounds(self) -> "RLTrainingConfig":
        custom = self.importance_level != "token" or self.importance_mode != "truncate"
        if custom and self.importance_cap is None and self.importance_min is None and not self.staleness.caps:
            raise ValueError(
                "importance_level / importance_mode act only with a bound: set importance_cap and/or importance_min"
            )
        if self.importance_min is not None and self.importance_mode == "truncate":
            raise ValueError(
                "importance_min is the lower bound of importance_mode = 'mask' (verl's rollout_rs); truncation "
                "(TIS) caps from above only: set importance_mode = 'mask' or leave importance_min unset"
            )
        return self


class EvalConfig(Section):
    every_steps: int = Field(0, ge=0)
    """Evaluate the adapter on the task's held-out prompts before training, whenever its version reaches a multiple
    of N, and at the end (0: never). Training waits while it runs."""
    task: str | None = None
    """Task whose eval split is evaluated, as `module:function` or `path/to/file.py:function` (default:
    rl_training.mock.task). Every built-in task has an eval split disjoint from its training prompts."""
    prompts: int | None = Field(None, ge=1)
    """Evaluate the first N prompts of the eval split (None: all of them)."""
    samples: int = Field(1, ge=1)
    """Completions per prompt (k): pass@1 is their mean, pass@k (k = 2, 4, ... samples) the unbiased estimate."""
    temperature: float = Field(0.0, ge=0)
    """Sampling temperature (0: greedy; samples > 1 needs a temperature > 0)."""
    max_tokens: int | None = Field(None, ge=1)
    """Generation cap (default: the rollouts' cap, rl_training.mock.max_tokens or rl_training.max_tokens)."""
    pass_threshold: float = 1.0
    """A completion passes when its reward is at least this."""
    seed: int = 0
    """Seed of the eval samples (each prompt's request gets its own seed derived from it)."""

    @model_validator(mode="after")
    def _sampled(self) -> "EvalConfig":
        if self.samples > 1 and self.temperature == 0:
            raise ValueError("samples > 1 needs temperature > 0 (greedy completions of a prompt are all the same)")
        return self


class CheckpointConfig(Section):
    dir: str = "runs/latest"
    """Run directory: checkpoints/, metrics.jsonl, plots; in a TOML file relative to the file's directory.
    CLI: --run-dir (alias --checkpoint-dir)."""
    interval: int = Field(50, ge=0)
    """Write a checkpoint every N learner steps (0: only the final one). CLI: --checkpoint-interval."""
    save_every_step: bool = False
    """Checkpoint after every step (overrides interval). CLI: --save-every-step."""
    adapter_format: Literal["safetensors", "npz", "both"] = "safetensors"
    """Adapter file format: mlx-lm's adapters.safetensors, the predecessor's adapter.npz, or both. CLI:
    --adapter-format."""
    keep_last: int | None = Field(None, ge=1)
    """Keep only the newest N step checkpoints, and always the one `latest` names (None: keep all; initial_adapter
    is never pruned). CLI: --keep-last."""
    resume: str | None = None
    """Run directory or checkpoint to resume from. CLI: --resume."""


class LoggingConfig(Section):
    report_to: list[Literal["jsonl", "tensorboard", "wandb"]] = Field(default_factory=lambda: ["jsonl"])
    """Where step metrics and rollout samples go, same names everywhere: `jsonl` (RUN_DIR/metrics.jsonl and
    rollouts.jsonl, read by `paraloop plot` and `paraloop dashboard`), `tensorboard` (RUN_DIR/tensorboard, needs
    `paraloop[tensorboard]`), `wandb` (needs `paraloop[wandb]`; honours WANDB_MODE, e.g. offline)."""
    rollout_samples: int = Field(4, ge=0, le=64)
    """Rollouts kept per learner step for the dashboard and the loggers (the best and worst of the first groups)."""
    rollout_steps: int = Field(20, ge=1, le=1000)
    """Learner steps whose samples the live dashboard keeps in memory (older ones stay in rollouts.jsonl)."""
    max_sample_tokens: int = Field(512, ge=16, le=65536)
    """Longest prompt or completion kept per sample, in tokens (the rest is cut and marked)."""
    wandb_project: str = "paraloop"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team or user); default: the logged-in user's."""
    wandb_run_name: str | None = None
    """W&B run name (default: the run directory's name)."""
    wandb_mode: Literal["online", "offline", "disabled"] | None = None
    """W&B mode; unset: the WANDB_MODE environment variable, else online."""


class DistributedConfig(Section):
    """One run over several processes (docs/distributed.md); used only when a launcher (`paraloop launch`,
    mlx.launch, mpirun) starts paraloop as one rank of several."""

    backend: Literal["any", "ring", "jaccl", "nccl", "mpi"] = "any"
    """mx.distributed backend: `ring` (TCP, e.g. Ethernet), `jaccl` (RDMA over Thunderbolt 5), `nccl` (CUDA),
    `mpi`, or `any` (the first that the launcher's environment sets up)."""
    checksum_interval: int = Field(10, ge=0)
    """Compare every rank's adapter and optimizer checksum every N learner steps (and at every checkpoint); a
    difference ends the run naming the ranks. 0: only at checkpoints."""
    connect_timeout: float = Field(120.0, gt=0)
    """Seconds to wait for every rank to join at start before exiting with an error."""
    collective_timeout: float = Field(600.0, gt=0)
    """Longest wait for the other ranks in one collective (a step's gradient sum, the start state from rank 0,
    a checkpoint) before the run ends; covers ranks that are alive but stuck."""
    heartbeat_interval: float = Field(1.0, gt=0)
    """Seconds between heartbeats to every other rank (GET /ranks on its HTTP port)."""
    peer_timeout: float = Field(30.0, gt=0)
    """A rank that answers no heartbeat for this long is lost: the run ends on every rank with an error naming it."""
    advertise_host: str | None = None
    """Address the other ranks reach this rank's HTTP server at (default: server.host, or this rank's address in
    the ring hostfile when server.host is a wildcard such as 0.0.0.0)."""


class WatchdogConfig(Section):
    engine_stall_s: float | None = Field(120.0, gt=0)
    """The engine is stalled when it has work (rows decoding, requests waiting, an adapter swap waiting) and no
    decode step, finished request or swap for this long. A decode step takes milliseconds to a few seconds even on
    large models; a long prompt's prefill can take tens of seconds on a CPU. None: not watched."""
    learner_stall_s: float | None = Field(900.0, gt=0)
    """A learner step (or a checkpoint write) is stalled when it has run this long and more than
    learner_stall_factor times the slowest step so far: a step on a large model can take minutes. None: not watched."""
    learner_stall_factor: float = Field(10.0, ge=1)
    """See learner_stall_s: a step slower than this many times the slowest finished step (and than learner_stall_s)
    is stalled."""
    stall_timeout: float | None = Field(None, gt=0)
    """Opt-in: when a part has made no progress for this long (counted from its last progress, so at least its
    stall time), end the run: a final checkpoint when the learner can still take one, then exit code 3.
    None: a stall is only reported (/health 503, /control/status, the log)."""


class TinkerConfig(Section):
    """`paraloop tinker`: the Tinker training API served locally (docs/tinker.md)."""

    state_dir: str = "tinker-state"
    """Where tinker:// checkpoints live: tinker://MODEL_ID/weights/NAME is STATE_DIR/MODEL_ID/NAME, an atomic
    paraloop checkpoint."""
    max_clients: int = Field(8, ge=1, le=1024)
    """Training clients (LoRA adapters with optimizer state) held at once; creating one more is answered 429."""
    max_pending: int = Field(256, ge=1, le=65536)
    """Futures submitted and not yet finished; one more is answered 429 (the SDK backs off and retries)."""
    retention_s: float = Field(600.0, gt=0)
    """How long a finished future's result is kept for retrieve_future (a client that reconnects within it still
    gets its result); also at most max_pending * 4 finished results are kept, the oldest dropped first."""
    poll_wait_s: float = Field(30.0, gt=0, le=40)
    """retrieve_future holds an unfinished future this long before answering try_again (the SDK polls again at
    once, logging a warning each time; its own timeout is 45 s)."""
    max_data: int = Field(1024, ge=1)
    """Datums in one forward_backward (the SDK splits bigger batches into chunks of its own)."""
    max_batch_tokens: int = Field(65536, ge=1)
    """Input tokens in one forward_backward, summed over its datums."""
    max_num_samples: int = Field(64, ge=1)
    """num_samples of one sample request."""


class DistillConfig(Section):
    """On-policy distillation (docs/training.md): a teacher scores the student's own samples and the per-token
    teacher - student log-prob of each sampled token joins the advantage (learn/distill.py)."""

    teacher: str | None = None
    """The teacher: a model directory (loaded once, scored on the learner's thread); an adapter on the same base
    model (a run dir, a checkpoint dir, an adapter dir, or the name of a server.lora_modules adapter), co-served by
    the run's engine; or the base URL of an OpenAI-compatible server that returns prompt log-probs
    (`http://host:port/v1`: POST /completions with echo and logprobs). None: only Atropos groups that carry
    distill_token_ids / distill_logprobs are distilled."""
    teacher_model: str | None = None
    """The `model` a URL teacher is asked for (its served model or adapter name); None: the field is not sent."""
    weight: float = Field(1.0, ge=0)
    """Coefficient of the teacher term (teacher - student log-prob of the sampled token) in the advantage."""
    reward_weight: float = Field(1.0, ge=0)
    """Coefficient of the task reward's group advantage beside it; 0: distillation alone (the reward is then only
    reported)."""
    temperature: float = Field(1.0, gt=0)
    """The teacher's logits are divided by this before the log-softmax (a model directory or adapter teacher). A URL
    teacher and Atropos log-probs are used as sent: temperature must be 1 with a URL teacher."""
    timeout_s: float = Field(120.0, gt=0)
    """A URL teacher's answer time for one sequence; it is tried 3 times before the run ends with the error."""

    @model_validator(mode="after")
    def _url_temperature(self) -> "DistillConfig":
        if self.teacher and self.teacher.startswith(("http://", "https://")) and self.temperature != 1.0:
            raise ValueError(
                "temperature applies to a model or adapter teacher: a URL teacher's log-probs are "
                "used as its server sends them (set temperature = 1)"
            )
        return self


class Settings(BaseSettings):
    """The whole resolved configuration of one paraloop process."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid", use_attribute_docstrings=True
    )

    server: ServerConfig = Field(default_factory=ServerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    rl_training: RLTrainingConfig = Field(default_factory=RLTrainingConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    watchdog: WatchdogConfig = Field(default_factory=WatchdogConfig)
    tinker: TinkerConfig = Field(default_factory=TinkerConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)

    @model_validator(mode="before")
    @classmethod
    def _predecessor_keys(cls, data: Any) -> Any:
        """Accept the predecessor's TOML spellings (rl_training.checkpoint_interval, ...) in their new sections."""
        if not isinstance(data, dict) or not isinstance(data.get("rl_training"), dict):
            return data
        data, rl = dict(data), dict(data["rl_training"])
        moves = {
            "checkpoint_interval": ("checkpoint", "interval"),
            "save_every_step": ("checkpoint", "save_every_step"),
            "adapter_format": ("checkpoint", "adapter_format"),
            "checkpoint_dir": ("checkpoint", "dir"),
            "atropos_url": ("rl_training", "atropos.api_url"),
        }
        for old, (section, key) in moves.items():
            if old not in rl:
                continue
            value = rl.pop(old)
            if section == "rl_training":
                sub, leaf = key.split(".")
                rl[sub] = {**rl.get(sub, {}), leaf: value} if value is not None else rl.get(sub, {})
            else:
                data[section] = {**data.get(section, {}), key: value}
        data["rl_training"] = rl
        return data

    @model_validator(mode="after")
    def _safe_binding(self) -> "Settings":
        loopback = self.server.host in ("127.0.0.1", "localhost", "::1") or self.server.host.startswith("127.")
        if not loopback and not self.server.control_token:
            raise ValueError(
                f"server.host = {self.server.host!r} is not a loopback address: set server.control_token "
                "(or PARALOOP_SERVER__CONTROL_TOKEN) so /control cannot be driven by anyone on the network"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: CLI flags (init kwargs), then PARALOOP_* variables, then the TOML file of this call.
        toml = _toml_tree.get() or {}
        return (init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=toml))


_toml_tree: ContextVar[dict[str, Any] | None] = ContextVar("paraloop_toml_tree", default=None)


class ConfigError(ValueError):
    """A configuration problem, with the key and the file (or env var / flag) it came from."""


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from None


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Return a copy of `tree` with `a.b.c` set to value."""
    head, _, rest = dotted.partition(".")
    out = dict(tree)
    out[head] = set_dotted(out.get(head, {}), rest, value) if rest else value
    return out


def _env_names() -> dict[tuple[str, ...], str]:
    return {
        tuple(k[len(ENV_PREFIX) :].lower().split("__")): k for k in os.environ if k.startswith(ENV_PREFIX) and "__" in k
    }


def _has_path(tree: Any, loc: tuple[str, ...]) -> bool:
    for part in loc:
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def _describe(err: Any, toml: dict, overrides: dict, path: str | None) -> str:
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc) or "(root)"
    env = _env_names()
    if _has_path(overrides, loc):
        where = "command line"
    elif loc in env:
        where = f"environment variable {env[loc]}"
    else:
        where = path or "configuration"
    msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
    return f"{key}: {msg} (in {where})"


def load_config(path: str | os.PathLike | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Resolve the configuration: CLI overrides > environment (PARALOOP_SECTION__KEY) > TOML > defaults.
    The TOML file's relative paths are relative to its directory (config_paths.py); the others to the current one.

    `overrides` is a nested dict holding only what the user gave on the command line,
    e.g. {"rl_training": {"learning_rate": 1e-4}}. Raises ConfigError naming the key and where it came from.
    """
    toml = resolve_toml_paths(read_toml(path), path) if path is not None else {}
    overrides = overrides or {}
    token = _toml_tree.set(toml)
    try:
        return Settings(**overrides)
    except ValidationError as e:
        where = str(path) if path is not None else None
        raise ConfigError("; ".join(_describe(err, toml, overrides, where) for err in e.errors())) from None
    finally:
        _toml_tree.reset(token)


SECRETS = (("server", "control_token"),)
REDACTED = "<redacted>"


def public_dump(settings: Settings) -> dict[str, Any]:
    """The resolved settings as JSON data with secrets replaced: what may be written to disk (checkpoints)."""
    data = settings.model_dump(mode="json")
    for section, key in SECRETS:
        if data[section].get(key) is not None:
            data[section][key] = REDACTED
    return data


def to_toml(settings: Settings, *, absolute: bool = False) -> str:
    """Render resolved settings as TOML (None values are commented out; `absolute`: relative paths made absolute)."""
    lines: list[str] = []

    def emit(prefix: str, tree: dict[str, Any]) -> None:
        scalars = {k: v for k, v in tree.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in tree.items() if isinstance(v, dict)}
        if prefix:
            lines.append(f"\n[{prefix}]")
        for k, v in scalars.items():
            lines.append(f"# {k} = (unset)" if v is None else f"{k} = {_toml_value(v)}")
        for k, v in tables.items():
            emit(f"{prefix}.{k}" if prefix else k, v)

    data = settings.model_dump(mode="json")
    emit("", absolute_paths(data) if absolute else data)
    return "\n".join(lines).lstrip() + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)
