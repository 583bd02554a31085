"""Run by tests/test_distributed.py, once as one process and once under torchrun (gloo, CPU).

    python tests/distributed_worker.py step MODEL_DIR OUT LOSS_TYPE PARALLELISM SHARED_PROMPT
    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py step ...
    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py guide DIR OUT
    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py nan JSON
    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py evaluate ...

`step`: one train_on_batch on a fixed global batch of 2 groups x 4 answers of different
lengths, each rank taking its contiguous share (one group each), with SGD at learning rate 1,
so the weights after the step are the weights before it minus the gradient; SHARED_PROMPT
(1 or 0) sets train.shared_prompt, each group's prompt run once or per answer. The updated
weights and the step's metrics go to the checkpoint folder OUT/checkpoint-1.

`guide`: apply_guidance under FSDP2 with one group per rank, where only rank 0's group needs
teachers (all wrong) and rank 1's does not (one right): rank 0 scores its candidates while rank
1 has nothing to score. Each rank writes its metrics to OUT/rank<r>.json.

`evaluate`: ampo.evaluate of an official-schema test file with several data sources, each
rank answering its contiguous share with a scripted policy (answer j to a question is right
iff j < the count PLAN gives it; the verifier is the real one). Rank r writes OUT/rank<r>.json.

`nan`: a whole training run (ampo.train, DDP) whose advantages are all NaN, so that every
update is skipped by the non-finite guard on every rank at once.
"""

import json
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ampo  # noqa: E402
import infra  # noqa: E402


def global_batch(vocab: int) -> dict:
    """2 prompts x G=4: prompt lengths 3 and 5, completion lengths 1 to 7, one teacher row."""
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (3,), generator=g).tolist()] * 4 + \
              [torch.randint(3, vocab, (5,), generator=g).tolist()] * 4
    lengths = [1, 4, 7, 2, 6, 3, 5, 7]
    completions = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    input_ids, attention_mask, completion_mask = ampo.pad_sequences(prompts, completions, 0)
    rewards = torch.tensor([0.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    off = torch.tensor([False, True, False, False, False, False, False, False])
    group_len = completion_mask.sum(-1).float().view(2, 4).mean(-1).repeat_interleave(4)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "group_len": group_len,
            "completion_mask": completion_mask, "off_policy_mask": off[:, None] & completion_mask,
            "group": torch.arange(2).repeat_interleave(4),
            "advantages": ampo.group_advantages(rewards, 4), "old_logp": None, "ref_logp": None,
            "sampler_logp": torch.zeros(completion_mask.shape), "has_sampler": torch.zeros(8) > 0}


def step(model_dir: str, out: str, loss_type: str, parallelism: str, shared: str):
    rank, world = infra.init_distributed()
    policy, tokenizer = infra.load_model(ampo.ModelConfig(name_or_path=model_dir))
    cfg = ampo.TrainConfig(loss_type=loss_type, parallelism=parallelism, num_minibatches=1,
                           micro_batch_size=2, max_grad_norm=1e9, max_completion_length=8,
                           entropy_coeff=0.01, shared_prompt=shared == "1")
    batch = global_batch(policy.config.vocab_size)
    share = 8 // world  # this rank's rows: whole groups
    batch = {k: (v[rank * share:(rank + 1) * share] if v is not None else None)
             for k, v in batch.items()}
    model = infra.wrap_model(policy, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    metrics = ampo.train_on_batch(model, optimizer, scheduler, batch, cfg, 0.1, world,
                                  infra.all_sum)
    # The updated weights go through the trainer's own checkpoint writer, which gathers FSDP2
    # shards into full tensors: one process and two must write the same files.
    infra.save_checkpoint(out, 1, policy, tokenizer, optimizer, scheduler, ampo.Config(),
                         {"metrics": metrics}, {}, keep_last=0)


def guide(model_dir: str, out: str):
    rank, world = infra.init_distributed()
    policy, tokenizer = infra.load_model(ampo.ModelConfig(name_or_path=model_dir))
    cfg = ampo.Config()
    cfg.train.num_generations, cfg.train.max_completion_length = 4, 64
    cfg.ampo.comprehension_batch_size = 1  # rank 0 runs 2 scoring forwards, rank 1 none
    cfg.train.parallelism = "fsdp"
    row = {"problem": f"What is {rank} + 2?", "messages": None, "answer": str(rank + 2),
           "solution": None, "teachers": [("short", f"\\boxed{{{rank + 2}}}"),
                                          ("long", f"{rank} plus 2 is \\boxed{{{rank + 2}}}")]}
    prompts = [infra.build_prompt(tokenizer, row, cfg.data.prompt_template, None)]
    correct = [False] * 4 if rank == 0 else [False, True, False, False]
    rollout = {"completions": [[7]] * 4, "rewards": [float(c) for c in correct],
               "correct": correct, "off_policy": [False] * 4, "truncated": [False] * 4,
               "source": ["policy"] * 4, "texts": ["x"] * 4,
               "sampler_logp": [None] * 4}
    model = infra.wrap_model(policy, cfg.train)
    metrics = ampo.apply_guidance(rollout, [row], prompts, model, tokenizer, cfg,
                                  random.Random(0), infra.lockstep_fn(model))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"metrics": metrics, "off_policy": rollout["off_policy"]}, f)


def evaluate(model_dir: str, path: str, plan_json: str, out: str):
    rank, world = infra.init_distributed()
    model, tok = infra.load_model(ampo.ModelConfig(name_or_path=model_dir))
    plan = json.loads(plan_json)  # {question: [gold, right answers of 4]}

    def scripted(model, tokenizer, prompts, n, max_new, temperature=1.0, top_p=1.0):
        out = []
        for p in prompts:
            gold, c = next(v for q, v in plan.items() if q in p)
            out += [tok(f"\\boxed{{{gold if j < c else -1}}}", add_special_tokens=False)
                    ["input_ids"] + [tok.eos_token_id] for j in range(n)]
        return out, [False] * len(out), [None] * len(out)

    ampo.generate = scripted
    cfg = ampo.Config()
    cfg.train.verifier_workers, cfg.eval.pass_k, cfg.eval.prompts_per_batch = 0, [1, 2, 4], 2
    result = ampo.evaluate(model, tok, cfg, path, rank, world, infra.all_sum)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def nan(config_json: str):
    cfg = ampo.Config()
    for section, values in json.loads(config_json).items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    ampo.group_advantages = lambda rewards, group_size, scale_by_std=False: torch.full(
        (len(rewards),), float("nan"))
    ampo.train(cfg)


if __name__ == "__main__":
    {"step": step, "guide": guide, "nan": nan, "evaluate": evaluate}[sys.argv[1]](*sys.argv[2:])
    infra.finish_distributed()
    if sys.argv[1] == "guide" or sys.argv[1:6:4] == ["step", "fsdp"]:
        # FSDP2 keeps the group alive (infra.finish_distributed): its gloo threads would still
        # run when Python shuts down, so this process ends here, its files already closed.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    # Otherwise the group is freed and its threads joined: none can abort the exit.
    left = [t for t in os.listdir("/proc/self/task")  # the threads' names (Linux)
            if "gloo" in open(f"/proc/self/task/{t}/comm").read()]
    assert not left, f"{len(left)} gloo threads still running after finish_distributed"
