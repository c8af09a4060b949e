"""The state of a local Tinker service: sessions, training clients (TrainingModel), sampling sessions.

In: the operations the routes decode (create a training client, forward_backward, optim_step, save and load
state, publish sampler weights, sample). Out: their results, as the futures' `Result`s. Training operations run one
at a time on the learner thread, in the order they were submitted (futures.py); a snapshot sampler's weights are the
client's arrays at the moment of the save, installed into the engine as a named adapter from memory (no file), so
sampling from them starts between two decode steps while other rows keep decoding. A client's inflight samplers
share one engine adapter, which each inflight save replaces in place between two decode steps (as `paraloop run`'s
publisher swaps the policy): rows decoding go on with the new weights, each token labelled with the save (version)
that produced it.
"""

import itertools
import re
import shutil
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import mlx.core as mx
import msgspec

from paraloop.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from paraloop.engine import Engine
from paraloop.engine.adapters import AdapterError, AdapterNotFound
from paraloop.engine.admission import EngineBusy, RequestError
from paraloop.messages import GenerateRequest, SamplingParams
from paraloop.mlx_thread import MlxThread
from paraloop.tinker import proto
from paraloop.tinker.futures import Result, UserError
from paraloop.tinker.learner import AdamParams, Learner, TrainingModel, served

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a checkpoint's name
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,255}")  # the SDK's own: SESSION_ID:train:N
MAX_SESSIONS = 4096  # sessions remembered (a ServiceClient makes one); the oldest are forgotten first
MAX_SAMPLERS = 1024  # sampling sessions remembered (each is a name and a reference to arrays already held)


@dataclass
class Sampler:
    """A sampling session: the base model (arrays None), a client's weights as of one save (a snapshot), or
    (follows) whatever its training client's latest inflight save is."""

    sampler_id: str
    base_model: str
    model_path: str | None
    arrays: dict[str, mx.array] | None
    version: int = 0  # the save's version: what its tokens are labelled
    adapter: str | None = None  # the engine's name for a snapshot once installed
    follows: str | None = None  # inflight: the training client whose latest inflight save it samples


class TinkerState:
    def __init__(
        self,
        *,
        engine: Engine,
        learner: Learner,
        thread: MlxThread,
        model_name: str,
        tokenizer_path: str,
        state_dir: Path,
        max_clients: int,
        vocab: int,
        max_context: int,
        max_rank: int,
    ) -> None:
        self.engine = engine
        self.learner = learner
        self.thread = thread
        self.model_name = model_name
        self.tokenizer_path = tokenizer_path
        self.state_dir = state_dir
        self.max_clients = max_clients
        self.vocab = vocab
        self.max_context = max_context
        self.max_rank = max_rank
        # the newest MAX_SESSIONS: None while open, the reason ServiceClient.close() gave once finished
        self.sessions: OrderedDict[str, str | None] = OrderedDict()
        self.models: dict[str, TrainingModel] = {}
        self.samplers: dict[str, Sampler] = {}
        self._serial = itertools.count(1)
        self._installing = anyio.Lock()

    # --- sessions and clients ----------------------------------------------------------------------------------------

    def new_session(self) -> str:
        session_id = f"session-{uuid.uuid4().hex[:12]}"
        self.sessions[session_id] = None
        while len(self.sessions) > MAX_SESSIONS:
            self.sessions.popitem(last=False)
        return session_id

    def finish_session(self, session_id: str, reason: str) -> None:
        """ServiceClient.close() (and the end of `with ServiceClient() as service:`): the session makes no new
        training client. Its clients, samplers and checkpoints stay: a program's session ends, not its work. The
        first reason stands, as on Tinker."""
        if session_id not in self.sessions:
            raise KeyError(session_id)
        if self.sessions[session_id] is None:
            self.sessions[session_id] = reason

    def base_names(self) -> set[str]:
        return {self.model_name, self.tokenizer_path}

    def check_base(self, base_model: str | None, field: str) -> None:
        if base_model is not None and base_model not in self.base_names():
            raise UserError(f"{field}: {base_model!r} is not served here (this server trains {self.model_name!r})")

    def model(self, model_id: str) -> TrainingModel:
        tm = self.models.get(model_id)
        if tm is None:
            raise UserError(f"model_id: no training client {model_id!r} (create_lora_training_client makes one)")
        return tm

    def new_model_id(self, session_id: str, seq: int) -> str:
        """The id the SDK derives on its side too: SESSION_ID:train:N. UserError if it cannot be made."""
        if session_id not in self.sessions:
            raise UserError(f"session_id: no session {session_id!r}")
        if (reason := self.sessions[session_id]) is not None:
            raise UserError(
                f"session_id: session {session_id!r} was finished ({reason}); a new ServiceClient makes one"
            )
        model_id = f"{session_id}:train:{seq}"
        if model_id in self.models:
            raise UserError(f"model_seq_id: {model_id!r} exists already")
        if len(self.models) >= self.max_clients:
            raise UserError(f"model_seq_id: {self.max_clients} training clients exist (tinker.max_clients)")
        return model_id

    async def create_model(self, model_id: str, rank: int, seed: int | None) -> Result:
        arrays = await self.thread.call(self.learner.new_adapter, rank, seed if seed is not None else 0)
        self.models[model_id] = TrainingModel(model_id, self.model_name, rank, arrays)
        return Result(json={"model_id": model_id, "type": "create_model"})

    def info(self, model_id: str) -> dict[str, Any]:
        tm = self.model(model_id)
        return {
            "type": "get_info",
            "model_id": model_id,
            "is_lora": True,
            "lora_rank": tm.rank,
            "model_name": self.model_name,
            "model_data": {"arch": "lora", "model_name": self.model_name, "tokenizer_id": self.tokenizer_path},
        }

    # --- training ----------------------------------------------------------------------------------------------------

    async def forward_backward(self, request: proto.ForwardBackwardIn, config: dict[str, float]) -> Result:
        tm = self.model(request.model_id)
        outputs, metrics = await self.thread.call(
            self.learner.forward_backward,
            tm,
            request.data,
            request.loss_fn,
            config,
            forward_only=request.forward_only,
        )
        return Result(proto=proto.encode_forward_backward_output(outputs, metrics))

    async def optim_step(self, model_id: str, params: AdamParams) -> Result:
        tm = self.model(model_id)
        metrics = await self.thread.call(self.learner.optim_step, tm, params)
        return Result(json={"type": "optim_step", "metrics": metrics})

    # --- checkpoints -------------------------------------------------------------------------------------------------

    def path_of(self, model_id: str, name: str) -> str:
        return f"tinker://{model_id}/weights/{name}"

    def resolve(self, path: str, field: str) -> Path:
        """tinker://MODEL_ID/weights/NAME -> STATE_DIR/MODEL_ID/NAME (names checked: no escaping the directory)."""
        parts = path.removeprefix("tinker://").split("/") if path.startswith("tinker://") else []
        if len(parts) != 3 or parts[1] != "weights" or not MODEL_ID.fullmatch(parts[0]) or not NAME.fullmatch(parts[2]):
            raise UserError(f"{field}: {path!r} is not a tinker://MODEL_ID/weights/NAME path of this server")
        return self.state_dir / parts[0] / parts[2]

    async def save_state(self, model_id: str, name: str) -> Result:
        tm = self.model(model_id)
        run_dir = self.state_dir / model_id / name
        config = self.learner.adapter_config(tm.rank)
        trainer_state = {"tinker": {"model_id": model_id, "base_model": tm.base_model, "rank": tm.rank}}
        await self.thread.call(self._write, run_dir, tm, config, trainer_state)
        return Result(json={"type": "save_weights", "path": self.path_of(model_id, name)})

    @staticmethod
    def _write(run_dir: Path, tm: TrainingModel, config: dict, trainer_state: dict) -> None:
        if run_dir.exists():  # one name holds one state: replace it whole
            shutil.rmtree(run_dir)
        write_checkpoint(
            run_dir,
            step=tm.step,
            version=tm.step,
            adapter=tm.arrays,
            adapter_config=config,
            optimizer_state=tm.optimizer_state(),
            trainer_state=trainer_state,
        )

    async def load_state(self, model_id: str, path: str, *, optimizer: bool, new: bool) -> Result:
        """Into an existing client, or (new) a new one made from the checkpoint."""
        run_dir = self.resolve(path, "path")
        try:
            checkpoint = await self.thread.call(read_checkpoint, run_dir)
        except (CheckpointError, OSError) as e:
            raise UserError(f"path: {path!r}: {e}") from None
        rank = int(checkpoint.adapter_config.get("lora_parameters", {}).get("rank", 0))
        if set(checkpoint.adapter) != set(self.learner.shapes):
            raise UserError(f"path: {path!r} holds an adapter of another layout than this model's")
        if new:
            self.models[model_id] = TrainingModel(model_id, self.model_name, rank, {})
        tm = self.model(model_id)
        tm.arrays, tm.rank, tm.grads = dict(checkpoint.adapter), rank, None
        if optimizer:
            if checkpoint.optimizer_state is None:
                raise UserError(f"path: {path!r} has no optimizer state")
            tm.load_optimizer_state(checkpoint.optimizer_state)
        else:
            tm.m, tm.v, tm.step = {}, {}, 0
        return Result(json={"type": "load_weights", "path": path, "model_id": model_id})

    # --- sampling ----------------------------------------------------------------------------------------------------

    def new_sampler(self, model_path: str | None, arrays: dict[str, mx.array] | None, version: int = 0) -> str:
        while len(self.samplers) >= MAX_SAMPLERS:
            del self.samplers[next(iter(self.samplers))]
        sampler_id = f"sampler-{next(self._serial)}-{uuid.uuid4().hex[:8]}"
        # base_model is the local directory: SamplingClient.get_tokenizer() loads it with no hub
        self.samplers[sampler_id] = Sampler(sampler_id, self.tokenizer_path, model_path, arrays, version)
        return sampler_id

    def sampler(self, sampler_id: str | None) -> Sampler:
        sampler = self.samplers.get(sampler_id or "")
        if sampler is None:
            raise UserError(f"sampling_session_id: no sampling session {sampler_id!r}")
        return sampler

    async def save_for_sampler(self, model_id: str, name: str | None, *, inflight: bool = False) -> Result:
        """A snapshot sampler of the client's weights as of now (arrays are immutable: no copy), or (inflight) a
        sampler that follows the client: every inflight save replaces the weights all its inflight samplers use,
        in the engine, between two decode steps (rows decoding go on with them: Tinker's contract, a request runs
        on the weights saved when its client was made or newer, with generation that may span updates)."""
        tm = self.model(model_id)
        tm.version += 1
        path = f"tinker://{model_id}/sampler_weights/{name or tm.version}"
        sampler_id = self.new_sampler(path, tm.arrays, tm.version)
        if inflight:
            tm.inflight, tm.inflight_version = tm.arrays, tm.version
            self.samplers[sampler_id].follows = model_id
            await self._inflight(tm, saved=True)
        else:
            await self._install(self.samplers[sampler_id])
        if name is not None:
            return Result(json={"type": "save_weights_for_sampler", "path": path})
        return Result(json={"type": "save_weights_for_sampler", "sampling_session_id": sampler_id})

    def _weights(self, sampler: Sampler) -> tuple[dict[str, mx.array] | None, int]:
        """What the sampler samples now, and its version."""
        tm = self.models.get(sampler.follows) if sampler.follows is not None else None
        if tm is not None and tm.inflight is not None:
            return tm.inflight, tm.inflight_version
        return sampler.arrays, sampler.version

    async def _install(self, sampler: Sampler) -> str:
        """The engine's adapter name for what the sampler samples, installed from memory on first use (again if
        the engine evicted it to make room)."""
        tm = self.models.get(sampler.follows) if sampler.follows is not None else None
        if tm is not None and tm.inflight is not None:
            return await self._inflight(tm)
        if sampler.arrays is None:
            return "base"
        async with self._installing:  # one install at a time: concurrent samples of a new sampler share it
            if sampler.adapter not in self.engine.adapters.names():
                name = f"tinker:{sampler.sampler_id}:{next(self._serial)}"
                await self._put(name, sampler.arrays, sampler.version)
                sampler.adapter = name  # an older one (evicted) is freed once idle
        return sampler.adapter

    async def _inflight(self, tm: TrainingModel, *, saved: bool = False) -> str:
        """The engine adapter of the client's inflight samplers: after an inflight save (`saved`) it is replaced in
        place, taking effect between two decode steps; put anew if the engine evicted it (or none exists yet)."""
        assert tm.inflight is not None
        async with self._installing:
            name = tm.inflight_adapter
            if name is not None and name in self.engine.adapters.names():
                if not saved:
                    return name
                try:
                    if await self.engine.adapters.replace(name, served(tm.inflight), tm.inflight_version):
                        return name
                except (ValueError, RuntimeError) as e:
                    raise UserError(f"model_id: the inflight weights could not be served: {e}") from None
            name = f"tinker:{tm.model_id}:inflight:{next(self._serial)}"
            await self._put(name, tm.inflight, tm.inflight_version)
            tm.inflight_adapter = name
            return name

    async def _put(self, name: str, arrays: dict[str, mx.array], version: int) -> None:
        try:
            await self.engine.adapters.put(name, served(arrays), version)
        except (AdapterError, EngineBusy) as e:
            raise UserError(str(e)) from None

    def sampler_from_path(self, model_path: str) -> dict[str, mx.array]:
        """The arrays a create_sampling_client(model_path) samples: a sampler save of this process, or a state."""
        for sampler in self.samplers.values():
            if sampler.model_path == model_path and sampler.arrays is not None:
                return sampler.arrays  # an inflight sampler's path names the weights of its save, as a snapshot
        run_dir = self.resolve(model_path, "model_path")
        try:
            return dict(read_checkpoint(run_dir).adapter)
        except (CheckpointError, OSError) as e:
            raise UserError(f"model_path: {model_path!r}: {e}") from None

    def generate_request(self, tokens: list[int], n: int, params: SamplingParams) -> GenerateRequest:
        """The engine request of a sample, checked before any work starts (RequestError naming the engine's
        field, which the route answers as a 400 naming its own: routes.SAMPLE_FIELDS)."""
        request = GenerateRequest(
            request_id=f"tinker-{uuid.uuid4().hex[:12]}", prompt_tokens=tokens, n=n, params=params
        )
        self.engine.check(request)
        return request

    async def sample(self, sampler_id: str | None, request: GenerateRequest, *, prompt_logprobs: bool) -> Result:
        sampler = self.sampler(sampler_id)
        tokens = request.prompt_tokens
        for attempt in (1, 2):  # the engine may drop an idle adapter to make room between install and admission
            try:
                rows = await self.engine.complete(
                    msgspec.structs.replace(request, adapter=await self._install(sampler))
                )
                break
            except AdapterNotFound as e:
                if attempt == 2:
                    raise UserError(str(e)) from None
            except (EngineBusy, RequestError) as e:
                raise UserError(str(e)) from None
        sequences = [
            proto.Sequence(
                proto.LENGTH if r.finish_reason == "length" else proto.STOP, r.tokens, r.logprobs, r.versions
            )
            for r in rows
        ]
        scored = None
        if prompt_logprobs:
            scored = await self.thread.call(self.learner.prompt_logprobs, self._weights(sampler)[0], tokens)
        return Result(proto=proto.encode_sample_response(sequences, scored))
