"""Run by tests/test_distributed.py, once as one process and once under torchrun (gloo, CPU).

    python tests/distributed_worker.py step MODEL_DIR OUT LOSS_TYPE PARALLELISM
    python -m torch.distributed.run --nproc_per_node=2 tests/distributed_worker.py step ...

`step`: one train_on_batch on a fixed global batch of 2 groups x 4 answers of different
lengths, each rank taking its contiguous share (one group each), with SGD at learning rate 1,
so the weights after the step are the weights before it minus the gradient. The updated
weights and the step's metrics go to the checkpoint folder OUT/checkpoint-1.
"""

import os
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
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "completion_mask": completion_mask, "off_policy_mask": off[:, None] & completion_mask,
            "advantages": ampo.group_advantages(rewards, 4), "old_logp": None, "ref_logp": None}


def step(model_dir: str, out: str, loss_type: str, parallelism: str):
    rank, world = infra.init_distributed()
    policy, tokenizer = infra.load_model(ampo.ModelConfig(name_or_path=model_dir))
    cfg = ampo.TrainConfig(loss_type=loss_type, parallelism=parallelism, num_minibatches=1,
                           micro_batch_size=2, max_grad_norm=1e9, max_completion_length=8,
                           entropy_coeff=0.01)
    batch = global_batch(policy.config.vocab_size)
    share = 8 // world  # this rank's rows: whole groups
    batch = {k: (v[rank * share:(rank + 1) * share] if v is not None else None)
             for k, v in batch.items()}
    model = infra.wrap_model(policy, cfg)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda u: 1.0)
    metrics = ampo.train_on_batch(model, optimizer, scheduler, batch, cfg, gamma=0.1)
    # The updated weights go through the trainer's own checkpoint writer, which gathers FSDP2
    # shards into full tensors: one process and two must write the same files.
    infra.save_checkpoint(out, 1, policy, tokenizer, optimizer, scheduler, ampo.Config(),
                         {"metrics": metrics}, {}, keep_last=0)


if __name__ == "__main__":
    step(*sys.argv[2:])
