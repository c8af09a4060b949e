"""A Tinker SDK RL loop (the shape of tinker-cookbook's recipes/rl_loop.py) against a local `paraloop tinker`.

Only the official `tinker` SDK talks to the server; paraloop is imported for the reward task alone (the built-in
`one_word` task: "Name a {category}. Answer with one word only."), so the loop is what any Tinker program does:
sample a group per prompt from the latest weights, advantages = reward - group mean, `importance_sampling`
forward_backward, `optim_step`, a new sampling client. Each step prints one line (reward mean, loss, seconds) and
appends it to --out as JSON. From the repository root, with models/smollm2 built (`make demo` does it):

    paraloop tinker --model-path models/smollm2 --port 8000 &
    python examples/tinker_rl.py --url http://127.0.0.1:8000 --base-model models/smollm2 --steps 20
"""

import argparse
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import tinker
from tinker import types

from paraloop.envs.tasks import Sample, load_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--base-model", required=True, help="the server's --model-path")
    parser.add_argument("--task", default="paraloop.envs.tasks:one_word")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=8, help="samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2.5e-4, help="the rate of the recorded run (docs/tinker.md)")
    parser.add_argument("--out", type=Path, default=Path("runs/tinker-rl/metrics.jsonl"))
    args = parser.parse_args()

    task = load_task(args.task)
    # the key: TINKER_API_KEY (any tml-... key; the server's control token when it has one)
    service = tinker.ServiceClient(base_url=args.url, api_key=os.environ.get("TINKER_API_KEY", "tml-local"))
    trainer = service.create_lora_training_client(base_model=args.base_model, rank=args.rank).result()
    tokenizer = trainer.get_tokenizer()
    params = types.SamplingParams(max_tokens=args.max_tokens, temperature=1.0)
    sampler = trainer.save_weights_and_get_sampling_client().result()
    rng = random.Random(0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"{'step':>4} {'reward':>7} {'loss':>9} {'s':>6}")
    for step in range(args.steps):
        start = time.monotonic()
        chats = [task.prompt(rng) for _ in range(args.prompts)]
        texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
        prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
        futures = [
            sampler.sample(types.ModelInput.from_ints(p), num_samples=args.group, sampling_params=params)
            for p in prompts
        ]
        data, rewards = [], []
        for chat, prompt, future in zip(chats, prompts, futures, strict=True):
            seqs = future.result().sequences
            group = [
                task.reward(
                    Sample(
                        prompt=chat,
                        text=tokenizer.decode(s.tokens, skip_special_tokens=True),
                        finish_reason=s.stop_reason,
                        tokens=s.tokens,
                    )
                )
                for s in seqs
            ]
            rewards += group
            for seq, reward in zip(seqs, group, strict=True):
                full, pad = prompt + seq.tokens, len(prompt) - 1
                advantage = reward - float(np.mean(group))
                data.append(
                    types.Datum(
                        model_input=types.ModelInput.from_ints(full[:-1]),
                        loss_fn_inputs={
                            "target_tokens": full[1:],
                            "logprobs": [0.0] * pad + seq.logprobs,
                            "advantages": [0.0] * pad + [advantage] * len(seq.tokens),
                        },
                    )
                )
        loss = trainer.forward_backward(data, "importance_sampling").result().metrics["loss:sum"]
        trainer.optim_step(types.AdamParams(learning_rate=args.lr)).result()
        sampler = trainer.save_weights_and_get_sampling_client().result()
        line = {"step": step, "reward_mean": float(np.mean(rewards)), "loss": loss, "seconds": time.monotonic() - start}
        print(f"{step:>4} {line['reward_mean']:>7.3f} {loss:>9.3f} {line['seconds']:>6.1f}", flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
