"""verify.py: is a model's final answer right? Extraction, math-verify equivalence, rewards.

    python verify.py "so the answer is \\boxed{\\frac{1}{2}}" "0.5"
    answer: \\frac{1}{2}
    correct: True

Three steps, each its own function:

  1. find the final answer: the last \\boxed{...} (nested braces handled), else the last
     <answer>...</answer> block (the official AMPO data uses those tags);
  2. compare it with the gold answer using math-verify, so 1/2, 0.5 and \\frac{1}{2} agree;
  3. turn that into a reward, optionally with the official format and repetition terms.

Checks run in a process pool with a per-item timeout (verify_batch): math-verify can take
seconds on adversarial text, and a training step must never hang or crash on one answer.
A timeout, like any error, is a wrong answer. This module does not import torch.
"""

from __future__ import annotations

import argparse
import atexit
import multiprocessing
import re

# =============================================================================================
# 1. Finding the final answer
# =============================================================================================

BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def closing_brace(text: str, open_at: int) -> int | None:
    """Index of the brace that closes the one at text[open_at], or None if it never closes.

    >>> closing_brace("{a{b}c}d", 0)
    6
    """
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def answer_span(text: str) -> tuple[int, int] | None:
    """Character span [start, end) of the final answer in `text`, or None.

    The last complete \\boxed{...} wins; without one, the content of the last <answer> block.
    The trainer uses the span to put the gold answer in place of a teacher's own answer.

    >>> t = "2 + 2 = \\\\boxed{4}, not \\\\boxed{\\\\frac{1}{2}}"
    >>> s, e = answer_span(t); t[s:e]
    '\\\\frac{1}{2}'
    >>> s, e = answer_span("so <answer> 12 </answer>"); "so <answer> 12 </answer>"[s:e]
    ' 12 '
    """
    if not isinstance(text, str):
        return None
    for m in reversed(list(BOX.finditer(text))):
        end = closing_brace(text, m.end() - 1)
        if end is not None:
            return m.end(), end
    tags = list(ANSWER_TAG.finditer(text))
    if tags:
        return tags[-1].start(1), tags[-1].end(1)
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a response, stripped of spaces and dollars, or None.

    >>> extract_answer("First \\\\boxed{1}. Finally \\\\boxed{\\\\frac{3}{4}}.")
    '\\\\frac{3}{4}'
    >>> extract_answer("<answer> $42$ </answer>"), extract_answer("no answer here")
    ('42', None)
    """
    span = answer_span(text)
    if span is None:
        return None
    inner = text[span[0]:span[1]]
    if BOX.search(inner):  # an <answer> block that itself holds a \boxed{}
        return extract_answer(inner)
    answer = inner.strip().strip("$").strip()
    return answer or None


# =============================================================================================
# 2. Equivalence with math-verify
# =============================================================================================
# math-verify parses both sides into sympy and compares them. It needs LaTeX delimiters to
# know what to parse, so the gold answer is wrapped as $...$ and the prediction as \boxed{...}.
# Its own timeouts use signal.alarm, which works only in a process's main thread: that is why
# batches run in worker processes, never threads.


def is_correct(response: str, gold: str) -> bool:
    """Does the response's final answer equal the gold answer (given bare: 1/2, (1,2), 42)?

    >>> is_correct("\\\\boxed{0.5}", "\\\\frac{1}{2}"), is_correct("\\\\boxed{21}", "12")
    (True, False)
    """
    try:
        answer = extract_answer(response)
        if answer is None:
            return False
        gold = str(gold).strip().strip("$").strip()
        if answer == gold:  # the common case needs no parser
            return True
        from math_verify import parse, verify

        gold_parsed = parse(f"${gold}$")
        if not gold_parsed:
            gold_parsed = parse(f"\\boxed{{{gold}}}")
        return bool(verify(gold_parsed, parse(f"\\boxed{{{answer}}}")))
    except Exception:  # a parser error or a timeout is a wrong answer, never a crash
        return False


# =============================================================================================
# 3. Rewards: correctness, the official format term and repetition penalty
# =============================================================================================


def format_ok(response: str) -> bool:
    """The official AMPO format check: exactly one <answer> and one </answer>, in order.

    >>> format_ok("think... <answer> 3 </answer>"), format_ok("<answer>3")
    (True, False)
    """
    return (response.count("<answer>") == 1 and response.count("</answer>") == 1
            and re.match(r".*<answer>.*</answer>.*", response, re.DOTALL) is not None)


def is_repetitive(text: str, window: int = 10, max_repeats: int = 10) -> bool:
    """True iff some run of `window` words occurs at least `max_repeats` times (official rule).

    >>> is_repetitive("a b " * 60, window=2, max_repeats=10), is_repetitive("a b c d")
    (True, False)
    """
    words = [w for w in re.split(r"[\s_]+", text) if w]
    counts: dict[tuple, int] = {}
    for i in range(len(words) - window + 1):
        key = tuple(words[i:i + window])
        counts[key] = counts.get(key, 0) + 1
        if counts[key] >= max_repeats:
            return True
    return False


def combine(correct: bool, response: str, format_weight: float, repetition_penalty: bool) -> float:
    """reward = (1 - w) correct + w format, minus 1 if repetitive and non-zero.

    The official table with w = 0.1:

    ============================  ======  =====================
    case                          reward  with repetition
    ============================  ======  =====================
    correct, <answer> tags        1.0     0.0
    correct, no tags              0.9     -0.1
    wrong, tags                   0.1     -0.9
    wrong, no tags                0.0     0.0 (zero stays zero)
    ============================  ======  =====================
    """
    r = (1 - format_weight) * float(correct) + format_weight * float(format_ok(response))
    if repetition_penalty and r != 0 and is_repetitive(response):
        r -= 1.0
    return r


def reward(response: str, gold: str, format_weight: float = 0.0,
           repetition_penalty: bool = False) -> float:
    """The reward of one response.

    >>> reward("<answer> 4 </answer>", "4", 0.1), reward("\\\\boxed{4}", "4", 0.1)
    (1.0, 0.9)
    """
    return combine(is_correct(response, gold), response, format_weight, repetition_penalty)


# =============================================================================================
# 4. Batches in a process pool, with a per-item timeout
# =============================================================================================
# One pool lives for the whole run (starting processes every step would cost more than the
# checks). "spawn" starts clean interpreters: forking a trainer that holds torch's thread pools
# can deadlock. A stuck item is abandoned after `timeout` seconds; the pool is then torn down
# and rebuilt, because the worker running it cannot be interrupted any other way.

_pool = None
_pool_workers = 0


def _get_pool(workers: int):
    global _pool, _pool_workers
    if _pool is None or _pool_workers != workers:
        _close_pool()
        _pool = multiprocessing.get_context("spawn").Pool(workers)
        _pool_workers = workers
    return _pool


def _close_pool():
    global _pool
    if _pool is not None:
        _pool.terminate()
        _pool.join()
        _pool = None


atexit.register(_close_pool)


def verify_batch(responses: list[str], golds: list[str], workers: int = 2,
                 timeout: float = 5.0) -> list[bool]:
    """is_correct for every (response, gold) pair, in order; a timeout or error is False.

    workers=0 checks in this process, one by one (no per-item timeout beyond math-verify's own).
    """
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    if workers <= 0:
        return [is_correct(r, g) for r, g in zip(responses, golds)]
    results = [False] * len(responses)
    pending = list(range(len(responses)))
    while pending:
        pool = _get_pool(workers)
        jobs = {i: pool.apply_async(is_correct, (responses[i], golds[i])) for i in pending}
        stuck = None
        for i in pending:
            try:
                results[i] = bool(jobs[i].get(timeout))
            except multiprocessing.TimeoutError:
                stuck = i  # stays False
                break
            except Exception:  # a worker that died: a wrong answer
                pass
        if stuck is None:
            break
        # Keep what finished, kill the stuck worker with its pool, retry the rest in a new pool.
        for i in pending:
            if i != stuck and jobs[i].ready() and jobs[i].successful():
                results[i] = bool(jobs[i].get())
        retry = [i for i in pending if i != stuck and not jobs[i].ready()]
        _close_pool()
        pending = retry
    return results


def reward_batch(responses: list[str], golds: list[str], format_weight: float = 0.0,
                 repetition_penalty: bool = False, workers: int = 2,
                 timeout: float = 5.0) -> tuple[list[float], list[bool]]:
    """(rewards, correct) for a batch. `correct` is the accuracy alone, without format or
    penalty: it is what AMPO's trigger and the logged accuracy use."""
    correct = verify_batch(responses, golds, workers, timeout)
    rewards = [combine(c, r, format_weight, repetition_penalty) for c, r in zip(correct, responses)]
    return rewards, correct


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check a response's final answer.")
    parser.add_argument("response", help="the model's response text")
    parser.add_argument("gold", help="the gold answer, bare (e.g. 1/2)")
    args = parser.parse_args(argv)
    print(f"answer: {extract_answer(args.response)}")
    print(f"correct: {is_correct(args.response, args.gold)}")


if __name__ == "__main__":
    main()
