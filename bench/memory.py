"""Memory: the peak of each phase of one default training step, and of the log-prob pass.

    HF_HUB_OFFLINE=1 python bench/memory.py     # the embedded model, config.yaml's settings
    python bench/memory.py --tiny               # the smoke test's tiny model

Peak resident memory (CPU: VmHWM, reset before each phase through /proc/self/clear_refs) or
peak allocated memory (GPU) of: the rollout (sampling and verifying), teacher scoring, the
batch (padding, pi_old / pi_ref log-probs) and the update (forward and backward of every
micro-batch). Then the training log-prob pass alone (ampo.completion_logprobs with entropy,
forward and backward) at one micro-batch of long completions, with the head in chunks
(train.logprob_chunk_size) and all at once, against the size of one float32 [N, C, V] tensor:
how many vocabulary-wide copies the pass holds at its peak. That count times
N x C x V x 4 bytes is what the 7B configs' arithmetic (configs/) has to budget.
"""

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import ampo  # noqa: E402
import common  # noqa: E402
import infra  # noqa: E402

GIB = 2**30


def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := current RSS


def memory() -> tuple[float, float]:
    """(current, peak since reset_peak) in bytes."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    status = open("/proc/self/status").read()
    kib = [int(re.search(rf"{k}:\s+(\d+)", status).group(1)) * 1024 for k in ("VmRSS", "VmHWM")]
    return kib[0], kib[1]


def phase(name, fn, rows):
    start, _ = memory()
    reset_peak()
    out = fn()
    _, peak = memory()
    rows.append({"phase": name, "start_gib": start / GIB, "peak_gib": peak / GIB,
                 "peak_over_start_gib": (peak - start) / GIB})
    return out


def pass_alone(cfg, completion: int, chunk: int, checkpointing: bool):
    """One micro-batch of long completions through ampo.completion_logprobs with entropy,
    forward and backward, in this (fresh) process; prints its row as JSON."""
    t = cfg.train
    cfg.model.gradient_checkpointing = checkpointing
    policy, _ = infra.load_model(cfg.model)
    model = infra.wrap_model(policy.train(), t)
    N, V = t.micro_batch_size, policy.config.vocab_size
    ids = torch.randint(0, V, (N, 64 + completion))
    rows = []

    def run():
        logp, ent = ampo.completion_logprobs(model, ids, torch.ones_like(ids), completion,
                                             t.temperature, True, chunk)
        (logp.sum() + ent.sum()).backward()

    phase(f"log-prob pass alone ({N} x {completion} tokens), chunk {chunk or 'none'}, "
          f"gradient checkpointing {'on' if checkpointing else 'off'}", run, rows)
    print(json.dumps(rows[0]))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--completion", type=int, default=512, help="tokens in the log-prob pass")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "memory.json"))
    ap.add_argument("--pass-alone", type=int, default=None, help=argparse.SUPPRESS)  # chunk
    ap.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cfg = infra.load_config(os.path.join(ROOT, "config.yaml"), [], ampo.Config, ("ghpo",))
    t = cfg.train
    if args.pass_alone is not None:
        cfg.model.name_or_path = args.model or cfg.model.name_or_path
        return pass_alone(cfg, args.completion, args.pass_alone, args.checkpointing)
    if args.tiny:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from conftest import make_tiny_model

        cfg.model.name_or_path, t.max_completion_length = make_tiny_model(tempfile.mkdtemp()), 8
        args.completion = 16
    torch.manual_seed(0)
    rows_out = []
    policy, tok = phase("load model", lambda: infra.load_model(cfg.model), rows_out)
    model = infra.wrap_model(policy.train(), t)
    optimizer, scheduler = infra.make_optimizer(model, t)
    infra.attach_engine(policy, cfg, infra.model_path(cfg.model.name_or_path))
    data, _ = infra.load_dataset(os.path.join(ROOT, cfg.data.train_file), 4, workers=0)
    rows = data[:t.prompts_per_step]
    prompts = [infra.build_prompt(tok, r, cfg.data.prompt_template, cfg.data.system_prompt,
                                     cfg.data.example)
               for r in rows]
    rollout, _ = phase("rollout (sample + verify)",
                       lambda: ampo.sample_groups(policy, tok, rows, prompts, cfg), rows_out)
    cfg.ampo.trigger = "always"  # every group guided: the scoring pass at its largest
    phase("teacher scoring (guidance)", lambda: ampo.apply_guidance(
        rollout, rows, prompts, policy, tok, cfg, random.Random(0)), rows_out)
    batch = phase("batch (padding, log-probs)", lambda: ampo.add_logprobs(
        ampo.build_batch(tok, rollout, t), policy, None, t), rows_out)
    phase("update (forward + backward)", lambda: ampo.train_on_batch(
        model, optimizer, scheduler, batch, t, cfg.ampo.shaping_gamma), rows_out)
    # The log-prob pass alone, each setting in a fresh process of its own (memory the allocator
    # keeps after one pass would hide the next one's peak): the head all at once (as before
    # chunking) or in chunks, with and without gradient checkpointing.
    N, C, V = t.micro_batch_size, args.completion, policy.config.vocab_size
    one_copy = N * C * V * 4
    for chunk, ckpt in ((0, False), (t.logprob_chunk_size, False), (0, True),
                        (t.logprob_chunk_size, True)):
        cmd = [sys.executable, os.path.abspath(__file__), "--pass-alone", str(chunk),
               "--completion", str(C)] + (["--checkpointing"] if ckpt else []) + (
                   ["--model", cfg.model.name_or_path] if args.tiny else [])
        row = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                        text=True).stdout.strip().splitlines()[-1])
        row.update(float32_NxCxV_gib=one_copy / GIB,
                   copies_at_peak=row["peak_over_start_gib"] * GIB / one_copy)
        rows_out.append(row)
    common.report("memory", rows_out, args.out,
                  extra={"settings": {"bf16": t.bf16, "sampler": t.sampler, "vocab": V,
                                      "logprob_chunk_size": t.logprob_chunk_size,
                                      "prompts": t.prompts_per_step, "G": t.num_generations,
                                      "max_completion_length": t.max_completion_length}})


if __name__ == "__main__":
    main()
