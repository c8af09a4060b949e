"""`paraloop run`: everything the run wires, in one room.

    main.py          the command line: arguments, the checks before loading, exit codes
    wiring.py        what the run builds (`build_parts`) and the task group that runs the actors (`run_actors`)
    preflight.py     what can be checked before anything loads (keys, paths, the model's config.json)
    setup.py         what is built before the actors start: model twins, trainer, rollout source
    fetcher.py       actor: rollout source -> buffer -> RolloutBatch for the learner
    buffer.py        the rollout buffer (batching, priority, the staleness rule)
    journal.py       fetched Atropos batches on disk until a checkpoint consumes them
    agent_sessions.py  rollouts from agents' own traffic: turns recorded by the HTTP routes, groups by reward
    session_routes.py  POST /v1/sessions/{id}/reward
    teacher.py       on-policy distillation: the teacher's log-probs on every batch, before the learner ([distill])
    learner.py       actor: RolloutBatch -> one GRPO step -> adapter, metrics, checkpoints
    publisher.py     actor: new adapter -> engine swap (and sync-mode credits for the fetcher)
    evaluator.py     actor: held-out evaluation of adapter versions on the serving engine ([eval] every_steps)
    checkpointer.py  actor: atomic checkpoints on its own thread
    monitor.py       actor: metrics to the reporters, alerts and the progress line
    reporters.py     where metrics go: metrics.jsonl and rollouts.jsonl, TensorBoard, W&B
    samples.py       readable rollout samples for the dashboard and rollouts.jsonl
    watchdog.py      liveness: a part with work that makes no progress (/health 503, stall_timeout)
    control.py       /control: the learner's pause/step/stop state machine and its routes, /metrics
    status.py        the run's shared status, read by /control/status, /metrics and the progress line
    ranks.py         a distributed run: the ranks' collectives on the learner's thread (start state, step decisions)
    peers.py         a distributed run: heartbeats between the ranks, deadlines, /ranks
    launch.py        `paraloop launch`: start the ranks of one distributed run (here or over ssh)

Each actor is one file: one inbox, one loop, returning at end of stream. Every module of the package, by layer:
docs/architecture.md, "Map".
"""
