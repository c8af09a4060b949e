"""Local Tinker: the Tinker training API (the official `tinker` SDK's routes) served by paraloop's engine and
learner in one process. See docs/tinker.md; `paraloop tinker` is the command."""
