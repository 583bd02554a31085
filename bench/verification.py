"""Answer checking: verify.verify_batch's worker processes vs a sequential loop.

    python bench/verification.py            # 4,096 responses, then a salted batch
    python bench/verification.py --tiny     # the smoke test: 64 responses

The responses are built from the bundled training golds, in the mix a run sees: right and
boxed, right in another form (a fraction, a decimal, a sum), wrong, and with no box at all.
The salted batch adds adversarial strings (a 20,000-term sum, deeply nested brackets, 20,000
unclosed boxes): each must come back as wrong within its limits, and no other item may change.
"""

import argparse
import os
import random
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
import common  # noqa: E402
import infra  # noqa: E402
import verify  # noqa: E402


def responses_for(golds: list[str], n: int, seed: int = 0):
    """n (response, gold) pairs: a quarter each right, right in another form, wrong, unboxed."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        g = golds[i % len(golds)]
        kind = i % 4
        if kind == 0:
            text = f"Step 1: work it out.\nSo the final answer is \\boxed{{{g}}}."
        elif kind == 1:
            text = f"That gives \\boxed{{\\frac{{{2 * int(g)}}}{{2}}}}." if g.lstrip("-").isdigit() \
                else f"\\boxed{{{g}}}"
        elif kind == 2:
            text = f"I think it is \\boxed{{{rng.randint(0, 999)}}}."
        else:
            text = f"The answer is {g}."
        out.append((text, g))
    return out


ADVERSARIAL = ["\\boxed{" + "+".join(["1"] * 20000) + "}",
               "\\boxed{" + "(" * 3000 + "1" + ")" * 3000 + "}",
               "\\boxed{7}" + "\\boxed{" * 20000,
               "<answer>" * 12500 + "\\boxed{1}"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=5.0)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "verification.json"))
    args = ap.parse_args()
    n = 64 if args.tiny else args.n
    rows, _ = infra.load_dataset(os.path.join(ROOT, "data", "train.jsonl"), 0, workers=0)
    pairs = responses_for([r["answer"] for r in rows], n)
    texts, golds = [t for t, _ in pairs], [g for _, g in pairs]
    verify.verify_batch(texts[:4], golds[:4], workers=args.workers)  # start the warm pool
    verify.verify_batch(texts[:4], golds[:4], workers=0)  # and import math-verify here too
    seq_s, seq = common.timed(lambda: verify.verify_batch(texts, golds, workers=0,
                                                          timeout=args.timeout))
    par_s, par = common.timed(lambda: verify.verify_batch(texts, golds, workers=args.workers,
                                                          timeout=args.timeout))
    rows_out = [{"batch": f"{n} responses", "sequential_s": seq_s,
                 f"workers_{args.workers}_s": par_s, "speedup": seq_s / par_s,
                 "identical_verdicts": seq == par, "correct_share": sum(par) / n}]
    # The salted batch: adversarial strings spread through the first items of the batch.
    k = min(n, 256)
    salted_t, salted_g = list(texts[:k]), list(golds[:k])
    for j, a in enumerate(ADVERSARIAL):
        salted_t.insert(j * k // len(ADVERSARIAL), a)
        salted_g.insert(j * k // len(ADVERSARIAL), "2")  # no adversarial string equals 2
    tick = time.perf_counter()
    out = verify.verify_batch(salted_t, salted_g, workers=args.workers, timeout=args.timeout)
    salted_s = time.perf_counter() - tick
    normal = [v for t, v in zip(salted_t, out) if t not in ADVERSARIAL]
    rows_out.append({"batch": f"{k} responses + {len(ADVERSARIAL)} adversarial",
                     f"workers_{args.workers}_s": salted_s,
                     "identical_verdicts": normal == par[:k],
                     "adversarial_all_wrong": not any(v for t, v in zip(salted_t, out)
                                                      if t in ADVERSARIAL),
                     "every_item_answered": len(out) == len(salted_t),
                     "bound_per_item_s": verify.BACKSTOP * args.timeout})
    common.report("verification", rows_out, args.out)


if __name__ == "__main__":
    main()
