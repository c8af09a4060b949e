"""Every message the actors exchange, on one page, so the data flow reads top to bottom.

    HTTP / mock env --GenerateRequest--> engine --TokenEvent--> caller (collected into Completions)
    rollout fetcher --RolloutBatch--> learner --AdapterPublished--> publisher --> engine.swap_adapter --AdapterSwapped
                                      learner --SaveCheckpoint--> checkpointer --CheckpointWritten--> learner
                                      learner --StepFinished--> monitor
                          publisher --version--> evaluator --EvalFinished--> monitor

/control does not send messages: it changes the learner's control state machine (`run/control.py`), which the
learner waits on between steps. The engine's own thread commands (Insert, Cancel, Swap, Stop) stay private to
`engine/worker.py`.

Messages are frozen, keyword-only msgspec Structs. Arrays (mx.array) travel by reference inside the process and are
never encoded; everything else is plain data that could cross a process boundary.
"""

from typing import Any, Literal

import msgspec

PROMPT_MASK = -100
"""The wire format's mask value at prompt positions (Atropos): masks hold it where a token is not trained and the
token id where it is."""


class Msg(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every message."""


# --- engine ------------------------------------------------------------------------------------------------------


class SamplingParams(Msg):
    """One request's sampling settings; honoured per row inside a shared batch."""

    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    max_tokens: int = 256
    stop: list[str] = []  # stop strings (not included in the returned text)
    stop_token_ids: list[int] = []  # extra stop tokens (the tokenizer's EOS always stops unless ignore_eos)
    ignore_eos: bool = False
    seed: int | None = None  # makes the request's samples reproducible
    top_logprobs: int = 0  # how many alternatives to report per token (0: none)
    grammar: Any = None  # engine/grammar.Grammar (compiled, by reference): rows sample only what it allows


class GenerateRequest(Msg):
    """Generate `n` completions of one prompt; the prompt is prefilled once and decoded as n rows."""

    request_id: str
    prompt_tokens: list[int]
    n: int = 1
    params: SamplingParams = SamplingParams()
    adapter: str | None = None  # "policy", "base", a named adapter; None: the policy if served, else the base model


class TokenEvent(Msg, gc=False):
    """One generated token of one row (completion) of a request. Made per token: `gc=False` keeps the cyclic
    garbage collector from tracking these short-lived objects (they hold no reference cycles)."""

    row: int
    token: int
    logprob: float  # log p(token) under the distribution it was sampled from: log_softmax(logits / T), over the
    # kept set when top-k / top-p / min-p filtered it (T=1 when greedy); a grammar's mask is not applied
    version: int  # adapter version whose forward pass produced this token
    text: str  # the text this token adds (may be "" while a multi-byte character or a stop string is pending)
    finish_reason: Literal["stop", "length", "abort"] | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    adapter: str = "policy"  # the adapter that produced it: "policy", "base" or a named adapter
    kept: int = 0  # size of the kept set it was sampled from, the most likely tokens first (0: full vocabulary)


class Completion(Msg):
    """A finished row, as collected from its TokenEvents (`engine.collect`)."""

    row: int
    tokens: list[int]
    logprobs: list[float]
    versions: list[int]
    text: str
    finish_reason: str  # "stop" | "length" | "abort"
    top_logprobs: list[list[tuple[int, float]]] = []  # per token, when the request asked for alternatives
    adapter: str = "policy"  # the adapter that produced every token of the row
    kept: list[int] = []  # per token: the size of the kept set it was sampled from (0: full vocabulary)


class AdapterPublished(Msg):
    """learner -> publisher: a new adapter version, evaluated arrays shared by reference (never copied)."""

    version: int
    arrays: dict[str, Any]  # "model.layers.3.self_attn.q_proj.lora_a" -> mx.array


class AdapterSwapped(Msg):
    """engine -> publisher: the version now serving and how long decoding paused to take it."""

    version: int
    pause_s: float


# --- rollouts -----------------------------------------------------------------------------------------------------


class ScoredGroup(Msg):
    """One Atropos ScoredDataGroup (or a mock-environment group in the same convention), validated.

    masks: -100 at prompt positions, the token id at trained positions. inference_logprobs: 1.0 placeholders at
    prompt positions. advantages None means absent ([] on the wire).
    """

    tokens: list[list[int]]
    masks: list[list[int]]
    scores: list[float]
    advantages: list[list[float]] | None = None
    ref_logprobs: list[list[float]] | None = None
    inference_logprobs: list[list[float]] | None = None
    # Per token: the size of the kept set (most likely tokens first) the engine sampled it from under top-k /
    # top-p / min-p, 0 for the full vocabulary and at prompt positions. The learner scores such tokens over the
    # same set (sampling-mask replay). A paraloop extension of the Atropos group; None: no filter recorded.
    sampling_kept: list[list[int]] | None = None
    overrides: list[dict[str, Any]] | None = None
    generation_params: dict[str, Any] | None = None
    group_overrides: dict[str, Any] | None = None
    env_id: int | None = None
    versions: list[int] | None = None  # oldest adapter version per sequence (known for mock rollouts)
    # Per token: the distillation teacher's log-prob of the token ([distill], learn/distill.py), aligned like
    # inference_logprobs (placeholders at prompt positions). From the configured teacher, or from an Atropos
    # group's distill_token_ids / distill_logprobs. None: not scored.
    teacher_logprobs: list[list[float]] | None = None


class RolloutBatch(Msg):
    """rollout fetcher -> learner: the groups of one learner step."""

    groups: list[ScoredGroup]
    source: str  # "mock" | "atropos" | "sessions"
    source_step: int | None = None  # the Atropos server's step, when known
    dropped_stale: int = 0
    source_state: dict[str, Any] | None = None  # where the source stands after this batch (saved for resume)
    metrics: dict[str, float] = {}  # how the batch was formed (dynamic sampling), merged into the step's metrics
    consumes: list[tuple[int, int, int]] = []  # journal ids (entry, index, entry's groups) this batch trains or drops
    journal_seq: int | None = None  # already in the run's journal as this entry (agent sessions journal a group
    # before its reward call is answered); None: the fetcher journals it when its source needs that


# --- learner, checkpoints, control -----------------------------------------------------------------------------------


class StepFinished(Msg):
    """learner -> monitor (and a waiting /control/step): one optimizer step done (or skipped for a non-finite loss)."""

    step: int
    version: int
    metrics: dict[str, float]
    skipped: bool = False


class EvalFinished(Msg):
    """evaluator -> monitor: the held-out evaluation of one adapter version (evaluation.py's metrics)."""

    step: int
    version: int
    task: str
    metrics: dict[str, float]


class SaveCheckpoint(Msg):
    """learner -> checkpointer: immutable snapshots to write; `reply` gets the path when written."""

    step: int
    version: int
    adapter: dict[str, Any]
    reference: dict[str, Any] | None
    optimizer_state: dict[str, Any]
    trainer_state: dict[str, Any]
    reply: Any = None  # an anyio MemoryObjectSendStream[CheckpointWritten] or None


class CheckpointWritten(Msg):
    """checkpointer -> learner (the SaveCheckpoint's reply): the checkpoint is on disk, or why it is not yet."""

    step: int
    path: str
    error: str | None = None  # the write failed (the checkpointer retries it); path is then ""
