"""GHPO: Guided Hybrid Policy Optimization, on the core of ampo.py.

    python ghpo.py --config config.yaml                         # GHPO, the embedded default
    python ghpo.py --config config.yaml --ghpo.hint_ratios=[]   # the GRPO baseline

GHPO (Liu et al., arXiv 2507.10628; official code hkgc-1/GHPO) is GRPO with hints on demand:

  1. sample G answers for every prompt and check them, exactly as GRPO does;
  2. a prompt is "hard" when none of its G answers is correct;
  3. regenerate every hard prompt's whole group from a hinted prompt: the problem followed by
     the first 25% of a worked solution; groups still hard get 50%, then 75%;
  4. train on the final groups with plain GRPO: advantages (R - mean) / (std + 1e-4) within
     each group, a policy-gradient loss that averages each group's token mean, no KL.

Every step so mixes plain RL (prompts the policy can already solve) with something close to
imitation (prompts it can solve only after reading part of the answer): a curriculum that
adapts, prompt by prompt, to what the policy can do right now.

Only the rollout differs from GRPO, so this file imports the rest from ampo.py (the config,
generation, reward, advantages, the loss, the training loop; the plumbing comes from infra.py
through it) and adds:

  1. config                    4. which prompt the loss sees
  2. the hint text             5. the rollout with hint stages
  3. difficulty and escalation 6. main()
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field

import ampo
import infra
import verify

# =============================================================================================
# 1. Config: ampo.py's dataclasses, GHPO's defaults, and a `ghpo:` block
# =============================================================================================
# config.yaml is shared by both scripts: ghpo.py reads its model, data, train and log blocks and
# skips its `ampo:` block. Defaults below follow the official GHPO release (hkgc-1/GHPO, its
# recipe config and src/ghpo/ghpo_trainer.py) unless a comment says otherwise.

# The official sentence, verbatim, including the space after the first newline.
HINT_TEMPLATE = ("\n The following text is the beginning part of the answer, which you can "
                 "refer to for solving the problem:\n")


@dataclass
class GHPOConfig:
    hint_ratios: list = field(default_factory=lambda: [0.25, 0.5, 0.75])  # [] -> GRPO
    hint_template: str = HINT_TEMPLATE
    hint_unit: str = "char"  # char: round(len * ratio) characters (the code) | token
    hint_includes_answer: bool = False  # official: true (the hint may reach \boxed{answer})
    start_hint_step: int = 0  # steps of plain GRPO before hints start (paper: 20)
    loss_context: str = "sampled_prompt"  # sampled_prompt | original_prompt(_is) | code_quirk
    skip_unparsed_gold: bool = True  # official: a gold math-verify cannot parse is never trained


@dataclass
class Config(ampo.Config):
    # GHPO's loss is TRL's GRPO loss: one update per batch (so the ratio is 1), advantages
    # scaled by the group std, no entropy bonus, no weight decay, no KL. TRL's default loss,
    # bnpo, takes a token mean per micro-batch, and the recipe's micro-batch (8 completions,
    # G = 8) is one group: every group's token mean weighs the same. That is group_mean, exact
    # whatever our micro_batch_size; dapo would weigh groups by their token counts.
    train: ampo.TrainConfig = field(default_factory=lambda: ampo.TrainConfig(
        max_steps=160, prompts_per_step=112, max_completion_length=2048, learning_rate=1e-6,
        weight_decay=0.0, num_minibatches=1, entropy_coeff=0.0, loss_type="group_mean",
        scale_rewards=True))
    # GHPO is GRPO plus hints: AMPO's teachers stay off, whatever a shared config.yaml says.
    ampo: ampo.AMPOConfig = field(default_factory=lambda: ampo.AMPOConfig(
        trigger="never", num_off_policy_targets=0, max_available_targets=0))
    log: ampo.LogConfig = field(default_factory=lambda: ampo.LogConfig(output_dir="runs/ghpo"))
    ghpo: GHPOConfig = field(default_factory=GHPOConfig)


LOSS_CONTEXTS = ("sampled_prompt", "original_prompt", "original_prompt_is",
                 "code_quirk")  # see section 4


def check_config(cfg: Config, world: int = 1):
    """ampo.check_config (every shared key), then the ghpo: block; errors name the key, before
    any model or data is loaded."""
    ampo.check_config(cfg, world)
    g = cfg.ghpo
    r = g.hint_ratios
    if (not all(isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x <= 1 for x in r)
            or sorted(r) != list(r)):
        raise infra.InputError(f"config key ghpo.hint_ratios: increasing numbers in (0, 1], "
                               f"got {r!r}")
    infra.one_of(g.hint_unit, ("char", "token"), "ghpo.hint_unit")
    infra.one_of(g.loss_context, LOSS_CONTEXTS, "ghpo.loss_context")
    infra.check_ranges(cfg, {"at least 0": "ghpo.start_hint_step"})


# =============================================================================================
# 2. The hint: a prefix of the worked solution, appended to the user turn
# =============================================================================================
# A hinted user turn is the original one, the fixed sentence, and the first `ratio` of the
# worked solution, cut by characters as in the official code (it may end mid-word: that is
# fine, the model starts its own answer rather than continuing the hint):
#
#     "{problem}" + "\n The following text is the beginning part of the answer, ...:\n" + prefix
#
# The prefix always comes from the whole solution at the current ratio: stages do not stack.
# One deliberate change from the code: the final boxed answer is cut from the solution first
# (hint_includes_answer: false). A hint should lead the way, not hand over the answer; with
# short solutions a 75% prefix of the official text reaches the \boxed{} itself.


def strip_final_answer(solution: str, rule: str = "ours") -> str:
    """The worked solution up to its final answer, which is dropped: the \\boxed{} (or
    <answer> block) that `rule` (train.answer_rule) reads as the final answer.

    >>> strip_final_answer("3 + 4 = 7.\\nSo the answer is \\\\boxed{7}.")
    '3 + 4 = 7.\\nSo the answer is'
    >>> strip_final_answer("no final answer here")
    'no final answer here'
    """
    span = verify.answer_span(solution, rule)
    if span is None:
        return solution
    # cut at the \boxed{ (or the <answer> tag) that opens the answer, else at the answer itself
    starts = [m.start() for m in verify.BOX.finditer(solution) if m.end() == span[0]]
    tag = solution.rfind("<answer>", 0, span[0])
    start = starts[0] if starts else tag if tag >= 0 else span[0]
    return solution[:start].rstrip()


def hint_prefix(solution: str, ratio: float, include_answer: bool = False,
                tokenizer=None, rule: str = "ours") -> str:
    """The first `ratio` of the worked solution: round(len * ratio) characters, or tokens when
    a tokenizer is given. Python's round() halves to even, as in the official code."""
    source = solution if include_answer else strip_final_answer(solution, rule)
    if tokenizer is None:
        return source[:round(len(source) * ratio)]
    offsets = tokenizer(source, add_special_tokens=False,
                        return_offsets_mapping=True)["offset_mapping"]
    n = round(len(offsets) * ratio)
    return source[:offsets[n - 1][1]] if n else ""


def build_hinted_prompt(problem: str, solution: str, ratio: float, template: str = HINT_TEMPLATE,
                        include_answer: bool = False, tokenizer=None, rule: str = "ours") -> str:
    """The hinted user turn: problem + the official sentence + a prefix of the solution.

    A worked example at the three default ratios. The text before the box is 56 characters,
    so the prefixes are 14, 28 and 42 characters long, and may stop mid-number:

    >>> sol = "First, 12 + 30 = 42.\\nNext, 42 - 2 = 40.\\nSo the answer is \\\\boxed{40}."
    >>> hinted = build_hinted_prompt("What is 12 + 30 - 2?", sol, 0.25)
    >>> hinted == "What is 12 + 30 - 2?" + HINT_TEMPLATE + "First, 12 + 30"
    True
    >>> [hint_prefix(sol, r) for r in (0.25, 0.5, 0.75)]
    ['First, 12 + 30', 'First, 12 + 30 = 42.\\nNext, 4', 'First, 12 + 30 = 42.\\nNext, 42 - 2 = 40.\\nSo']
    """
    return problem + template + hint_prefix(solution, ratio, include_answer, tokenizer, rule)


def hinted_prompt_text(tokenizer, row: dict, cfg: Config, ratio: float) -> tuple[str, str]:
    """The chat-formatted hinted prompt of a row, and the hint prefix it contains.

    The hint goes at the end of the last user turn (not into the assistant's answer: the model
    writes a fresh response). If the hinted prompt is longer than data.max_prompt_length
    tokens, the hint is cut from its end until it fits; the problem and the sentence are never
    cut, and the same text is used to generate and to train (the official trainer cut the
    training prompt from the left while vLLM got it whole: a mismatch we do not copy).
    """
    g = cfg.ghpo
    messages = infra.chat_messages(row, cfg.data.prompt_template, cfg.data.system_prompt,
                                   cfg.data.example)
    user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    floor = len(messages[user]["content"]) + len(g.hint_template)  # where the prefix starts
    content = build_hinted_prompt(messages[user]["content"], row["solution"], ratio,
                                  g.hint_template, g.hint_includes_answer,
                                  tokenizer if g.hint_unit == "token" else None,
                                  cfg.train.answer_rule)
    while True:
        messages[user]["content"] = content
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
        excess = len(tokenizer(text, add_special_tokens=False)["input_ids"]) \
            - cfg.data.max_prompt_length
        if excess <= 0 or len(content) == floor:
            return text, content[floor:]
        # Drop the last `excess` tokens of the user turn, but never cut into the floor.
        offsets = tokenizer(content, add_special_tokens=False,
                            return_offsets_mapping=True)["offset_mapping"]
        cut = offsets[max(len(offsets) - excess, 0)][0] if excess < len(offsets) else 0
        content = content[:max(cut, floor)]


def answer_in_hint(prefix: str, gold: str) -> bool:
    """Does the hint already state the gold answer (as a whole number or expression)?

    Logged as hint_has_answer: on short solutions a long hint often contains the answer
    in an intermediate line even though the final box was cut.

    >>> answer_in_hint("First, 12 + 30 = 42.", "42"), answer_in_hint("First, 142 - 1", "42")
    (True, False)
    """
    return re.search(rf"(?<![\w.]){re.escape(gold.strip())}(?![\w])", prefix) is not None


# =============================================================================================
# 3. Difficulty detection and hint escalation
# =============================================================================================
# A prompt is hard iff all G rollouts fail the accuracy check (a format reward never counts).
# It is decided online, on the rollouts of the current policy, and re-decided after every stage
# on the regenerated groups. Each stage regenerates the WHOLE group of every still-hard prompt,
# all of them in one batched generate call, so a group stays homogeneous: all G answers come
# from one prompt, which is what the group baseline needs. A group still hard after the last
# stage is kept as it is: with a correctness-only reward its advantages are all 0.


def is_hard(correct_in_group) -> bool:
    """True iff none of the group's rollouts is correct.

    >>> is_hard([False] * 8), is_hard([False] * 7 + [True])
    (True, False)
    """
    return not any(correct_in_group)


def escalate(correct, group_size: int, ratios, regenerate):
    """Run the hint stages. Returns (the hint ratio of every group's final rollouts, stages).

    correct: per rollout (group_size per group, in order). regenerate(groups, ratio) must
    resample those groups from prompts hinted at `ratio` and return their new correct flags
    (group_size per group, in order). 0.0 in the result means "no hint". stages holds, per
    ratio, the groups that were hard when it started and the ones it rescued.

    A hand-made batch of 4 groups of 2: group 0 is solved without a hint, group 1 by the 25%
    hint, group 2 by the 50% hint, and group 3 by none, so it keeps its 75% rollouts.

    >>> outcomes = {0.25: [1, 0, 0, 0, 0, 0], 0.5: [0, 1, 0, 0], 0.75: [0, 0]}
    >>> ratios, stages = escalate([1, 0, 0, 0, 0, 0, 0, 0], 2, [0.25, 0.5, 0.75],
    ...                           lambda groups, ratio: outcomes[ratio])
    >>> ratios
    [0.0, 0.25, 0.5, 0.75]
    >>> [(s["ratio"], s["hard"], s["rescued"]) for s in stages]
    [(0.25, [1, 2, 3], [1]), (0.5, [2, 3], [2]), (0.75, [3], [])]
    """
    G = group_size
    correct = list(correct)
    group_ratio = [0.0] * (len(correct) // G)
    stages = []
    for ratio in ratios:
        hard = [i for i in range(len(group_ratio)) if is_hard(correct[i * G:(i + 1) * G])]
        new = regenerate(hard, ratio) if hard else []  # one batched call for the whole stage
        for n, i in enumerate(hard):
            correct[i * G:(i + 1) * G] = new[n * G:(n + 1) * G]
            group_ratio[i] = ratio
        rescued = [i for i in hard if not is_hard(correct[i * G:(i + 1) * G])]
        stages.append({"ratio": ratio, "hard": hard, "rescued": rescued})
    return group_ratio, stages


# =============================================================================================
# 4. Which prompt the loss sees
# =============================================================================================
# The completions of a hinted group were sampled from the hinted prompt q*, so the loss must
# condition on q*: log pi(o | q*), as the paper's equations write it. The hint tokens sit in
# the prompt, so they are context, never targets. This is the default, sampled_prompt.
#
# The official code does something else by accident (src/ghpo/ghpo_trainer.py): after every
# stage it rebuilds the prompts, and a group hinted at an EARLIER stage falls back to the
# original question whenever a later stage regenerates anything. Its hint-induced answer is then
# trained as if the policy had produced it unaided. `code_quirk` reproduces that;
# `original_prompt` trains every group on the original question (the "Guide" paper's context,
# without its importance correction). With one update per batch the ratio is 1 either way, so
# both are numerically safe; they differ in what is learned. Both are off-policy: the answer
# came from pi(. | q + hint), and the loss treats it as a sample of pi(. | q).
#
# `original_prompt_is` is Guide's correction (Nath et al., arXiv 2506.13923): train on the
# original question q, with pi_old taken behind the prompt that sampled the answer, q + hint,
# so the PPO ratio of a hinted answer's token is
#
#   r_t = pi_theta(o_t | q, o_<t) / pi_old(o_t | q + hint, o_<t)
#
# clipped as usual. On the first update r_t = pi(o_t | q) / pi(o_t | q + hint): small where
# the hint made a token likely. ampo.add_logprobs takes that pi_old (rollout["sampled_prompts"]
# names the prompt each group was sampled from); ppo_kl and clip_frac show how far apart the
# two contexts are.


def loss_ratios(group_ratios, last_ran: float | None, mode: str = "sampled_prompt"):
    """The hint ratio of the prompt each group is trained on (0.0: the original prompt).

    last_ran is the ratio of the last stage that regenerated any group (None: no stage did).

    >>> final = [0.0, 0.25, 0.5, 0.75]
    >>> loss_ratios(final, 0.75), loss_ratios(final, 0.75, "code_quirk")
    ([0.0, 0.25, 0.5, 0.75], [0.0, 0.0, 0.0, 0.75])
    >>> loss_ratios([0.0, 0.25], 0.25, "code_quirk"), loss_ratios(final, 0.75, "original_prompt")
    ([0.0, 0.25], [0.0, 0.0, 0.0, 0.0])
    """
    if mode == "sampled_prompt":
        return list(group_ratios)
    if mode in ("original_prompt", "original_prompt_is"):
        return [0.0] * len(group_ratios)
    if mode == "code_quirk":
        return [r if r == last_ran else 0.0 for r in group_ratios]
    raise ValueError(f"config key ghpo.loss_context: {'|'.join(LOSS_CONTEXTS)}, got {mode!r}")


# =============================================================================================
# 5. The rollout: GRPO's groups, then the hint stages
# =============================================================================================


def replace_groups(rollout: dict, sub: dict, groups: list[int], group_size: int):
    """Put the groups of rollout `sub` (in `groups` order) into `rollout`, prompts included."""
    G = group_size
    for n, i in enumerate(groups):
        rollout["prompts"][i] = sub["prompts"][n]
        for key in ampo.SEQUENCE_KEYS:
            rollout[key][i * G:(i + 1) * G] = sub[key][n * G:(n + 1) * G]


def rollout_step(model, tokenizer, rows: list[dict], prompt_texts: list[str], cfg: Config,
                 step: int, **_) -> tuple[dict, dict]:
    """GHPO's rollout function for ampo.train(), which calls it by keyword (ampo.rollout_step
    has the list; rng and lockstep serve AMPO's teachers, unused here). Returns (rollout,
    metrics). Hints start after ghpo.start_hint_step steps (step is 1-based)."""
    G, g = cfg.train.num_generations, cfg.ghpo
    # Stage 0 is plain GRPO: ampo's sampled and scored groups, with no teacher.
    rollout, metrics = ampo.sample_step(model, tokenizer, rows, prompt_texts, cfg)
    ratios = g.hint_ratios if step > g.start_hint_step else []
    hard0 = [i for i in range(len(rows)) if is_hard(rollout["correct"][i * G:(i + 1) * G])]
    has_answer, hinted_correct, rollout["guidance"] = [], [], {}  # guidance: for samples.jsonl
    tick = time.perf_counter()

    def regenerate(groups, ratio):
        texts, prefixes = zip(*(hinted_prompt_text(tokenizer, rows[i], cfg, ratio)
                                for i in groups))
        has_answer.extend(answer_in_hint(p, rows[i]["answer"]) for p, i in zip(prefixes, groups))
        sub, _ = ampo.sample_groups(model, tokenizer, [rows[i] for i in groups], list(texts), cfg)
        sub["source"] = [f"hint-{ratio:g}"] * len(sub["source"])
        replace_groups(rollout, sub, groups, G)  # the group's prompt becomes the hinted one
        hinted_correct.extend(sub["correct"])
        for n, (i, hint) in enumerate(zip(groups, prefixes)):  # each stage a group went through
            rollout["guidance"].setdefault(i, {"stages": []})["stages"].append(
                {"ratio": ratio, "hint": hint, "correct": sum(sub["correct"][n * G:(n + 1) * G])})
        return sub["correct"]

    group_ratio, stages = escalate(rollout["correct"], G, ratios, regenerate)
    # The loss context: keep the hinted prompt, or go back to the original (see section 4).
    last_ran = max((s["ratio"] for s in stages if s["hard"]), default=None)
    if g.loss_context == "original_prompt_is":  # pi_old behind the prompts that sampled
        rollout["sampled_prompts"] = list(rollout["prompts"])
    for i, r in enumerate(loss_ratios(group_ratio, last_ran, g.loss_context)):
        if r == 0.0:
            rollout["prompts"][i] = prompt_texts[i]

    B, nan = len(rows), float("nan")
    metrics.update({
        # share of the batch's prompts still hard before stage 1, after stage 1, 2, 3
        "hard_frac": [len(hard0) / B] + [(len(s["hard"]) - len(s["rescued"])) / B
                                         for s in stages],
        # share of the batch's prompts rescued (first solved) by stage 1, 2, 3
        "rescued_frac": [len(s["rescued"]) / B for s in stages],
        # how many groups were trained on answers sampled with each hint ratio ("0": none)
        "hint_hist": dict(sorted(Counter(f"{r:g}" for r in group_ratio).items())),
        "hinted_frac": sum(r > 0 for r in group_ratio) / B,
        "accuracy_hinted": sum(hinted_correct) / len(hinted_correct) if hinted_correct else nan,
        "hint_has_answer": sum(has_answer) / len(has_answer) if has_answer else nan,
    })
    metrics["time"]["hints"] = time.perf_counter() - tick
    return rollout, metrics


# =============================================================================================
# 6. main()
# =============================================================================================


def format_metrics(step: int, m: dict) -> str:
    """One line per step: stage-by-stage hard shares, rescues and the hint histogram."""
    t = m["time"]
    hard = ">".join(f"{x:.2f}" for x in m["hard_frac"])
    rescued = "/".join(f"{x:.2f}" for x in m["rescued_frac"]) or "-"
    return (f"step {step}: reward {m['reward']:.3f} acc {m['accuracy']:.3f} "
            f"acc_hinted {m['accuracy_hinted']:.3f} hard {hard} rescued {rescued} "
            f"hints {m['hint_hist']} ent {m['entropy']:.3f} len {m['completion_len']:.0f} "
            f"gnorm {m['grad_norm']:.3f} loss {m['loss']:+.4f} | gen {t['generate']:.1f}s "
            f"hints {t['hints']:.1f}s train {t['train']:.1f}s {m['tokens_per_s']:.0f} tok/s "
            f"{m['peak_memory_gib']:.1f} GiB")


# Rows whose gold answer math-verify cannot parse. The official accuracy reward is None for
# them (src/open_r1/rewards.py L78-L81), a NaN in the trainer (ghpo_trainer.py L979): a NaN is
# not <= 0, so the group is never "all wrong" and never hinted (L997-L1001), and the reward sum
# skips it (nansum, L1189): only the format term is left (0 here, train.format_weight). Kept
# and scored by verify.py, a gold it cannot read either makes every answer wrong and the group
# hinted at every stage, forever; one it can read (bare LaTeX such as \sqrt{51}, wrapped in
# $...$ by is_correct) trains where the official code does not. ghpo.skip_unparsed_gold (on,
# as the official code) skips every row the official check rejects, at load time, counted.


def gold_answer_parses(row: dict) -> bool:
    """keep_row for ampo.train: math-verify finds an answer in the row's gold, as the official
    reward parses it (verify.gold_parses on the text the file gives)."""
    return verify.gold_parses(row["gold_text"])


def train(cfg: Config, resume: bool = False) -> dict:
    """ampo.py's training loop with GHPO's rollout. Returns the last step's metrics."""
    check_config(cfg, infra.world_size())
    hints_on = bool(cfg.ghpo.hint_ratios) and cfg.ghpo.start_hint_step < cfg.train.max_steps
    return ampo.train(cfg, rollout_fn=rollout_step, log_line=format_metrics,
                      require_solution=hints_on, resume=resume, teachers=False,
                      keep_row=gold_answer_parses if cfg.ghpo.skip_unparsed_gold else None)


def main(argv=None):
    """`python ghpo.py --config config.yaml [--section.key=value ...]` (see the top)."""
    return infra.cli(argv, __doc__, Config, ("ampo",), train, check_config, ampo.evaluate)


if __name__ == "__main__":
    main()
