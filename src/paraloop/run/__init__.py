"""`paraloop run`: everything the run wires, in one room.

    main.py          the CLI and the task group that runs the actors
    setup.py         what is built before they start: model twins, trainer, rollout source
    fetcher.py       actor: rollout source -> buffer -> RolloutBatch for the learner
    buffer.py        the rollout buffer (batching, priority, the staleness rule)
    learner.py       actor: RolloutBatch -> one GRPO step -> adapter, metrics, checkpoints
    publisher.py     actor: new adapter -> engine swap (and sync-mode credits for the fetcher)
    checkpointer.py  actor: atomic checkpoints on its own thread
    monitor.py       actor: metrics.jsonl and the progress line
    control.py       /control: the learner's pause/step/stop state machine and its routes, /metrics
    status.py        the run's shared status, read by /control/status, /metrics and the progress line

Each actor is one file: one inbox, one loop, returning at end of stream.
"""
