"""AMPO's comprehension scoring: one batched pass vs the official per-prompt calls.

    HF_HUB_OFFLINE=1 python bench/comprehension.py     # the embedded model
    python bench/comprehension.py --tiny               # the smoke test's tiny model

The official trainer scores each guided prompt's teacher responses in a forward of its own and
takes the log-softmax over the whole vocabulary at every position (`official` below, written
here as the baseline). ampo.comprehension_scores scores the candidates of every guided prompt
of the step in one batched pass, and computes the head and log-softmax only where the next
token is a gold token. Same candidates, same inputs (ampo.comprehension_inputs), float32: the
scores must agree to float rounding. A third row is what the default run does, with
train.bf16's autocast on top. Cases: the default run's step (2 guided prompts x 4 teachers)
and 8 guided prompts x 4.
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


def official(model, tok, prompts, responses, golds, rule):
    """The baseline for one guided prompt: its candidates in one right-padded forward, the
    log-softmax over the whole vocabulary at every position, the arithmetic mean of the gold
    tokens' probabilities (the official `arith` score)."""
    items = [ampo.comprehension_inputs(tok, p, r, g, rule)
             for p, r, g in zip(prompts, responses, golds)]
    todo = [i for i, it in enumerate(items) if it is not None]
    scores = [0.0] * len(items)
    if not todo:
        return scores
    L = max(len(items[i][0]) for i in todo)
    ids = torch.full((len(todo), L), tok.pad_token_id)  # [n, L]
    attn, gold = torch.zeros((len(todo), L), dtype=torch.long), torch.zeros((len(todo), L))
    for row, i in enumerate(todo):
        seq, mask = items[i]
        ids[row, :len(seq)], attn[row, :len(seq)] = torch.tensor(seq), 1
        gold[row, :len(seq)] = torch.tensor(mask, dtype=torch.float)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # [n, L, V]
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    s = (logp.exp() * gold[:, 1:]).sum(-1) / gold[:, 1:].sum(-1)  # [n]
    for row, i in enumerate(todo):
        scores[i] = float(s[row])
    return scores


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "comprehension.json"))
    args = ap.parse_args()
    cfg = infra.load_config(os.path.join(ROOT, "config.yaml"), [], ampo.Config, ("ghpo",))
    if args.tiny:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from conftest import make_tiny_model

        cfg.model.name_or_path, cases, repeats = make_tiny_model(tempfile.mkdtemp()), [2], 1
    else:
        cases, repeats = [2, 8], args.repeats
    model, tok = infra.load_model(cfg.model)
    rows, _ = infra.load_dataset(os.path.join(ROOT, cfg.data.train_file), 4, workers=0)
    a = cfg.ampo
    results = []
    for n_prompts in cases:
        prompts, responses, golds, groups = [], [], [], []
        for r in rows[:n_prompts]:
            p = infra.build_prompt(tok, r, cfg.data.prompt_template, cfg.data.system_prompt,
                                     cfg.data.example)
            groups.append(len(prompts))
            for _source, response in r["teachers"]:
                prompts.append(p), responses.append(response), golds.append(r["answer"])
        groups.append(len(prompts))

        def batched():
            return ampo.comprehension_scores(model, tok, prompts, responses, golds, "arith",
                                             a.comprehension_batch_size, rule=a.comprehension_input)

        def per_prompt():  # the official design, one prompt's candidates at a time
            return [s for i in range(n_prompts) for s in official(
                model, tok, prompts[groups[i]:groups[i + 1]], responses[groups[i]:groups[i + 1]],
                golds[groups[i]:groups[i + 1]], a.comprehension_input)]

        def batched_bf16():  # what the default run does: train.bf16 autocasts the policy
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return batched()

        methods = {"official per-prompt, float32": per_prompt, "ours batched, float32": batched,
                   "ours batched, bf16 autocast": batched_bf16}
        for fn in methods.values():
            fn()  # warm-up
        times = {m: [] for m in methods}
        scores = {}
        for _ in range(repeats):
            for m, fn in methods.items():
                dt, scores[m] = common.timed(fn)
                times[m].append(dt)
        base = common.median(times["official per-prompt, float32"])
        for m in methods:
            results.append({"case": f"{n_prompts} prompts x {len(prompts) // n_prompts} teachers",
                            "method": m, "seconds": common.median(times[m]),
                            "speedup": base / common.median(times[m]),
                            "max_abs_score_diff": max(abs(x - y) for x, y in zip(
                                scores[m], scores["official per-prompt, float32"]))})
    common.report("comprehension", results, args.out,
                  extra={"settings": {"batch_size": a.comprehension_batch_size,
                                      "score": "arith",
                                      "input": a.comprehension_input, "dtype": cfg.model.dtype,
                                      "threads": torch.get_num_threads(), "repeats": repeats}})


if __name__ == "__main__":
    main()
