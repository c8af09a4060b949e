"""The GRPO learner: Atropos-convention batches in, LoRA (or full) weight updates out.

batch.py (collate + validate) -> advantages.py -> loss.py / algorithms.py (pure math) -> optim.py -> trainer.py
(the synchronous Trainer the learner actor drives from its own thread).
"""

from paraloop.learn.algorithms import ALGORITHMS, Algorithm, get_algorithm, register
from paraloop.learn.batch import TokenBatch, collate, plan_micro_batches, validate_group
from paraloop.learn.trainer import StepResult, Trainer

__all__ = [
    "ALGORITHMS",
    "Algorithm",
    "StepResult",
    "TokenBatch",
    "Trainer",
    "collate",
    "get_algorithm",
    "plan_micro_batches",
    "register",
    "validate_group",
]
