"""The distillation teacher ([distill] teacher): scores the student's rollouts before the learner trains on them.

In: the rollout source's RolloutBatches. Out: the same batches, every sequence of a group given
`teacher_logprobs` (the teacher's log-prob of each token after the ones before it, aligned with `tokens`, a 1.0
placeholder at position 0); learn/distill.py turns them into the advantage's teacher term. Groups that already
carry teacher log-probs (an Atropos group's distill arrays) are passed as they are; the sequences of all the other
groups of a batch go to the teacher together (`score_many`).

The teacher is one of three, chosen from the setting:
- an adapter on the student's base model (a run dir, a checkpoint or adapter dir, or a server.lora_modules name):
  co-served by the run's own engine as a named adapter, sharing the base weights (no second copy of the model), and
  scored there by `Engine.score_many`: the batch's sequences (prompt + completion) in batched forwards of up to
  engine/scoring.SCORE_TOKENS positions, every row routed to the teacher adapter, between two decode steps of the
  student's rows (16 sequences of near lengths up to 257 tokens are one forward pass; ragged lengths are cut where
  padding would cost more than a forward);
- a model directory (another model with the same tokenizer): loaded once, on the learner's thread, and scored
  there with the same batched forwards (engine/scoring.score_rows, no routing);
- an OpenAI-compatible server's base URL: POST /completions with `echo`, `logprobs` and `max_tokens` 0 (the legacy
  prompt-logprob request lm-eval uses: nothing is generated), CONCURRENCY sequences at a time; the answer is
  bounded in bytes and checked before use.
A teacher that fails (a URL that does not answer after 3 tries, a sequence the engine cannot score) ends the run
with the reason: training on without the teacher would silently change the objective.
"""

import json
import logging
import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import anyio
import msgspec

from paraloop.checkpoint import adapter_location
from paraloop.config import Settings
from paraloop.engine.admission import kv_tokens
from paraloop.engine.scoring import score_sequences
from paraloop.logits_head import logits_head
from paraloop.messages import GenerateRequest, RolloutBatch, SamplingParams
from paraloop.mlx_thread import ComputeThread

log = logging.getLogger("paraloop.teacher")

TEACHER_ADAPTER = "distill-teacher"  # the name an adapter teacher is served under
CONCURRENCY = 8  # sequences a URL teacher is asked for at once
TRIES = 3
MAX_LOGPROB = 1e-3  # a log-prob is <= 0 (up to rounding)
BYTES_PER_TOKEN = 4096  # bound of a URL teacher's answer: this per token, plus RESPONSE_SLACK
RESPONSE_SLACK = 1 << 20


class TeacherError(RuntimeError):
    """The teacher could not score a sequence; the run ends with this message."""


class Teacher(Protocol):
    async def score_many(self, sequences: list[list[int]]) -> list[list[float]]:
        """For each sequence, log p(tokens[t] | tokens[:t]) for t = 1..len(tokens)-1."""
        ...


class AdapterTeacher:
    """An adapter on the same base, co-served by the run's engine (loaded into it on first use)."""

    def __init__(self, engine: Any, *, name: str, path: Path | None, temperature: float) -> None:
        self.engine, self.name, self.path, self.temperature = engine, name, path, temperature
        self._loaded = anyio.Lock()
        self._ready = path is None  # a server.lora_modules adapter is loaded as the engine starts

    async def score_many(self, sequences: list[list[int]]) -> list[list[float]]:
        if not self._ready:
            async with self._loaded:
                if not self._ready:
                    await self.engine.adapters.load(self.name, self.path)
                    log.info("distillation teacher: adapter %s served as %r", self.path, self.name)
                    self._ready = True
        requests = [
            GenerateRequest(
                request_id=f"teacher-{uuid.uuid4().hex[:12]}",
                prompt_tokens=tokens,
                params=SamplingParams(max_tokens=1),
                adapter=self.name,
            )
            for tokens in sequences
        ]
        out: list[list[float]] = []
        for part in admissible(requests, max_requests=self.engine.max_queue, max_kv=self.engine.config.max_kv_tokens):
            out += await self.engine.score_many(part, temperature=self.temperature)
        return out


class ModelTeacher:
    """Another model directory, loaded once; scored on `thread` (the learner's)."""

    def __init__(self, model: Any, thread: ComputeThread, *, temperature: float) -> None:
        self.model, self.thread, self.temperature = model, thread, temperature
        self.head: Any = None  # the model's body/head split, probed on the thread at the first batch
        self._probed = False

    async def score_many(self, sequences: list[list[int]]) -> list[list[float]]:
        return await self.thread.call(self._score, sequences)

    def _score(self, sequences: list[list[int]]) -> list[list[float]]:
        if not self._probed:
            self.head, self._probed = logits_head(self.model), True
        return score_sequences(self.model, self.head, sequences, temperature=self.temperature)


class UrlTeacher:
    """An OpenAI-compatible server's /completions with echo + logprobs (prompt log-probs)."""

    def __init__(self, base_url: str, *, model: str | None, timeout_s: float) -> None:
        self.url = base_url.rstrip("/") + "/completions"
        self.model, self.timeout_s = model, timeout_s

    async def score_many(self, sequences: list[list[int]]) -> list[list[float]]:
        out: list[list[float]] = [[] for _ in sequences]
        limit = anyio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            async with limit:
                out[i] = await self.score(sequences[i])

        async with anyio.create_task_group() as tg:
            for i in range(len(sequences)):
                tg.start_soon(one, i)
        return out

    async def score(self, tokens: list[int]) -> list[float]:
        # max_tokens 0 with echo: score the prompt, generate nothing (OpenAI's legacy form, lm-eval's request;
        # vLLM's `echo_without_generation`, paraloop's scoring-only completion).
        body: dict[str, Any] = {"prompt": tokens, "max_tokens": 0, "echo": True, "logprobs": 0, "temperature": 1.0}
        if self.model is not None:
            body["model"] = self.model
        last = ""
        for attempt in range(TRIES):
            try:
                return parse_echo(await self._post(body, len(tokens)), len(tokens))
            except _Retry as e:
                last = str(e)
                await anyio.sleep(0.5 * 2**attempt)
        raise TeacherError(f"distillation teacher {self.url} did not answer after {TRIES} tries: {last}")

    async def _post(self, body: dict[str, Any], n: int) -> Any:
        limit = RESPONSE_SLACK + BYTES_PER_TOKEN * n
        try:
            with anyio.fail_after(self.timeout_s):
                async with aiohttp.ClientSession() as session, session.post(self.url, json=body) as response:
                    data = bytearray()
                    async for chunk in response.content.iter_chunked(1 << 16):
                        data += chunk
                        if len(data) > limit:
                            raise TeacherError(f"distillation teacher {self.url}: answer over {limit} bytes")
                    if response.status >= 500 or response.status in (408, 429):
                        raise _Retry(f"HTTP {response.status}: {bytes(data[:300]).decode(errors='replace')}")
                    if response.status != 200:
                        raise TeacherError(
                            f"distillation teacher {self.url} answered HTTP {response.status}: "
                            f"{bytes(data[:500]).decode(errors='replace')}"
                        )
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise _Retry(f"{type(e).__name__}: {e}") from None
        try:
            return json.loads(data)
        except ValueError:
            raise TeacherError(f"distillation teacher {self.url}: the answer is not JSON") from None


class _Retry(Exception):
    pass


def parse_echo(answer: Any, n: int) -> list[float]:
    """The prompt's log-probs for positions 1..n-1 from a /completions echo answer; TeacherError names the problem."""
    try:
        values = answer["choices"][0]["logprobs"]["token_logprobs"]
    except (KeyError, IndexError, TypeError):
        raise TeacherError(
            "distillation teacher: no choices[0].logprobs.token_logprobs in the answer "
            "(does the server support echo with logprobs?)"
        ) from None
    if not isinstance(values, list) or len(values) < n:
        raise TeacherError(
            f"distillation teacher: {len(values) if isinstance(values, list) else 'no'} prompt "
            f"log-probs for a prompt of {n} tokens"
        )
    out = values[1:n]
    for t, v in enumerate(out, 1):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v > MAX_LOGPROB:
            raise TeacherError(f"distillation teacher: token_logprobs[{t}] = {v!r} is not a log-prob")
    return [float(v) for v in out]


def admissible(requests: list[GenerateRequest], *, max_requests: int, max_kv: int) -> list[list[GenerateRequest]]:
    """`requests` in consecutive parts the engine can admit as one batch: at most `max_requests`
    (server.max_concurrent_requests) and `max_kv` KV-cache tokens (engine.max_kv_tokens) each."""
    parts: list[list[GenerateRequest]] = []
    cost = 0
    for request in requests:
        if not parts or len(parts[-1]) >= max_requests or cost + kv_tokens(request) > max_kv:
            parts.append([])
            cost = 0
        parts[-1].append(request)
        cost += kv_tokens(request)
    return parts


async def distilled(source: AsyncIterator[RolloutBatch], teacher: Teacher) -> AsyncIterator[RolloutBatch]:
    """`source`'s batches with teacher_logprobs: the sequences of every group that carries none yet, scored by the
    teacher in one `score_many` call per batch."""
    async for batch in source:
        groups = list(batch.groups)
        todo = [g for g in range(len(groups)) if not groups[g].teacher_logprobs]
        sequences = [list(tokens) for g in todo for tokens in groups[g].tokens]
        scored = iter(await teacher.score_many(sequences) if sequences else [])
        for g in todo:
            rows = []
            for tokens in groups[g].tokens:
                values = next(scored, None)
                if values is None or len(values) != len(tokens) - 1:
                    got = "no" if values is None else len(values)
                    raise TeacherError(f"distillation teacher gave {got} log-probs for {len(tokens)} tokens")
                rows.append([1.0, *values])
            groups[g] = msgspec.structs.replace(groups[g], teacher_logprobs=rows)
        yield msgspec.structs.replace(batch, groups=groups)


async def make_teacher(settings: Settings, engine: Any, tokenizer: Any, thread: ComputeThread) -> Teacher:
    """The teacher `settings.distill.teacher` names (see the module docstring); raises ValueError when it cannot be."""
    d = settings.distill
    spec = d.teacher
    assert spec is not None
    if spec.startswith(("http://", "https://")):
        return UrlTeacher(spec, model=d.teacher_model, timeout_s=d.timeout_s)
    if spec in settings.server.lora_modules:
        return AdapterTeacher(engine, name=spec, path=None, temperature=d.temperature)
    path = Path(spec)
    if not path.exists():  # noqa: ASYNC240 - a few stat calls, once at start
        raise ValueError(f"distill.teacher = {spec!r}: no such file or directory, URL or server.lora_modules name")
    if _is_model_dir(path):
        return await _model_teacher(settings, path, tokenizer, thread)
    return AdapterTeacher(engine, name=TEACHER_ADAPTER, path=adapter_location(path), temperature=d.temperature)


def _is_model_dir(path: Path) -> bool:
    """A model directory (config.json, no adapter_config.json) rather than an adapter, checkpoint or run dir."""
    return (path / "config.json").is_file() and not (path / "adapter_config.json").is_file()


async def _model_teacher(settings: Settings, path: Path, tokenizer: Any, thread: ComputeThread) -> ModelTeacher:
    from paraloop.model import load_model

    model, teacher_tokenizer, _, _ = await thread.call(
        load_model, path, compute=settings.model.compute, trust_remote_code=settings.model.trust_remote_code
    )
    if tokenizer is not None and teacher_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"distill.teacher = {str(path)!r}: its tokenizer differs from the student's (distillation "
            "compares log-probs of the same token ids)"
        )
    log.info("distillation teacher: model %s loaded (scored on the learner's thread)", path)
    return ModelTeacher(model, thread, temperature=settings.distill.temperature)
