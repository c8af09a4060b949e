"""Rollout sources built into paraloop: reward tasks and the mock environment that drives them through the engine."""

from paraloop.envs.mock import MockEnvironment, scored_group
from paraloop.envs.tasks import Sample, Task, load_task

__all__ = ["MockEnvironment", "Sample", "Task", "load_task", "scored_group"]
