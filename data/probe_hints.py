"""How well does a model answer the bundled problems at each GHPO hint ratio?

    HF_HUB_OFFLINE=1 python data/probe_hints.py [--rows 16] [--samples 8] [--config config.yaml]

For the first N training rows, samples answers from the plain prompt and from the prompts
hinted at 25%, 50% and 75% (exactly the text ghpo.py would generate from), and prints per ratio:
the share of answers with a \\boxed{} at all, the share the verifier scores correct, and the
share whose last number is the gold answer although the answer has no box. The last column is
what a strict \\boxed{} reward cannot see: the model got the answer but not the format.
"""

import argparse
import os
import re
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ampo  # noqa: E402
import infra  # noqa: E402
import ghpo  # noqa: E402
import verify  # noqa: E402


def last_number(text: str) -> str | None:
    """The last integer or decimal in a text, or None.

    >>> last_number("so 12 + 30 = 42."), last_number("none")
    ('42', None)
    """
    found = re.findall(r"-?\d+(?:\.\d+)?", text)
    return found[-1] if found else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--samples", type=int, default=8)
    args = parser.parse_args()
    cfg = infra.load_config(args.config, [], ghpo.Config, ("ampo",))
    torch.manual_seed(cfg.train.seed)
    model, tok = infra.load_model(cfg.model)
    rows, _ = infra.load_dataset(cfg.data.train_file, 0, 0, require_solution=True)
    rows = rows[:args.rows]
    t, G = cfg.train, args.samples
    print(f"{len(rows)} rows x {G} samples, T={t.temperature}, up to {t.max_completion_length} "
          f"tokens, {cfg.model.name_or_path}")
    print("ratio   boxed  correct  right-but-unboxed  groups-solved")
    for ratio in [0.0] + list(cfg.ghpo.hint_ratios):
        prompts = [infra.build_prompt(tok, r, cfg.data.prompt_template, cfg.data.system_prompt)
                   if ratio == 0 else ghpo.hinted_prompt_text(tok, r, cfg, ratio)[0]
                   for r in rows]
        completions, _ = ampo.generate(model, tok, prompts, G, t.max_completion_length,
                                       t.temperature, t.top_p)
        texts = tok.batch_decode(completions, skip_special_tokens=True)
        golds = [r["answer"] for r in rows for _ in range(G)]
        correct = verify.verify_batch(texts, golds, workers=t.verifier_workers)
        boxed = [verify.extract_answer(x) is not None for x in texts]
        unboxed_right = [not b and last_number(x) == g for x, b, g in zip(texts, boxed, golds)]
        solved = sum(any(correct[i * G:(i + 1) * G]) for i in range(len(rows)))
        n = len(texts)
        print(f"{ratio:<6g}  {sum(boxed) / n:5.1%}  {sum(correct) / n:7.1%}  "
              f"{sum(unboxed_right) / n:17.1%}  {solved:>6d} / {len(rows)}")


if __name__ == "__main__":
    main()
