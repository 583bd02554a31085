"""verify.py: is a model's final answer right? Extraction, math-verify equivalence, rewards.

    python verify.py "so the answer is \\boxed{\\frac{1}{2}}" "0.5"
    answer: \\frac{1}{2}
    correct: True

Three steps, each its own function:

  1. find the final answer, by one of three rules (`train.answer_rule`, section 1):
     ours: the last <answer>...</answer> block (a \\boxed{} inside it wins), else the last
     \\boxed{...}; ampo and ghpo: the official codes' rules;
  2. compare it with the gold answer using math-verify, so 1/2, 0.5 and \\frac{1}{2} agree;
  3. turn that into a reward, optionally with the official format and repetition terms.

Checks run in worker processes with a per-item timeout (verify_batch): math-verify can take
seconds on adversarial text, and a training step must never hang or crash on one answer.
A timeout, like any error, is a wrong answer. This module does not import torch.
"""

from __future__ import annotations

import argparse
import atexit
import math
import multiprocessing
import multiprocessing.connection
import re
import time

# =============================================================================================
# 1. Finding the final answer
# =============================================================================================

BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
ANSWER_CLOSE = "</answer>"
BRACE = re.compile(r"[{}]")


def closing_braces(text: str, start: int = 0) -> dict[int, int]:
    """{index of a brace: index of the brace that closes it} for every { at or after `start`
    that closes, in one left-to-right pass with a stack of open braces.

    A brace's partner depends only on the text after it (the first } where the depth counted
    from it returns to zero), so any `start` before a brace gives it the same partner. No brace
    is escaped: \\{ and \\} count like any other.

    >>> closing_braces("{a{b}c}d{")
    {2: 4, 0: 6}
    """
    pairs: dict[int, int] = {}
    open_at: list[int] = []
    for m in BRACE.finditer(text, start):
        if m.group() == "{":
            open_at.append(m.start())
        elif open_at:  # a } with nothing open closes nothing
            pairs[open_at.pop()] = m.start()
    return pairs


def last_box(text: str, start: int = 0, end: int | None = None) -> tuple[int, int] | None:
    """Span of the content of the last complete \\boxed{...} inside text[start:end], or None.

    Linear time: one pass pairs the braces, so text with many unclosed boxes is cheap.

    >>> last_box("\\\\boxed{1} \\\\boxed{2")  # an unterminated box does not count
    (7, 8)
    """
    end = len(text) if end is None else end
    boxes = [m.end() - 1 for m in BOX.finditer(text, start, end)]  # the index of each box's {
    if boxes:
        pairs = closing_braces(text[:end], boxes[0])
        for open_at in reversed(boxes):
            if open_at in pairs:
                return open_at + 1, pairs[open_at]
    return None


# Which answer counts, three rules (train.answer_rule), all on the decoded response:
#
#   ours  the last <answer>...</answer> block, and inside it the last \boxed{} if it has one;
#         without a block, the last \boxed{} anywhere. A box in the reasoning before the block
#         is a step, not the answer.
#   ampo  the official AMPO grader (verl/utils/reward_score/prime_math_train/__init__.py,
#         compute_score L455-L466, for training under reward_impl_version 5): <think> removed,
#         then, if the text has both tags, the last <answer> block (L461-L462; tags in the wrong
#         order leave an empty answer), and in it the last \boxed{} (match_answer, L394-L398).
#         Not here: match_answer's text heuristics ("answer is", "=", the last sentence) and
#         the PRIME grader itself; see docs/official.md.
#   ghpo  the official GHPO accuracy reward (src/open_r1/rewards.py L53-L72): math-verify's
#         LaTeX extraction with boxes first (boxed_match_priority 0) and no unanchored LaTeX
#         (try_extract_without_anchor False): the last \boxed{} anywhere, else the last math
#         ($...$, $$...$$, \(...\), \[...\], a bare \frac{a}{b}) that follows the word "answer"
#         (the <answer> tag has it) within 50 characters, in math-verify's anchor order. A bare
#         <answer> 42 </answer> has no answer.
RULES = ("ours", "ampo", "ghpo")
THINK = re.compile(r"<think>.*?</think>", re.DOTALL)
_NUM = r"-?\d+(?:[.,]\d+)?"
# math-verify's LaTeX environments (parser.py, make_latex_env_pattern), their content capped at
# 1,000 characters: uncapped, 50,000 characters of unclosed "answer \(" take ~50 s to search
# (math-verify stops that with its timeout); no real final answer is that long.
_IN = "{1,1000}?"
MATH = "|".join([
    rf"(?<!\\)\$\$((?:[^$]|\$(?!\$)){_IN})(?<!\\)\$\$",
    rf"(?<!\\)\\\[((?:[^\\]|\\(?!\])){_IN})(?<!\\)\\\]",
    rf"(?<!\\|\d)\$((?:\\[$]|[^\n$]){_IN})(?<!\\)\$",
    rf"(?<!\\)\\\(((?:[^\\\n]|\\(?!\))){_IN})(?<!\\)\\\)",
    r"\s\[([^\n\]\[]+?)\]\s", rf"(-?\\frac{{{_NUM}}}{{{_NUM}}})"])
ANCHORED = [re.compile(anchor + f"(?:{MATH})", re.DOTALL) for anchor in (  # in priority order
    r"(?i:final answer.{0,100}?)\s+is:?\s*", r"(?i:answer):.{0,50}?", r"(?i:answer).{0,50}?")]


def answer_span(text: str, rule: str = "ours") -> tuple[int, int] | None:
    """Character span [start, end) of the final answer in `text` under `rule`, or None.

    The trainer also uses the span to put the gold answer in place of a teacher's own answer.

    >>> t = "2 + 2 = \\\\boxed{4}, not \\\\boxed{\\\\frac{1}{2}}"
    >>> s, e = answer_span(t); t[s:e]
    '\\\\frac{1}{2}'
    >>> t = "so \\\\boxed{3}? <answer> 12 </answer>"
    >>> [t[slice(*answer_span(t, rule))] for rule in RULES]
    [' 12 ', ' 12 ', '3']
    """
    if not isinstance(text, str):
        return None
    if rule == "ghpo":
        box = last_box(text)
        if box is not None:
            return box
        for anchor in ANCHORED:  # the match that ends last, as math-verify's first_match takes
            found = list(anchor.finditer(text))
            if found:
                m = found[-1]
                return next(m.span(g) for g in range(1, m.re.groups + 1) if m.group(g))
        return None
    if rule == "ampo":  # <think> blocks blanked out: the same text without them, same offsets
        text = THINK.sub(lambda m: " " * len(m.group()), text)
    elif rule != "ours":
        raise ValueError(f"config key train.answer_rule: one of {'|'.join(RULES)}, got {rule!r}")
    # Every match of ANSWER_TAG ends at a </answer>, so searching only up to the last one gives
    # the same matches. It also keeps the search linear: the regex follows each <answer> to the
    # next </answer>, and left alone would follow every <answer> with none after it to the end
    # of the text (quadratic); before the last </answer>, every <answer> it tries finds one.
    last_close = text.rfind(ANSWER_CLOSE)
    blocks = (list(ANSWER_TAG.finditer(text, 0, last_close + len(ANSWER_CLOSE)))
              if last_close >= 0 else [])
    if not blocks and rule == "ampo" and "<answer>" in text and "</answer>" in text:
        return None  # the official extract_last_answer returns "" here
    if blocks:
        start, end = blocks[-1].span(1)
        return last_box(text, start, end) or (start, end)
    return last_box(text)


def extract_answer(text: str, rule: str = "ours") -> str | None:
    """The final answer of a response under `rule`, stripped of spaces and dollars, or None.

    >>> extract_answer("First \\\\boxed{1}. Finally \\\\boxed{\\\\frac{3}{4}}.")
    '\\\\frac{3}{4}'
    >>> extract_answer("<answer> $42$ </answer>"), extract_answer("no answer here")
    ('42', None)
    """
    span = answer_span(text, rule)
    if span is None:
        return None
    inner = text[span[0]:span[1]]
    if BOX.search(inner):  # a box inside the answer (\boxed{\boxed{1}}, $\boxed{1}$)
        return extract_answer(inner)
    answer = inner.strip().strip("$").strip()
    return answer or None


def gold_in_final_answer(response: str, gold: str,
                         rule: str = "ours") -> tuple[str, int] | None:
    """The response with its final answer (answer_span under `rule`, train.answer_rule)
    replaced by `gold`, and where the gold starts, or None without a final answer. The text after the answer is kept so the string
    stays well formed (the closing brace); a causal model scores the gold from what precedes it.

    >>> gold_in_final_answer("so \\\\boxed{12}.", "13")
    ('so \\\\boxed{13}.', 10)
    >>> gold_in_final_answer("<answer> 1 </answer>", "2")  # the block's spaces go too
    ('<answer>2</answer>', 8)
    """
    span = answer_span(response, rule)
    if span is None:
        return None
    return response[:span[0]] + gold + response[span[1]:], span[0]


def gold_in_answer_tag(response: str, gold: str, eos: str) -> tuple[str, int] | None:
    """The official AMPO comprehension text of one teacher, and where the gold answer starts.

    official: verl/adaptive_mix_src/mix_dapo_trainer.py, replace_answer_with_gt_batch with the
    release's format_mode R1_nothink. The response (EOS appended, L2014-L2015) must hold exactly
    one "<answer>" (L2031-L2040), else None (the official gold mask is empty: score 0). The text
    is kept up to that tag, then "<answer>" + the teacher's own whitespace after the tag, one
    space if none (L2055-L2067) + gold + " " (L2028, L2073) + "</answer>" + EOS (L2083-L2086);
    the teacher's "</answer>" and anything after it are dropped. The gold starts at the last
    occurrence of gold before "</answer>" + EOS (L2114-L2115, L1924). The official check that
    something follows the tag (L2052) cannot fail: the appended EOS always does.

    >>> gold_in_answer_tag("so <answer>\\n 12 </answer> done", "13", "<E>")
    ('so <answer>\\n 13 </answer><E>', 13)
    >>> gold_in_answer_tag("<answer></answer>", "7", "<E>")  # an empty block is scored too
    ('<answer> 7 </answer><E>', 9)
    >>> gold_in_answer_tag("\\\\boxed{7}", "7", "<E>") is None  # no tag: score 0 (+ format 0)
    True
    """
    if response.count("<answer>") != 1:
        return None
    head, after = (response + eos).split("<answer>")
    space = after[:len(after) - len(after.lstrip(" \n\t\r"))] or " "
    text = head + "<answer>" + space + gold + " </answer>" + eos
    return text, text[:-len("</answer>" + eos)].rfind(gold)


# =============================================================================================
# 2. Equivalence with math-verify
# =============================================================================================
# math-verify parses both sides into sympy and compares them. It needs LaTeX delimiters to
# know what to parse, so the gold answer is wrapped as $...$ and the prediction as \boxed{...}.
# Its own timeouts use signal.alarm, which works only in a process's main thread: that is why
# batches run in worker processes, never threads. signal.alarm counts whole seconds, so a
# timeout is rounded up; math-verify turns a timeout into an empty parse or a False.


def is_correct(response: str, gold: str, timeout: float = 5.0, rule: str = "ours") -> bool:
    """Does the response's final answer equal the gold answer (given bare: 1/2, (1,2), 42)?

    `timeout` bounds each parse and comparison math-verify makes (a few per answer); `rule`
    says which answer counts (section 1).

    >>> is_correct("\\\\boxed{0.5}", "\\\\frac{1}{2}"), is_correct("\\\\boxed{21}", "12")
    (True, False)
    """
    try:
        answer = extract_answer(response, rule)
        if answer is None:
            return False
        gold = str(gold).strip().strip("$").strip()
        if answer == gold:  # the common case needs no parser
            return True
        from math_verify import parse, verify

        seconds = max(1, math.ceil(timeout))
        gold_parsed = parse(f"${gold}$", parsing_timeout=seconds)
        if not gold_parsed:
            gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=seconds)
        answer_parsed = parse(f"\\boxed{{{answer}}}", parsing_timeout=seconds)
        return bool(verify(gold_parsed, answer_parsed, timeout_seconds=seconds))
    except Exception:  # a parser error or a timeout is a wrong answer, never a crash
        return False


def gold_parses(gold: str) -> bool:
    """Does math-verify find an answer in a gold answer, as the data file gives it?

    The official GHPO reward's check (hkgc-1/GHPO src/open_r1/rewards.py L48-L51, L78-L81):
    `parse(solution, extraction_mode="first_match")` with math-verify's default targets (LaTeX
    in delimiters, plain expressions); when it finds nothing the accuracy reward is None and the
    row is never hinted. Bare LaTeX fails it for want of $...$, although is_correct, which
    wraps the gold in $...$ itself, reads it: ghpo.skip_unparsed_gold follows the official rule.

    >>> gold_parses("204"), gold_parses("\\\\frac{14}{3}"), gold_parses("\\\\boxed{\\\\sqrt{51}}")
    (True, True, True)
    >>> gold_parses("\\\\sqrt{51}"), gold_parses("p - q"), gold_parses("\\\\text{Evelyn}")
    (False, False, False)
    """
    from math_verify import parse

    try:
        return len(parse(str(gold), extraction_mode="first_match")) > 0
    except Exception:  # a parser error or a timeout: nothing found, as in the official reward
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
           repetition_penalty: bool = False, rule: str = "ours") -> float:
    """The reward of one response.

    >>> reward("<answer> 4 </answer>", "4", 0.1), reward("\\\\boxed{4}", "4", 0.1)
    (1.0, 0.9)
    """
    return combine(is_correct(response, gold, rule=rule), response, format_weight,
                   repetition_penalty)


# =============================================================================================
# 4. Batches in worker processes, with a per-item timeout
# =============================================================================================
# A few worker processes live for the whole run (starting processes every step would cost more
# than the checks), each with its own pipe to this process, which hands them one item at a
# time. "spawn" starts clean interpreters: forking a trainer that holds torch's thread pools
# can deadlock.
#
# The clock. A right answer must not turn wrong because the machine is busy, so `timeout`
# bounds an item's own checking and nothing else:
#   - in the worker, math-verify stops each parse and comparison after `timeout` seconds, and
#     is_correct makes that a wrong answer. This is how a slow adversarial answer ends: in the
#     worker, which stays alive and takes the next item.
#   - here, a backstop of BACKSTOP such limits catches a worker stuck where no signal reaches it
#     (one long call into C). Its clock starts when the item is handed to a worker that has
#     started and said "ready", so neither a worker's start-up (importing sympy and math-verify
#     takes seconds on a loaded machine) nor the wait behind slower items counts. A worker
#     still on its item at the backstop is killed, the item is wrong, and a replacement starts;
#     like every start-up, the replacement's counts against no item.
# A worker that exits before it says "ready" could never start: that is an error, not a batch
# of wrong answers. The usual cause is a script that calls verify_batch outside
# `if __name__ == "__main__":`: every spawned process re-runs the main script, calls
# verify_batch in turn, and dies trying to start workers of its own.

BACKSTOP = 10  # limits; is_correct makes at most seven limited calls (3 parses, 4 comparisons)
_workers: list[dict] = []  # {"process", "conn", "ready", "item", "since"}: see _start_worker
CANNOT_START = (
    "verify_batch: a worker process exited (code {}) before it was ready. Workers are spawned "
    "processes, which re-run the main script: call verify_batch under "
    "`if __name__ == \"__main__\":`, or pass workers=0 to check in this process.")


def _worker(conn):
    """A worker process: warm up, say "ready", then check one item at a time until EOF.

    The warm-up check imports math-verify and sympy and fills their caches, so that no item
    pays for them.
    """
    is_correct("\\boxed{0.5}", "\\frac{1}{2}")
    conn.send("ready")
    while True:
        try:
            response, gold, timeout, rule = conn.recv()
        except EOFError:  # this process is closing the pool, or is gone
            return
        conn.send(is_correct(response, gold, timeout, rule))


def _start_worker():
    context = multiprocessing.get_context("spawn")
    conn, worker_conn = context.Pipe()
    # daemon: at exit multiprocessing stops it rather than waiting (it never ends on its own)
    process = context.Process(target=_worker, args=(worker_conn,), daemon=True)
    process.start()
    worker_conn.close()  # only the worker holds its end now, so its death reads as EOF here
    _workers.append({"process": process, "conn": conn, "ready": False, "item": None, "since": 0.0})


def _stop_worker(worker):
    worker["process"].kill()
    worker["process"].join()
    worker["conn"].close()
    _workers.remove(worker)


def _close_pool():
    while _workers:
        _stop_worker(_workers[-1])


atexit.register(_close_pool)


def _receive(worker, results: list[bool]):
    """Take one message from a worker: "ready", an answer, or EOF if it died."""
    try:
        message = worker["conn"].recv()
    except EOFError:
        if not worker["ready"]:
            worker["process"].join()
            code = worker["process"].exitcode
            _close_pool()
            raise RuntimeError(CANNOT_START.format(code)) from None
        _stop_worker(worker)  # it died on its item (which stays wrong) or while idle
        _start_worker()
        return
    if message == "ready":
        worker["ready"] = True
    else:
        results[worker["item"]] = message
        worker["item"] = None


def verify_batch(responses: list[str], golds: list[str], workers: int = 2,
                 timeout: float = 5.0, rule: str = "ours") -> list[bool]:
    """is_correct for every (response, gold) pair, in order; a timeout or error is False.

    `timeout` (whole seconds) limits each parse and comparison math-verify makes for an item;
    a worker still on an item BACKSTOP times that long after it took it is killed, and the
    item is False (section 4 explains the clock). workers=0 checks in this process, one by
    one, with math-verify's limits alone.

    >>> verify_batch(["\\\\boxed{2/4}", "<answer> 3 </answer>"], ["0.5", "4"], workers=0)
    [True, False]
    """
    if len(responses) != len(golds):
        raise ValueError(f"{len(responses)} responses but {len(golds)} gold answers")
    if workers <= 0:
        return [is_correct(r, g, timeout, rule) for r, g in zip(responses, golds)]
    while len(_workers) > workers:
        _stop_worker(_workers[-1])
    while len(_workers) < workers:
        _start_worker()
    backstop = BACKSTOP * max(1, math.ceil(timeout))
    results = [False] * len(responses)
    todo = list(reversed(range(len(responses))))  # pop() takes the items in order
    try:
        while todo or any(w["item"] is not None for w in _workers):
            for worker in _workers:
                if worker["ready"] and worker["item"] is None and todo:
                    i = todo.pop()
                    try:
                        worker["conn"].send((responses[i], golds[i], timeout, rule))
                    except OSError:  # it died while idle: _receive replaces it, i waits
                        todo.append(i)
                        continue
                    worker["item"], worker["since"] = i, time.monotonic()
            # Sleep until a message (or a death) arrives, or until the nearest backstop.
            deadlines = [w["since"] + backstop for w in _workers if w["item"] is not None]
            wait_for = max(0.0, min(deadlines) - time.monotonic()) if deadlines else None
            ready = multiprocessing.connection.wait([w["conn"] for w in _workers], wait_for)
            for worker in [w for w in _workers if w["conn"] in ready]:
                _receive(worker, results)
            for worker in [w for w in _workers if w["item"] is not None]:
                if time.monotonic() - worker["since"] >= backstop:
                    _stop_worker(worker)  # its item stays False
                    _start_worker()
    finally:
        # A batch cut short (Ctrl-C) must not leave answers in flight for the next one.
        for worker in [w for w in _workers if w["item"] is not None]:
            _stop_worker(worker)
    return results


def reward_batch(responses: list[str], golds: list[str], format_weight: float = 0.0,
                 repetition_penalty: bool = False, workers: int = 2, timeout: float = 5.0,
                 rule: str = "ours") -> tuple[list[float], list[bool]]:
    """(rewards, correct) for a batch. `correct` is the accuracy alone, without format or
    penalty: it is what GHPO's trigger and the logged accuracy use (AMPO's reads the reward)."""
    correct = verify_batch(responses, golds, workers, timeout, rule)
    rewards = [combine(c, r, format_weight, repetition_penalty) for c, r in zip(correct, responses)]
    return rewards, correct


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check a response's final answer.")
    parser.add_argument("response", help="the model's response text")
    parser.add_argument("gold", help="the gold answer, bare (e.g. 1/2)")
    parser.add_argument("--rule", choices=RULES, default="ours", help="which answer counts")
    args = parser.parse_args(argv)
    print(f"answer: {extract_answer(args.response, args.rule)}")
    print(f"correct: {is_correct(args.response, args.gold, rule=args.rule)}")


if __name__ == "__main__":
    main()
