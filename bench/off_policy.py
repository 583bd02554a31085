"""The sampler's mismatch and what correcting it costs; the head in chunks and what it costs.

    HF_HUB_OFFLINE=1 python bench/off_policy.py     # the embedded model, config.yaml's settings
    python bench/off_policy.py --tiny               # the smoke test's tiny model

One default training step's rollout, sampled by the configured sampler (config.yaml: sampler.py's
bfloat16 copy), then on that same batch, side by side in this one process:

  1. the mismatch: the importance ratios r = pi_old / mu of the sampled tokens (pi_old: the
     float32 policy, mu: the sampler), per token and per sequence, and how many weights each
     mode would truncate or mask at TRL's cap (3) and verl's (2);
  2. the update (train_on_batch, learning rate 0 so every repeat sees the same weights) with
     train.importance_sampling_mode none vs each mode, alternating, medians and ratios;
  3. the log-prob pass (forward and backward with entropy) with the head all at once vs in
     chunks of train.logprob_chunk_size, at the batch's micro-batch and at 8 x 512 tokens.
"""

import argparse
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


def quantile(x: torch.Tensor, q: float) -> float:
    return float(torch.quantile(x.double(), q))


def mismatch_rows(batch, old) -> list[dict]:
    """The ratios' spread and the share each mode's cap changes."""
    mask = batch["completion_mask"] & batch["has_sampler"].unsqueeze(-1)
    d = (old - batch["sampler_logp"]) * mask  # [N, C] log r per token
    rows = []
    for level, logr in (("token", d[mask]), ("sequence", d.sum(-1)[batch["has_sampler"]])):
        r = logr.exp()
        rows.append({"what": f"ratio pi_old / mu per {level}", "n": r.numel(),
                     "min": float(r.min()), "p01": quantile(r, 0.01), "median": quantile(r, 0.5),
                     "p99": quantile(r, 0.99), "max": float(r.max()),
                     "share_above_2": float((r > 2).float().mean()),
                     "share_above_3": float((r > 3).float().mean())})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "off_policy.json"))
    args = ap.parse_args()
    cfg = infra.load_config(os.path.join(ROOT, "config.yaml"), [], ampo.Config, ("ghpo",))
    t, long_c = cfg.train, 512
    if args.tiny:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from conftest import make_tiny_model

        cfg.model.name_or_path, t.max_completion_length = make_tiny_model(tempfile.mkdtemp()), 8
        args.repeats, long_c, t.verifier_workers = 1, 16, 0
    torch.manual_seed(0)
    policy, tok = infra.load_model(cfg.model)
    model = infra.wrap_model(policy.train(), t)
    infra.attach_engine(policy, cfg, infra.model_path(cfg.model.name_or_path))
    data, _ = infra.load_dataset(os.path.join(ROOT, cfg.data.train_file), 4, workers=0)
    rows = data[:t.prompts_per_step]
    prompts = [infra.build_prompt(tok, r, cfg.data.prompt_template, cfg.data.system_prompt,
                                  cfg.data.example) for r in rows]
    rollout, _ = ampo.sample_groups(policy, tok, rows, prompts, cfg)
    batch = ampo.add_logprobs(ampo.build_batch(tok, rollout, t), policy, None, t)
    with torch.no_grad():  # pi_old, as the update computes it (under train.bf16's autocast)
        old = ampo.sequence_logprobs(model, batch, t.micro_batch_size, t.temperature)
    out = mismatch_rows(batch, old)

    # 2. The update with each correction, alternating, learning rate 0 (the schedule's base:
    # the scheduler sets each update's rate from it) so that every repeat sees the same weights.
    t.learning_rate = 0.0
    optimizer, scheduler = infra.make_optimizer(model, t)
    modes = ampo.IS_MODES
    times = {m: [] for m in modes}
    capped = {}
    for _ in range(args.repeats):
        for mode in modes:
            t.importance_sampling_mode = mode
            sec, m = common.timed(lambda: ampo.train_on_batch(model, optimizer, scheduler, batch,
                                                              t, cfg.ampo.shaping_gamma))
            times[mode].append(sec)
            capped[mode] = m["is_capped_frac"]
    base = common.median(times["none"])
    for mode in modes:
        out.append({"what": f"update, importance_sampling_mode {mode}",
                    "s": common.median(times[mode]), "ratio_to_none": common.median(
                        times[mode]) / base, "capped_frac_cap_3": capped[mode]})

    # 3. The log-prob pass, head all at once vs in chunks.
    N = t.micro_batch_size
    mb = infra.micro_batch(batch, slice(0, N))
    shapes = {f"{N} x {mb['completion_mask'].shape[1]} (a default micro-batch)":
              (mb["input_ids"], mb["attention_mask"], mb["completion_mask"].shape[1])}
    ids = torch.randint(0, policy.config.vocab_size, (N, 64 + long_c))
    shapes[f"{N} x {long_c}"] = (ids, torch.ones_like(ids), long_c)
    for name, (ids, attn, C) in shapes.items():
        times = {0: [], t.logprob_chunk_size: []}
        for _ in range(args.repeats):
            for chunk in times:
                def run():
                    logp, ent = ampo.completion_logprobs(model, ids, attn, C, t.temperature,
                                                         True, chunk)
                    (logp.sum() + ent.sum()).backward()

                times[chunk].append(common.timed(run)[0])
        model.zero_grad(set_to_none=True)
        base = common.median(times[0])
        for chunk, ts in times.items():
            out.append({"what": f"log-prob pass {name}, chunk {chunk or 'none'}",
                        "s": common.median(ts), "ratio_to_none": common.median(ts) / base})
    common.report("off_policy", out, args.out,
                  extra={"settings": {"sampler": t.sampler, "bf16": t.bf16,
                                      "temperature": t.temperature, "repeats": args.repeats,
                                      "logprob_chunk_size": t.logprob_chunk_size,
                                      "cap": t.importance_sampling_cap}})


if __name__ == "__main__":
    main()
