"""One rank of tests/test_distributed_run.py's trainer check (run as MLX_RANK=r MLX_HOSTFILE=... python this.py
MODEL): for each loss option, each rank makes its part of every batch, the parts are exchanged as a run exchanges
them (Ranks.gather + ranks.merge), the rank trains its share over MLX's ring backend, and at the end every rank's
adapter must be bitwise rank 0's and rank 0's must equal one process stepping through the same whole batches.
Prints one JSON line per option: {"case", "rank", "digest", "max_diff" (rank 0), "reduce_calls"}."""

import json
import sys

import paraloop  # noqa: F401  (OpenBLAS before mlx)

# isort: split
import msgspec
import numpy as np

from paraloop.distributed import Ranks, digest
from paraloop.learn import Trainer
from paraloop.lora import adapter_config
from paraloop.messages import RolloutBatch
from paraloop.model import load_model, twin
from paraloop.run.ranks import merge
from support.trainers import CASES, make_config, random_batch

STEPS = 2


def new_trainer(base, config) -> Trainer:
    model = twin(base)
    return Trainer(model, config=config, adapter_config=adapter_config(config.lora, model))


def main() -> None:
    ranks = Ranks.connect("ring")
    base, _, _, _ = load_model(sys.argv[1])
    for case in sys.argv[2:]:
        options = {k: v for k, v in CASES[case].items() if k != "inference"}  # here every other step has them
        config = make_config(**{"kl_beta": 0.0, "token_budget": 64, **options})
        trainer = new_trainer(base, config)
        trainer.reducer = ranks
        seq_before = ranks.seq
        batches = []
        for step in range(STEPS):
            part = random_batch(1000 * step + ranks.rank, groups=2 + ranks.rank, size=4, inference=step % 2 == 1)
            blobs = ranks.gather(msgspec.msgpack.encode(part), "rollouts")
            batch = merge([msgspec.msgpack.decode(b, type=RolloutBatch) for b in blobs if b])
            trainer.step(batch)
            batches.append(batch)
        mine = digest(trainer.adapter())
        differ, _ = ranks.differing(mine)
        line = {
            "case": case,
            "rank": ranks.rank,
            "digest": mine,
            "differ": differ,
            "collectives": ranks.seq - seq_before,
        }
        if ranks.is_root:
            one = new_trainer(base, config)
            for batch in batches:
                one.step(batch)
            ours, theirs = trainer.adapter(), one.adapter()
            line["max_diff"] = max(float(np.abs(np.array(ours[k]) - np.array(theirs[k])).max()) for k in ours)
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
