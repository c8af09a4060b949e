"""The evaluator actor: adapter versions in, held-out evaluations (EvalFinished) out to the monitor.

Inbox: the adapter version now serving, after every swap (from the publisher) and after a step that published
nothing (from the learner, sync mode). A version that reaches a multiple of eval.every_steps is evaluated on the
task's held-out prompts through the serving engine (evaluation.py); at the end of the stream the last version is
evaluated once more unless it already was. `evaluate_now` evaluates the starting adapter before any rollout.

In sync mode the evaluator sits on the rollout credit path (publisher -> evaluator -> fetcher): the fetcher's credit
for the next rollout goes on only after the evaluation, so nothing else generates while it runs and the numbers
equal a standalone `paraloop eval` of the same checkpoint. After the last step, or once the run is stopping, no
credit goes on (no rollout is wasted, none runs beside the final evaluation). In async mode rollouts keep
generating beside it and the learner waits at most one step. Returns at end of stream, closing what it sends on.
"""

import logging
from collections.abc import Callable
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream

from paraloop.engine import EngineBusy
from paraloop.evaluation import EvalPlan, evaluate, headline_keys
from paraloop.messages import EvalFinished
from paraloop.run.status import RunStatus

log = logging.getLogger("paraloop.eval")


class Evaluator:
    def __init__(
        self,
        engine: Any,
        tokenizer: Any,
        plan: EvalPlan,
        *,
        every: int,
        status: RunStatus,
        step: Callable[[], int],
        total_steps: int,
        results: ObjectSendStream[EvalFinished],
    ) -> None:
        self.engine, self.tokenizer, self.plan = engine, tokenizer, plan
        self.every, self.status, self.step, self.total_steps = every, status, step, total_steps
        self.results = results
        self.evaluated: int | None = None  # the last version evaluated

    async def evaluate_now(self, version: int) -> None:
        """Evaluate the adapter the engine serves now (as `version`) and send the result to the monitor."""
        try:
            result = await evaluate(self.engine, self.tokenizer, self.plan)
        except EngineBusy as e:  # HTTP clients fill the engine's queue: skip this one, training goes on
            log.warning("evaluation of version %d skipped: %s", version, e)
            self.status.alerts["eval"] = f"evaluation of version {version} skipped: {e}"
            return
        self.evaluated = version
        self.status.alerts.pop("eval", None)
        headline = ", ".join(f"{k} {result.metrics[k]:.4f}" for k in headline_keys(result.metrics))
        log.debug("eval v%d: %s", version, headline)
        await self.results.send(
            EvalFinished(step=self.step(), version=version, task=self.plan.task.name, metrics=result.metrics)
        )

    def _finishing(self) -> bool:
        return self.step() >= self.total_steps or self.status.stopping

    async def run(self, inbox: ObjectReceiveStream[int], forward: ObjectSendStream[int] | None) -> None:
        latest = None
        async with inbox, self.results:
            try:
                async for version in inbox:
                    latest = version
                    due = version % self.every == 0 and (self.evaluated is None or version > self.evaluated)
                    if due and not self._finishing():  # the final evaluation runs once, at the end
                        await self.evaluate_now(version)
                    if forward is not None and not self._finishing():
                        try:
                            await forward.send(version)
                        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                            forward = None  # the fetcher is done
                if latest is not None and (self.evaluated is None or latest > self.evaluated):
                    await self.evaluate_now(latest)
            finally:
                if forward is not None:
                    forward.close()
