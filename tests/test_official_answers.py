"""Which answer counts (train.answer_rule: ours | ampo | ghpo), and AMPO's trigger after the
repetition penalty: the official codes' rules on hand-made responses and rollouts.

Official sources (the repositories' HEAD as stored):
  AMPO  SII-Enigma/AMPO ampo/verl/verl/utils/reward_score/prime_math_train/__init__.py, the
        training grader (reward_impl_version=5 in exp_scripts/train_ampo.sh L40, phase
        train in adaptive_mix_src/math_verify_reward.py L45-L48): compute_score L455-L491
        removes <think>...</think> (L448-L453), takes the last <answer> block when both tags
        are there (L439-L446, L461-L462), then match_answer (L376-L434): the last \\boxed{}
        (L394-L398), else text heuristics ("answer is", "=", ...).
        The trigger: adaptive_mix_src/mix_dapo_trainer.py L1381-L1387 (a rollout is solved iff
        its reward, repetition penalty included (L857-L866), is > format_coefficient + 0.5).
  GHPO  hkgc-1/GHPO src/open_r1/rewards.py L43-L85, accuracy_reward: math-verify's parse with
        LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False),
        extraction_mode "first_match", on the whole completion (no <think> removal).
"""

import random
from pathlib import Path

import pytest

import ampo
import infra
import verify

# (response, gold, ours, official AMPO, official GHPO, rules where we knowingly differ).
# A rule listed last gives the opposite verdict here; docs/official.md's tables say why.
ANSWERS = [
    # a bare box: every rule
    ("\\boxed{42}", "42", True, True, True, ()),
    # a bare tag: AMPO's block; GHPO finds no LaTeX after "answer" and gives 0
    ("<answer> 42 </answer>", "42", True, True, False, ()),
    # $...$ in the block: the tag's own word "answer" anchors it for GHPO (parser.py answer_re)
    ("<answer> $42$ </answer>", "42", True, True, True, ()),
    # a bare \frac is LaTeX to math-verify even without dollars
    ("<answer>\n\\frac{1}{2}\n</answer>", "1/2", True, True, True, ()),
    # a box in the reasoning, then the block: the block counts (AMPO L461), GHPO the box
    ("<think>\nso \\boxed{3}\n</think>\n<answer>\n4\n</answer>", "4", True, True, False, ()),
    ("<think>\nso \\boxed{3}\n</think>\n<answer>\n4\n</answer>", "3", False, False, True, ()),
    ("First \\boxed{3}, then checking: <answer> 4 </answer>", "4", True, True, False, ()),
    # a box inside the block wins (match_answer L394-L398)
    ("<think>\nhmm\n</think>\n<answer>\n\\boxed{\\frac{3}{4}}\n</answer>", "3/4",
     True, True, True, ()),
    # a box after the block: the block still counts for AMPO; GHPO takes any box first
    ("<answer> $1$ </answer> Wait: \\boxed{2}", "2", False, False, True, ()),
    # the only block is inside <think>: AMPO removes it (L459) and grades the box
    ("<think>\nmaybe <answer>3</answer>\n</think>\n\\boxed{4}", "4", False, True, True, ()),
    # both tags, no block in order: AMPO grades "" (L441-L446); ours falls back to the box
    ("x </answer> y <answer> \\boxed{5}", "5", True, False, True, ()),
    # an unterminated block: not both tags, so AMPO grades the whole text's box
    ("\\boxed{4} <answer> 42", "4", True, True, True, ()),
    # GHPO does not remove <think>: an anchored $3$ there beats the bare block
    ("<think>\nthe answer is $3$\n</think>\n<answer>\n5\n</answer>", "5", True, True, False, ()),
    # GHPO's anchors in math-verify's order: "answer:" (priority 100) before "answer" (200)
    ("Answer: $3$. The answer is $5$", "3", False, False, True, ()),
    # AMPO's text heuristics (match_answer L378-L428), not implemented: ours gives no answer
    ("The answer is $42$.", "42", False, True, True, ("ampo",)),
    ("<answer> The answer is 42 </answer>", "42", False, True, False, ("ampo",)),
    ("so $x = 42$", "42", False, True, False, ("ampo",)),
    ("$42$", "42", False, True, False, ("ampo",)),
    # two boxes: math-verify's boxed="all" joins them into {1, 2} (latex2sympy2_extended 1.11,
    # math-verify 0.9 here; GHPO pinned 0.5.2); ours takes the last box
    ("\\boxed{1} then \\boxed{2}", "2", True, True, False, ("ghpo",)),
]
RULE_COLUMN = {"ours": 2, "ampo": 3, "ghpo": 4}


@pytest.mark.parametrize("rule", verify.RULES)
@pytest.mark.parametrize("case", ANSWERS, ids=[f"row{i}" for i in range(len(ANSWERS))])
def test_which_answer_counts(case, rule):
    response, gold, differs = case[0], case[1], case[5]
    official = case[RULE_COLUMN[rule]]
    expected = (not official) if rule in differs else official
    assert verify.is_correct(response, gold, rule=rule) is expected


def test_ghpo_column_is_the_official_math_verify_call():
    """The GHPO column against the official call itself (rewards.py L48-L75), on the
    installed math-verify: the same configuration, the whole completion, first_match."""
    from latex2sympy2_extended import NormalizationConfig
    from math_verify import LatexExtractionConfig, parse, verify as mv_verify

    config = [LatexExtractionConfig(
        normalization_config=NormalizationConfig(nits=False, malformed_operators=False,
                                                 basic_latex=True, boxed="all", units=True),
        boxed_match_priority=0, try_extract_without_anchor=False)]
    for response, gold, _, _, ghpo, differs in ANSWERS:
        answer = parse(response, extraction_config=config, extraction_mode="first_match")
        official = bool(mv_verify(parse(gold, extraction_mode="first_match"), answer))
        assert official is ghpo, response
        if "ghpo" not in differs:
            assert verify.is_correct(response, gold, rule="ghpo") is official, response


def test_answer_span_per_rule_points_into_the_original_text():
    t = "<think>\nsee \\boxed{3}\n</think>\n<answer> the answer is $7$ </answer>"
    got = {rule: t[slice(*verify.answer_span(t, rule))] for rule in verify.RULES}
    assert got == {"ours": " the answer is $7$ ", "ampo": " the answer is $7$ ", "ghpo": "3"}
    t = "The final answer is $2$. answer: $5$"  # priority 50 beats the later "answer:" (100)
    assert t[slice(*verify.answer_span(t, "ghpo"))] == "2"
    with pytest.raises(ValueError, match="train.answer_rule"):
        verify.answer_span("\\boxed{1}", "prime")


def test_the_rule_reaches_the_worker_processes():
    responses = ["<answer> 42 </answer>", "First \\boxed{3}, then <answer> 4 </answer>"]
    golds = ["42", "4"]
    assert verify.verify_batch(responses, golds, workers=2, rule="ours") == [True, True]
    assert verify.verify_batch(responses, golds, workers=2, rule="ghpo") == [False, False]
    rewards, correct = verify.reward_batch(responses, golds, format_weight=0.1, workers=2,
                                           rule="ghpo")
    assert correct == [False, False] and rewards == pytest.approx([0.1, 0.1])


def test_answer_rule_is_checked_and_set_by_each_paper_config():
    cfg = ampo.Config()
    assert cfg.train.answer_rule == "ours"  # the embedded default keeps our rule
    cfg.train.answer_rule = "prime"
    with pytest.raises(infra.InputError, match="train.answer_rule: one of ours|ampo|ghpo"):
        ampo.check_config(cfg)
    import ghpo
    root = Path(__file__).resolve().parent.parent
    for name, rule, cls in [("ampo_qwen2.5-7b-instruct_4gpu.yaml", "ampo", ampo.Config),
                            ("ampo_qwen2.5-1.5b-instruct_1gpu.yaml", "ampo", ampo.Config),
                            ("ghpo_qwen2.5-math-7b.yaml", "ghpo", ghpo.Config)]:
        other = ("ampo",) if cls is ghpo.Config else ("ghpo",)
        cfg = infra.load_config(str(root / "configs" / name), [], cls, other)
        assert cfg.train.answer_rule == rule, name
    cfg = infra.load_config(str(root / "config.yaml"), [], ampo.Config, ("ghpo",))
    assert cfg.train.answer_rule == "ours"


# ---------------------------------------------------------------------------------------------
# AMPO's trigger after the repetition penalty (mix_dapo_trainer.py L1384)
# ---------------------------------------------------------------------------------------------

REPEAT = " ".join(["one two three four five six seven eight nine ten"] * 10)  # repetitive


def guidance_setup(tiny_model_dir, texts, golds, format_weight, penalty, trigger, k):
    model, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    cfg = ampo.Config()
    cfg.train.num_generations, cfg.train.max_completion_length = 4, 64
    cfg.train.format_weight, cfg.train.repetition_penalty = format_weight, penalty
    cfg.ampo.trigger, cfg.ampo.num_off_policy_targets, cfg.ampo.selection = trigger, k, "dataset"
    rows = [{"problem": f"What is {g}?", "messages": None, "answer": g, "solution": None,
             "teachers": [(f"t{j}", f"\\boxed{{{g}}}") for j in range(3)]} for g in golds]
    prompts = [infra.build_prompt(tok, r, cfg.data.prompt_template, None) for r in rows]
    gold_per_text = [g for g in golds for _ in range(4)]
    rewards, correct = verify.reward_batch(texts, gold_per_text, format_weight, penalty,
                                           workers=0, rule="ampo")
    rollout = {"completions": [[7]] * len(texts), "rewards": rewards, "correct": correct,
               "off_policy": [False] * len(texts), "truncated": [False] * len(texts),
               "source": ["policy"] * len(texts), "texts": list(texts),
               "sampler_logp": [None] * len(texts)}
    return rollout, rows, prompts, model, tok, cfg


def test_a_group_whose_only_correct_answer_is_repetitive_is_guided(tiny_model_dir):
    # group 0: the only correct answer repeats itself: reward 0.9 + 0.1 - 1 = 0.0, not > 0.6
    # group 1: one clean correct answer (1.0): solved, not guided
    texts = [REPEAT + " <answer> 4 </answer>", "<answer> 5 </answer>", "\\boxed{6}", "no",
             "<answer> 7 </answer>", "<answer> 8 </answer>", "\\boxed{9}", "no"]
    rollout, rows, prompts, model, tok, cfg = guidance_setup(
        tiny_model_dir, texts, ["4", "7"], 0.1, True, "adaptive", 2)
    assert rollout["correct"][:4] == [True, False, False, False]  # the accuracy says solved
    assert rollout["rewards"][0] == pytest.approx(0.0)
    # GHPO's is_hard reads the accuracy alone (official ghpo_trainer.py L997-L1000: the
    # accuracy reward column): for GHPO group 0 is solved
    import ghpo
    assert ghpo.is_hard(rollout["correct"][:4]) is False
    m = ampo.apply_guidance(rollout, rows, prompts, model, tok, cfg, random.Random(0))
    assert m["guided_frac"] == 0.5
    assert sum(rollout["off_policy"][:4]) == 2 and not any(rollout["off_policy"][4:])


def test_teachers_replace_every_unsolved_rollout_and_keep_the_solved_one(tiny_model_dir):
    # trigger always, k = 3, w = 0.1, penalty on. Solved (official L1384, R > 0.1 + 0.5): a
    # correct answer without tags (0.9). Unsolved, so the slots (official incorrect_positions,
    # L1385-L1387): the repetitive correct one (0.0), a wrong tagged one (0.1), a wrong one (0.0)
    texts = ["\\boxed{4}", REPEAT + " <answer> 4 </answer>", "<answer> 5 </answer>", "\\boxed{6}"]
    rollout, rows, prompts, model, tok, cfg = guidance_setup(
        tiny_model_dir, texts, ["4"], 0.1, True, "always", 3)
    assert rollout["rewards"] == pytest.approx([0.9, 0.0, 0.1, 0.0])
    ampo.apply_guidance(rollout, rows, prompts, model, tok, cfg, random.Random(0))
    assert rollout["off_policy"] == [False, True, True, True]
