"""Does torch.compile speed up one decode step of sampler.py's CPU decode loop?

    HF_HUB_OFFLINE=1 python bench/decode_compile.py             # the embedded model, 16 x 120
    HF_HUB_OFFLINE=1 python bench/decode_compile.py --modes default,max-autotune-no-cudagraphs
    python bench/decode_compile.py --tiny                       # the smoke test's tiny model

The rollout engine (sampler.make_sampler: a bfloat16 copy, eager attention, a DynamicCache)
spends nearly all of a rollout in decode steps: a forward of [B, 1] tokens against the cache,
then sample_next. This times that step as the loop runs it, eager vs the model's forward under
torch.compile(dynamic=True), one variant after the other in this one process:

  --batch rows (16: the default step's 2 prompts x 8 answers) share a random prompt of
  --prompt-len tokens, read once by the eager forward into a fresh DynamicCache; then --steps
  decode steps, the first --warmup of them timed together as warmup_s (compiling happens
  there), the rest one by one: ms_per_decode_step is their median, ratio_to_eager its ratio.

The cache grows by one position a step, so a compiled forward sees a new key length every call,
hence dynamic=True. Even so dynamo first compiles step 0 with the cache's length fixed and
recompiles once, dynamic, at step 1 (its guard on past_key_values.layers[0].keys): warm-up must
span 2 steps or more. unique_graphs counts the graphs made, new_graphs_timed those made after
warm-up (recompiles in the timed steps), graph_breaks the falls back to Python. Inductor keeps
compiled kernels on disk (/tmp/torchinductor_$USER), so a repeat run's warmup_s is shorter than
the first, cold one. max_abs_logit_diff compares step 0's logits (same cache, same tokens) with
eager's: bfloat16 keeps ~3 digits and a compiled kernel may sum in another order, so they
match within TOLERANCE x max(1, max |eager logits|). No row stops here, so the batch is fixed
(the real loop drops finished rows). A variant that fails to compile (no C++ compiler, an
inductor error) is a row with its error, and the JSON is still written.
"""

import argparse
import os
import sys
import tempfile

import torch
from transformers import DynamicCache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import ampo  # noqa: E402
import common  # noqa: E402
import infra  # noqa: E402
import sampler  # noqa: E402

TOLERANCE = 2**-5  # 8 bfloat16 steps (eps 2^-8) of the largest logit


def dynamo_counts() -> dict:
    """Graphs made and graph breaks so far; {} where this torch keeps no such counters."""
    try:
        from torch._dynamo.utils import counters

        return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
                "graph_breaks": int(sum(counters["graph_break"].values()))}
    except Exception:  # private API: never worth a crash
        return {}


def decode(engine, forward, args, cfg):
    """(seconds of the first `warmup` steps, [seconds of each later step], first-step logits,
    dynamo counts after warm-up) for `steps` decode steps after an eager prefill."""
    torch.manual_seed(0)  # the same prompt and the same sampled tokens for every variant
    B, P, T, top_p = args.batch, args.prompt_len, cfg.train.temperature, cfg.train.top_p
    ids = torch.randint(engine.config.vocab_size, (B, P))  # [B, P]
    mask = torch.ones(B, P, dtype=torch.long)  # [B, P] no padding: one shared prompt
    cache = DynamicCache(config=engine.config)
    with torch.inference_mode():
        # The prefill stays eager: it runs once per rollout, the decode step hundreds of times.
        logits = engine(input_ids=ids, attention_mask=mask, past_key_values=cache,
                        logits_to_keep=1).logits[:, -1]  # [B, V]
        positions = torch.full((B, 1), P - 1)  # [B, 1]
        tokens, _ = sampler.sample_next(logits, T, top_p)
        first, warm, times, counts = None, 0.0, [], {}
        for step in range(args.steps):
            mask = torch.cat([mask, mask.new_ones((B, 1))], dim=-1)  # [B, L + 1]
            positions = positions + 1

            def one():
                out = forward(input_ids=tokens.unsqueeze(-1), attention_mask=mask,
                              position_ids=positions, past_key_values=cache).logits[:, -1]
                return out, sampler.sample_next(out, T, top_p)[0]  # [B, V], [B]

            dt, (logits, tokens) = common.timed(one)
            if step == 0:
                first = logits.float().clone()
            if step < args.warmup:
                warm += dt
            else:
                times.append(dt)
            if step == args.warmup - 1:
                counts = dynamo_counts()
    return warm, times, first, counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=120)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--warmup", type=int, default=3, help="first steps, compiling included")
    ap.add_argument("--modes", default="default",
                    help="comma-separated torch.compile modes after eager, e.g. "
                         "default,max-autotune-no-cudagraphs (compiles for much longer)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "decode_compile.json"))
    args = ap.parse_args()
    cfg = infra.load_config(os.path.join(ROOT, "config.yaml"), [], ampo.Config, ("ghpo",))
    if args.tiny:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from conftest import make_tiny_model

        cfg.model.name_or_path = make_tiny_model(tempfile.mkdtemp())
        args.batch, args.prompt_len, args.steps = 4, 8, 10
    policy, _ = infra.load_model(cfg.model)
    engine = sampler.make_sampler(policy.eval(), bf16=cfg.train.bf16)
    rows, eager_ms, eager_logits = [], None, None
    for mode in ["eager"] + [m for m in args.modes.split(",") if m]:
        row = {"method": mode if mode == "eager" else f"compile dynamic=True, mode {mode}"}
        try:
            if mode == "eager":
                forward = engine.forward
            else:
                torch._dynamo.reset()  # a fresh compile per mode (counters cleared below)
                getattr(torch._dynamo.utils, "counters", {}).clear()
                forward = torch.compile(engine.forward, dynamic=True,
                                        mode=None if mode == "default" else mode)
            warm, times, logits, counts = decode(engine, forward, args, cfg)
            ms = 1e3 * common.median(times)
            eager_ms = eager_ms or ms
            eager_logits = logits if eager_logits is None else eager_logits
            diff = float((logits - eager_logits).abs().max())
            tol = TOLERANCE * max(1.0, float(eager_logits.abs().max()))
            row.update({"warmup_s": warm, "ms_per_decode_step": ms, "ratio_to_eager": ms / eager_ms,
                        "max_abs_logit_diff": diff, "logits_match": diff <= tol, "tolerance": tol})
            if mode != "eager":
                end = dynamo_counts()
                row.update(end)
                if counts and end:
                    row["new_graphs_timed"] = end["unique_graphs"] - counts["unique_graphs"]
        except Exception as e:  # a compile failure is a result too, not a crash
            row["error"] = f"{type(e).__name__}: {str(e).strip()[:400]}"
            if mode == "eager":
                raise
        rows.append(row)
    common.report("decode_compile", rows, args.out, extra={"settings": {
        "batch": args.batch, "prompt_len": args.prompt_len, "steps": args.steps,
        "warmup_steps": args.warmup, "timed_steps": args.steps - args.warmup,
        "dtype": str(next(engine.parameters()).dtype), "model": cfg.model.name_or_path,
        "temperature": cfg.train.temperature, "top_p": cfg.train.top_p, "tiny": args.tiny,
        "logit_tolerance": f"{TOLERANCE} x max(1, max |eager logits|)"}})


if __name__ == "__main__":
    main()
