"""paraloop: on-policy GRPO for LLMs on MLX, serving and training in one process."""

from paraloop.blas import preload_openblas

preload_openblas()  # must run before anything imports mlx.core

__version__ = "0.1.0"
