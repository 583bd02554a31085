"""Regenerate the bundled demo data: python data/make_data.py [OUT_DIR (default: data/)]

Writes data/train.jsonl (1,000 rows) and data/test.jsonl (200 rows) in the simple schema:

    {"problem": ..., "answer": ..., "solution": ... \\boxed{answer},
     "teachers": [{"source": "teacher-stepwise", "response": ...}, ...], "data_source": "add"}

data_source names the template (the problem type), so evaluation reports each type. The rows of
the HARD_TYPES also go to data/train_hard.jsonl (380 rows) and data/test_hard.jsonl (76 rows).

Problems are arithmetic and short word problems from templates, drawn with a fixed seed, so two
runs write byte-identical files. Each template knows the steps of its problem, and four
"teachers" write those steps in their own styles (numbered prose, bare equations, solve and
check, a terse one-liner). They are this script's writers, not models: real users bring real
teacher models' responses. Every solution and teacher response is checked with verify.py
before anything is written.
"""

import json
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import verify  # noqa: E402

NAMES = ["Ava", "Ben", "Chloe", "Dev", "Emma", "Farid", "Grace", "Hugo", "Ines", "Jon", "Kira",
         "Liam", "Maya", "Noah", "Olga", "Pia", "Ravi", "Sara", "Tom", "Uma"]
ITEMS = ["apples", "marbles", "stickers", "books", "pencils", "shells", "cards", "cookies"]

# Each generator returns (problem, answer, steps, check): steps are (why, equation) pairs in
# order; check is an equation that confirms the answer by the inverse operation.


def add1(r):
    a, b = r.randint(1, 20), r.randint(1, 9)
    return (f"What is {a} + {b}?", a + b, [("add the two numbers", f"{a} + {b} = {a + b}")],
            f"{a + b} - {b} = {a}")


def sub1(r):
    a, b = r.randint(6, 30), r.randint(1, 9)
    if b >= a:
        b = a - 1
    return (f"What is {a} - {b}?", a - b, [("subtract", f"{a} - {b} = {a - b}")],
            f"{a - b} + {b} = {a}")


def word_small(r):
    n, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(2, 9), r.randint(2, 9)
    return (f"{n} has {a} {item} and gets {b} more. How many {item} does {n} have now?", a + b,
            [(f"after getting {b} more", f"{a} + {b} = {a + b}")], f"{a + b} - {b} = {a}")


def add(r):
    a, b = r.randint(10, 99), r.randint(10, 99)
    return (f"What is {a} + {b}?", a + b, [("add the two numbers", f"{a} + {b} = {a + b}")],
            f"{a + b} - {b} = {a}")


def add3(r):
    a, b = r.randint(100, 999), r.randint(10, 99)
    ones = a % 10 + b % 10
    return (f"Compute {a} + {b}.", a + b,
            [("add the ones", f"{a % 10} + {b % 10} = {ones}"),
             ("add the rest", f"{a} + {b} = {a + b}")], f"{a + b} - {a} = {b}")


def sub(r):
    a = r.randint(50, 199)
    b = r.randint(10, a - 1)
    return (f"What is {a} - {b}?", a - b, [("subtract", f"{a} - {b} = {a - b}")],
            f"{a - b} + {b} = {a}")


def mul(r):
    a, b = r.randint(3, 9), r.randint(11, 49)
    t, o = b // 10 * 10, b % 10
    return (f"What is {a} \u00d7 {b}?", a * b,
            [("multiply the tens", f"{a} \u00d7 {t} = {a * t}"),
             ("multiply the ones", f"{a} \u00d7 {o} = {a * o}"),
             ("add the parts", f"{a * t} + {a * o} = {a * b}")], f"{a * b} / {a} = {b}")


def chain(r):
    a, b, c = r.randint(10, 60), r.randint(5, 40), r.randint(2, 30)
    return (f"Calculate {a} + {b} - {c}.", a + b - c,
            [("add first", f"{a} + {b} = {a + b}"), ("then subtract", f"{a + b} - {c} = {a + b - c}")],
            f"{a + b - c} + {c} - {b} = {a}")


def word_gain_loss(r):
    n, item = r.choice(NAMES), r.choice(ITEMS)
    a, b = r.randint(12, 60), r.randint(5, 40)
    c = r.randint(2, a + b - 1)
    return (f"{n} has {a} {item}. {n} gets {b} more and then gives away {c}. "
            f"How many {item} does {n} have now?", a + b - c,
            [(f"after getting {b} more", f"{a} + {b} = {a + b}"),
             (f"after giving away {c}", f"{a + b} - {c} = {a + b - c}")],
            f"{a + b - c} + {c} - {b} = {a}")


def word_price(r):
    n, item = r.choice(NAMES), r.choice(["pens", "notebooks", "tickets", "muffins"])
    k, p = r.randint(3, 9), r.randint(2, 15)
    return (f"{n} buys {k} {item} that cost ${p} each. How many dollars does {n} spend?", k * p,
            [("multiply the count by the price", f"{k} \u00d7 {p} = {k * p}")],
            f"{k * p} / {k} = {p}")


def word_share(r):
    n, item = r.choice(NAMES), r.choice(ITEMS)
    k, each = r.randint(2, 8), r.randint(3, 12)
    total = k * each
    return (f"{n} shares {total} {item} equally among {k} friends. "
            f"How many {item} does each friend get?", each,
            [("divide the total by the number of friends", f"{total} / {k} = {each}")],
            f"{each} \u00d7 {k} = {total}")


def word_age(r):
    a, b = r.sample(NAMES, 2)
    age, diff, years = r.randint(5, 40), r.randint(2, 25), r.randint(2, 15)
    return (f"{a} is {age} years old. {b} is {diff} years older than {a}. "
            f"How old will {b} be in {years} years?", age + diff + years,
            [(f"{b}'s age now", f"{age} + {diff} = {age + diff}"),
             (f"in {years} years", f"{age + diff} + {years} = {age + diff + years}")],
            f"{age + diff + years} - {years} - {diff} = {age}")


def word_rows(r):
    n = r.choice(NAMES)
    rows, per, extra = r.randint(3, 9), r.randint(4, 12), r.randint(1, 9)
    return (f"{n} arranges chairs in {rows} rows of {per}, then adds {extra} more chairs. "
            f"How many chairs are there?", rows * per + extra,
            [("chairs in the rows", f"{rows} \u00d7 {per} = {rows * per}"),
             ("add the extra chairs", f"{rows * per} + {extra} = {rows * per + extra}")],
            f"{rows * per + extra} - {extra} = {rows * per}")


# (generator, share of the rows). The first three are easy for SmolLM2-135M with the default
# prompt (it solves most of the one-digit sums), the rest hard (it rarely gets two-digit
# arithmetic right): data/README.md has the measured accuracy of each type.
MIX = [(add1, 0.12), (sub1, 0.10), (word_small, 0.10), (add, 0.12), (add3, 0.08), (sub, 0.08),
       (mul, 0.08), (chain, 0.08), (word_gain_loss, 0.06), (word_price, 0.06),
       (word_share, 0.04), (word_age, 0.04), (word_rows, 0.04)]
# The types the start model almost never solves: under 2% of its answers correct (none of 64,
# 8 training rows x 8 answers, at the evaluation's temperature 0.6: data/README.md). Their rows
# also go to train_hard.jsonl and test_hard.jsonl, the data of compare.py --regime hard.
HARD_TYPES = ("add3", "sub", "chain", "word_gain_loss", "word_age", "word_rows")


def solution(steps, ans):
    """A worked solution: one sentence per step, the boxed answer only in the last line."""
    lines = [f"First, {steps[0][0]}: {steps[0][1]}."]
    lines += [f"Next, {why}: {eq}." for why, eq in steps[1:]]
    return "\n".join(lines) + f"\nSo the final answer is \\boxed{{{ans}}}."


def teachers(steps, check, ans):
    """Four styles of the same reasoning, each ending with its answer in one box."""
    stepwise = "\n".join(f"Step {i} ({why}): {eq}." for i, (why, eq) in enumerate(steps, 1))
    return [
        {"source": "teacher-stepwise", "response": f"{stepwise}\nThe answer is \\boxed{{{ans}}}."},
        {"source": "teacher-equation", "response": "\n".join(eq for _, eq in steps)
         + f"\n\\boxed{{{ans}}}"},
        {"source": "teacher-check", "response": " ".join(eq + "." for _, eq in steps)
         + f" Check: {check}. Correct, so the answer is \\boxed{{{ans}}}."},
        {"source": "teacher-terse", "response": f"{steps[-1][1]}, so \\boxed{{{ans}}}."},
    ]


def make(n, seed, exclude=frozenset()):
    r, rows, seen = random.Random(seed), [], set(exclude)
    for gen, share in MIX:
        want = round(n * share)
        while want:
            problem, ans, steps, check = gen(r)
            if problem in seen:
                continue
            seen.add(problem)
            rows.append({"problem": problem, "answer": str(ans), "solution": solution(steps, ans),
                         "teachers": teachers(steps, check, ans),
                         "data_source": gen.__name__})
            want -= 1
    r.shuffle(rows)
    return rows


def main(out=HERE):
    train = make(1000, seed=1)
    test = make(200, seed=2, exclude={row["problem"] for row in train})
    hard = [[row for row in rows if row["data_source"] in HARD_TYPES] for rows in (train, test)]
    for name, rows in (("train", train), ("test", test), ("train_hard", hard[0]),
                       ("test_hard", hard[1])):
        texts = [row["solution"] for row in rows] + [t["response"] for row in rows
                                                     for t in row["teachers"]]
        golds = [row["answer"] for row in rows] + [row["answer"] for row in rows
                                                   for _ in row["teachers"]]
        ok = verify.verify_batch(texts, golds, workers=2)
        if not all(ok):
            bad = ok.index(False)
            sys.exit(f"{name}: text {bad} does not verify against its answer: {texts[bad]!r}")
        with open(os.path.join(out, f"{name}.jsonl"), "w") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        counts = {}
        for row in rows:
            counts[row["data_source"]] = counts.get(row["data_source"], 0) + 1
        print(f"{name}: {len(rows)} rows, {len(texts)} texts verified; {counts}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else HERE)
