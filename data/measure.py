"""How well does the base model answer the bundled problems? Per problem type, and per hint.

    HF_HUB_OFFLINE=1 python data/measure.py [--rows 8] [--samples 8] [--hints] \
        [--config config.yaml] [--section.key=value ...]

For the first --rows training rows of every problem type (a row's data_source), samples
--samples answers at the run's temperature and length with the run's prompt (any key can be
overridden, e.g. --train.temperature=0.6 for the evaluation's sampling, or
--data.prompt_template=...), and prints per type: the share of answers with a final answer in
the required format (a \\boxed{} or <answer> block), the share the strict verifier scores
correct, and the share of groups with at least one correct answer (AMPO guides the others).

With --hints, the groups that no answer solved are then regenerated with GHPO's hinted prompts
at each of ghpo.hint_ratios in turn (exactly the text ghpo.py generates from), and it prints
how many of the still-failing groups each stage rescues, as a GHPO step would.

The "before/after" table in data/README.md comes from this script.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ampo  # noqa: E402
import ghpo  # noqa: E402
import infra  # noqa: E402
import verify  # noqa: E402


def sample(model, tok, prompts, rows, cfg, G):
    """(correct, formatted) per answer, G answers per prompt, at the run's settings."""
    t, completions, step = cfg.train, [], cfg.train.prompts_per_step
    for i in range(0, len(prompts), step):  # a training step's batch at a time
        completions += ampo.generate(model, tok, prompts[i:i + step], G, t.max_completion_length,
                                     t.temperature, t.top_p)[0]
    texts = tok.batch_decode(completions, skip_special_tokens=True)
    golds = [r["answer"] for r in rows for _ in range(G)]
    correct = verify.verify_batch(texts, golds, workers=t.verifier_workers,
                                  timeout=t.verifier_timeout, rule=t.answer_rule)
    formatted = [verify.extract_answer(x, t.answer_rule) is not None for x in texts]
    return correct, formatted


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--rows", type=int, default=8, help="rows per problem type")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--hints", action="store_true", help="also run GHPO's hint stages")
    args, overrides = parser.parse_known_args(argv)
    cfg = infra.load_config(args.config, overrides, ghpo.Config, ("ampo",))
    torch.manual_seed(cfg.train.seed)
    model, tok = infra.load_model(cfg.model)
    infra.attach_engine(model, cfg, infra.model_path(cfg.model.name_or_path))
    rows, _ = infra.load_dataset(cfg.data.train_file, 0, 0, require_solution=args.hints,
                                 rule=cfg.train.answer_rule)
    # A row's problem type is its data_source (the bundled rows name their template there).
    for r in rows:
        r["type"] = r["data_source"] or "all"
    types = list(dict.fromkeys(r["type"] for r in rows))
    picked = [r for ty in types for r in [x for x in rows if x["type"] == ty][:args.rows]]
    G, t = args.samples, cfg.train
    print(f"{args.rows} rows a type x {G} samples, T={t.temperature}, up to "
          f"{t.max_completion_length} tokens, {cfg.model.name_or_path}")
    prompts = [infra.build_prompt(tok, r, cfg.data.prompt_template, cfg.data.system_prompt,
                                     cfg.data.example)
               for r in picked]
    correct, formatted = sample(model, tok, prompts, picked, cfg, G)
    print(f"| type | formatted | correct | groups solved |\n| --- | --- | --- | --- |")
    for ty in types + ["all"]:
        rs = [i for i, r in enumerate(picked) if ty in ("all", r["type"])]
        ans = [i * G + j for i in rs for j in range(G)]
        solved = sum(any(correct[i * G:(i + 1) * G]) for i in rs)
        print(f"| {ty} | {sum(formatted[a] for a in ans) / len(ans):.1%} | "
              f"{sum(correct[a] for a in ans) / len(ans):.1%} | {solved} / {len(rs)} |")
    if not args.hints:
        return
    # GHPO: the groups with no correct answer go through the hint stages until one is solved.
    failing = [i for i in range(len(picked)) if not any(correct[i * G:(i + 1) * G])]
    print(f"\n| hint ratio | groups tried | rescued | correct answers | formatted |\n"
          f"| --- | --- | --- | --- | --- |")
    for ratio in cfg.ghpo.hint_ratios:
        if not failing:
            break
        sub = [picked[i] for i in failing]
        hinted = [ghpo.hinted_prompt_text(tok, r, cfg, ratio)[0] for r in sub]
        c, f = sample(model, tok, hinted, sub, cfg, G)
        still = [i for k, i in enumerate(failing) if not any(c[k * G:(k + 1) * G])]
        print(f"| {ratio:g} | {len(failing)} | {len(failing) - len(still)} | "
              f"{sum(c) / len(c):.1%} | {sum(f) / len(f):.1%} |")
        failing = still
    print(f"still unsolved after every stage: {len(failing)} of {len(picked)} groups")


if __name__ == "__main__":
    main()
