"""The prompt once per group (train.shared_prompt) vs every answer reading its own copy.

    HF_HUB_OFFLINE=1 python bench/shared_prompt.py                 # config.yaml's default step
    HF_HUB_OFFLINE=1 python bench/shared_prompt.py --regime hard   # compare.py's hard regime
    python bench/shared_prompt.py --tiny                           # the smoke test's tiny model

One training step's rollout, sampled as configured, then on that same batch, side by side in
this one process, alternating: the update as it was before (the padded batch, the vocabulary
head over every completion column, the padding after shorter answers included: the completion
columns' attention mask set to 1, which changes no real token's log-prob under the causal
mask; no gradient checkpointing; the weights cast to bfloat16 in every pass, not once per
micro-batch: infra.bf16_once; PyTorch's sdpa attention), train.shared_prompt false (the padded
batch; the head over real tokens only) and true (the default), both as configured (config.yaml's
model.gradient_checkpointing; eager attention under train.bf16 with it on a CPU: infra.wrap_model),
and the default with each other lever undone: checkpointing toggled (attention kept as it is),
bf16_once off, sdpa:

  1. the update (train_on_batch, learning rate 0 so that every repeat sees the same weights),
     and the no-grad log-prob pass a pi_old or reference model takes (sequence_logprobs);
     under train.bf16 (the default) the paths' log-probs differ by bfloat16's rounding, as
     the padded batch's do between micro-batch sizes (0.30 at most on the default's batch);
  2. the whole step: the rollout's measured time (sampling, rewards: the same for every path)
     plus each path's update;
  3. how far the log-probs are from the first path's (max |difference|), the tokens each forward
     reads, and one AdamW step alone (the part of the update neither path changes).
"""

import argparse
import contextlib
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import ampo  # noqa: E402
import common  # noqa: E402
import infra  # noqa: E402

REGIMES = {"default": [], "hard": ["--data.train_file=data/train_hard.jsonl"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--regime", choices=REGIMES, default="default")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", help="config overrides, e.g. --train.micro_batch_size=16")
    args, extra = ap.parse_known_args()
    out_file = args.out or os.path.join(ROOT, "bench", "results", f"shared_prompt_{args.regime}.json")
    cfg = infra.load_config(os.path.join(ROOT, "config.yaml"), REGIMES[args.regime] + extra, ampo.Config,
                            ("ghpo",))
    t = cfg.train
    if args.tiny:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from conftest import make_tiny_model

        cfg.model.name_or_path, t.max_completion_length = make_tiny_model(tempfile.mkdtemp()), 8
        args.repeats, t.verifier_workers, t.bf16 = 1, 0, False  # float32: the paths must agree
    torch.manual_seed(0)
    policy, tok = infra.load_model(cfg.model)
    model = infra.wrap_model(policy.train(), t)
    infra.attach_engine(policy, cfg, infra.model_path(cfg.model.name_or_path))
    data, _ = infra.load_dataset(os.path.join(ROOT, cfg.data.train_file), 4, workers=0)
    rows = data[:t.prompts_per_step]
    prompts = [infra.build_prompt(tok, r, cfg.data.prompt_template, cfg.data.system_prompt,
                                  cfg.data.example) for r in rows]
    rollout_s, (rollout, _) = common.timed(lambda: ampo.sample_groups(policy, tok, rows, prompts,
                                                                      cfg))
    batch = ampo.add_logprobs(ampo.build_batch(tok, rollout, t), policy, None, t)

    # 1. The update and the no-grad pass, each path in turn, learning rate 0 (the scheduler's
    # base: it sets each update's rate from it) so that every repeat sees the same weights.
    t.learning_rate = 0.0
    optimizer, scheduler = infra.make_optimizer(model, t)
    real_head = ampo.completion_logprobs

    def head_over_every_column(model, input_ids, attention_mask, num_completion, *a, **k):
        attention_mask = attention_mask.clone()
        attention_mask[:, -num_completion:] = 1  # the head reads the padding too, as before
        return real_head(model, input_ids, attention_mask, num_completion, *a, **k)

    # path: (shared prompt, head, gradient checkpointing, infra.bf16_once, attention)
    ckpt, attention = cfg.model.gradient_checkpointing, policy.config._attn_implementation
    paths = {"before (padded, head over every column)": (False, head_over_every_column, False,
                                                         False, "sdpa"),
             "padded (shared_prompt false)": (False, real_head, ckpt, True, attention),
             "shared (shared_prompt true, default)": (True, real_head, ckpt, True, attention),
             f"shared, gradient checkpointing {'off' if ckpt else 'on'}": (True, real_head, not ckpt,
                                                                         True, attention),
             "shared, weights cast in every pass (no bf16_once)": (True, real_head, ckpt, False,
                                                                   attention),
             "shared, sdpa attention": (True, real_head, ckpt, True, "sdpa")}
    if attention == "sdpa":  # train.bf16 false or a GPU: the default is sdpa already
        paths.pop("shared, sdpa attention")
    update, nograd, logp = ({p: [] for p in paths} for _ in range(3))
    bf16_once = infra.bf16_once
    for _ in range(args.repeats):
        for name, (shared, head, checkpointing, once, attn) in paths.items():
            t.shared_prompt, ampo.completion_logprobs = shared, head
            infra.bf16_once = bf16_once if once else (lambda cfg: contextlib.nullcontext())
            policy.set_attn_implementation(attn)
            if checkpointing:
                policy.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                policy.gradient_checkpointing_disable()
            update[name].append(common.timed(lambda: ampo.train_on_batch(
                model, optimizer, scheduler, batch, t, cfg.ampo.shaping_gamma))[0])
            sec, lp = common.timed(lambda: ampo.sequence_logprobs(
                model, batch, t.micro_batch_size, t.temperature, t.logprob_chunk_size, shared))
            nograd[name].append(sec)
            logp[name] = lp
    ampo.completion_logprobs, infra.bf16_once = real_head, bf16_once
    policy.set_attn_implementation(attention)

    # Where the rest of the update goes: the optimizer (AdamW over every parameter, the same for
    # both paths), timed alone on zero gradients.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    adam_s = common.median([common.timed(optimizer.step)[0] for _ in range(args.repeats)])
    optimizer.zero_grad(set_to_none=True)

    # 3. What each forward reads: N rows of P + C columns, or g prompts of P plus N x C answers.
    N, C = batch["completion_mask"].shape
    P = batch["input_ids"].shape[1] - C
    real_p = batch["attention_mask"][:, :P].sum(-1)  # [N] each row's prompt tokens
    real_c = batch["completion_mask"].sum(-1)  # [N]
    G = t.num_generations
    tokens = {False: int(real_p.sum() + real_c.sum()), True: int(real_p[::G].sum() + real_c.sum())}
    base_u, base_n = (common.median(x[next(iter(paths))]) for x in (update, nograd))
    out = []
    for name, (shared, head, *_) in paths.items():
        u, n = common.median(update[name]), common.median(nograd[name])
        out.append({"path": name, "update_s": u, "update_ratio": u / base_u,
                    "nograd_pass_s": n, "nograd_ratio": n / base_n,
                    "step_s": rollout_s + u, "step_ratio": (rollout_s + u) / (rollout_s + base_u),
                    "tokens_read": tokens[shared],
                    "head_tokens": N * C if head is head_over_every_column else int(real_c.sum())})
    m = batch["completion_mask"]
    lps = list(logp.values())
    diff = max(float(((lp - lps[0]) * m).abs().max()) for lp in lps[1:])
    print(f"rollout {rollout_s:.1f} s; {N} rows, prompt {P} columns ({float(real_p.float().mean()):.0f}"
          f" real tokens a row), answers {float(real_c.float().mean()):.0f}; max |logp - before's|"
          f" {diff:.2e}; one AdamW step {adam_s:.2f} s")
    common.report("shared_prompt", out, out_file, extra={
        "settings": {"regime": args.regime, "prompts_per_step": t.prompts_per_step,
                     "num_generations": G, "micro_batch_size": t.micro_batch_size,
                     "bf16": t.bf16, "gradient_checkpointing": cfg.model.gradient_checkpointing,
                     "repeats": args.repeats},
        "rollout_s": rollout_s, "optimizer_step_s": adam_s, "num_rows": N, "prompt_columns": P,
        "prompt_tokens_mean": float(real_p.float().mean()),
        "answer_tokens_mean": float(real_c.float().mean()), "max_abs_logp_diff": diff})


if __name__ == "__main__":
    main()
