"""Tests of ghpo.py: the hint text and the schedule against hand-computed values, then the
rollout, the loss context and whole runs on the tiny random Qwen2 (tests/conftest.py)."""

import json
import math

import pytest
import torch

import ampo
import infra
import ghpo

SOLUTION = "First, 12 + 30 = 42.\nNext, 42 - 2 = 40.\nSo the answer is \\boxed{40}."

# ---------------------------------------------------------------------------------------------
# The hint text
# ---------------------------------------------------------------------------------------------


def test_hint_text_at_every_ratio():
    # Without the final box the source is "First, ... So the answer is": 56 characters.
    source = "First, 12 + 30 = 42.\nNext, 42 - 2 = 40.\nSo the answer is"
    assert ghpo.strip_final_answer(SOLUTION) == source and len(source) == 56
    want = {0.25: source[:14], 0.5: source[:28], 0.75: source[:42], 1.0: source}
    for ratio, prefix in want.items():
        text = ghpo.build_hinted_prompt("What is 12 + 30 - 2?", SOLUTION, ratio)
        assert text == ("What is 12 + 30 - 2?\n The following text is the beginning part of the "
                        "answer, which you can refer to for solving the problem:\n" + prefix)
    assert want[0.5] == "First, 12 + 30 = 42.\nNext, 4"  # a character cut stops mid-number
    # The official behaviour keeps the answer: 68 characters, so 75% is 51 (it stops in
    # "answer"); on a shorter solution the same 75% would reach the box, as 97% does here.
    assert len(SOLUTION) == 68
    assert ghpo.hint_prefix(SOLUTION, 0.75, include_answer=True) == SOLUTION[:51]
    assert ghpo.hint_prefix(SOLUTION, 0.97, include_answer=True).endswith("\\boxed{40")
    assert ghpo.hint_prefix(SOLUTION, 1.0, include_answer=True) == SOLUTION
    # round() halves to even, as Python does in the official code: 0.5 * 5 = 2.5 -> 2
    assert ghpo.hint_prefix("abcde", 0.5) == "ab"
    assert ghpo.hint_prefix("abcdefg", 0.5) == "abcd"  # 3.5 -> 4


def test_strip_final_answer_cases():
    # the LAST complete box goes, with everything after it; nested braces are one box
    assert ghpo.strip_final_answer("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "a \\boxed{1} b"
    assert ghpo.strip_final_answer("so <answer> 12 </answer>") == "so"
    assert ghpo.strip_final_answer("\\boxed{7}") == ""
    assert ghpo.strip_final_answer("unclosed \\boxed{7") == "unclosed \\boxed{7"


def test_hint_prefix_by_tokens(tiny_model_dir):
    _, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    source = ghpo.strip_final_answer(SOLUTION)
    enc = tok(source, add_special_tokens=False, return_offsets_mapping=True)
    n = len(enc["input_ids"])
    for ratio in (0.25, 0.5, 0.75):
        k = round(n * ratio)
        prefix = ghpo.hint_prefix(SOLUTION, ratio, tokenizer=tok)
        assert prefix == source[:enc["offset_mapping"][k - 1][1]]
        assert tok(prefix, add_special_tokens=False)["input_ids"] == enc["input_ids"][:k]
    assert ghpo.hint_prefix(SOLUTION, 0.0, tokenizer=tok) == ""


def test_answer_in_hint():
    assert ghpo.answer_in_hint("12 + 30 = 42.", "42")
    assert not ghpo.answer_in_hint("12 + 30 = 420.", "42")
    assert not ghpo.answer_in_hint("0.42 and 142", "42")
    assert ghpo.answer_in_hint("x = \\frac{1}{2}", "\\frac{1}{2}")


def hinted_cfg(tmp_path, max_prompt_length=1024, **ghpo_keys):
    cfg = ghpo.Config()
    cfg.data.max_prompt_length = max_prompt_length
    for k, v in ghpo_keys.items():
        setattr(cfg.ghpo, k, v)
    return cfg


def test_hinted_prompt_text_is_the_chat_prompt_with_the_hint(tiny_model_dir, tmp_path):
    _, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    row = {"problem": "What is 12 + 30 - 2?", "messages": None, "answer": "40",
           "solution": SOLUTION}
    cfg = hinted_cfg(tmp_path)
    text, prefix = ghpo.hinted_prompt_text(tok, row, cfg, 0.75)
    user = cfg.data.prompt_template.format(problem=row["problem"])
    assert prefix == "First, 12 + 30 = 42.\nNext, 42 - 2 = 40.\nSo"
    # the hint ends the user turn, after the format instruction; the assistant turn is empty
    assert text == ("<|im_start|>user\n" + user + ghpo.HINT_TEMPLATE + prefix
                    + "<|im_end|>\n<|im_start|>assistant\n")
    # official-schema rows bring their chat: the hint goes to the last user turn only
    chat = dict(row, messages=[{"role": "system", "content": "S"},
                               {"role": "user", "content": "Q?"}])
    text, _ = ghpo.hinted_prompt_text(tok, chat, cfg, 0.25)
    assert text.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nQ?\n The")
    assert chat["messages"][1]["content"] == "Q?"  # the row itself is untouched


def test_long_hint_is_cut_to_fit_max_prompt_length(tiny_model_dir, tmp_path):
    _, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    row = {"problem": "What is 1 + 1?", "messages": None, "answer": "2",
           "solution": "Add the tens. Add the ones. " * 30 + "\\boxed{2}"}
    full, _ = ghpo.hinted_prompt_text(tok, row, hinted_cfg(tmp_path), 0.75)
    n_full = len(tok(full, add_special_tokens=False)["input_ids"])
    limit = n_full - 40
    text, prefix = ghpo.hinted_prompt_text(tok, row, hinted_cfg(tmp_path, limit), 0.75)
    assert len(tok(text, add_special_tokens=False)["input_ids"]) <= limit
    assert 0 < len(prefix) and ghpo.hint_prefix(row["solution"], 0.75).startswith(prefix)
    # the problem and the sentence are never cut, even when nothing of the hint fits
    text, prefix = ghpo.hinted_prompt_text(tok, row, hinted_cfg(tmp_path, 5), 0.75)
    assert prefix == "" and "What is 1 + 1?" in text and ghpo.HINT_TEMPLATE in text


# ---------------------------------------------------------------------------------------------
# The schedule and the loss context
# ---------------------------------------------------------------------------------------------


def test_escalation_schedule_on_a_hand_made_batch():
    # 5 groups of 3. Group 0 is solved without a hint; 1 by the 25% hint; 2 by the 50% hint;
    # 3 never (it keeps its 75% rollouts); 4 is solved without a hint too.
    correct = [0, 1, 0] + [0] * 9 + [1, 1, 1]
    outcomes = {0.25: [0, 0, 1] + [0] * 6, 0.5: [1, 0, 0] + [0] * 3, 0.75: [0, 0, 0]}
    calls = []

    def regenerate(groups, ratio):
        calls.append((ratio, list(groups)))
        return outcomes[ratio]

    ratios, stages = ghpo.escalate(correct, 3, [0.25, 0.5, 0.75], regenerate)
    assert calls == [(0.25, [1, 2, 3]), (0.5, [2, 3]), (0.75, [3])]  # one call per stage
    assert ratios == [0.0, 0.25, 0.5, 0.75, 0.0]
    assert [s["rescued"] for s in stages] == [[1], [2], []]


def test_escalation_stops_calling_once_nothing_is_hard():
    calls = []

    def regenerate(groups, ratio):
        calls.append(ratio)
        return [1, 1]  # every regenerated group solves at once

    ratios, stages = ghpo.escalate([0, 0, 1, 0], 2, [0.25, 0.5, 0.75], regenerate)
    assert calls == [0.25] and ratios == [0.25, 0.0]
    assert [(s["hard"], s["rescued"]) for s in stages] == [([0], [0]), ([], []), ([], [])]
    # no ratios: GRPO, nothing is regenerated
    assert ghpo.escalate([0, 0], 2, [], regenerate) == ([0.0], [])
    assert calls == [0.25]


def test_loss_ratios_modes():
    final = [0.0, 0.25, 0.5, 0.75]
    assert ghpo.loss_ratios(final, 0.75) == final
    assert ghpo.loss_ratios(final, 0.75, "original_prompt") == [0.0] * 4
    # the official code's quirk: only groups regenerated at the last stage that ran keep it
    assert ghpo.loss_ratios(final, 0.75, "code_quirk") == [0.0, 0.0, 0.0, 0.75]
    assert ghpo.loss_ratios([0.0, 0.25, 0.5], 0.5, "code_quirk") == [0.0, 0.0, 0.5]
    assert ghpo.loss_ratios([0.25, 0.0], 0.25, "code_quirk") == [0.25, 0.0]
    assert ghpo.loss_ratios([0.0, 0.0], None, "code_quirk") == [0.0, 0.0]
    with pytest.raises(ValueError, match="ghpo.loss_context"):
        ghpo.loss_ratios(final, 0.75, "hinted")


# ---------------------------------------------------------------------------------------------
# The rollout with a scripted policy: real prompts, real verifier, real batch
# ---------------------------------------------------------------------------------------------
# The tiny random model never writes a correct \boxed{} answer, so to see groups rescued at
# chosen stages the policy is scripted: ampo.generate is replaced by a function that answers
# correctly (2 of 4 samples) once the prompt shows enough of the hint. The solutions are
# "aaaa bbbb cccc dddd": the 25% hint shows "aaaa", 50% "aaaa bbbb", 75% "aaaa bbbb cccc".
# Scoring is the real verifier; the prompts, splicing and batch are the real code.

ROWS = [  # (problem, answer, the hint word the scripted policy needs to answer right)
    ("What is 2 + 3?", "5", None),  # solved without a hint
    ("What is 10 + 7?", "17", "aaaa"),  # rescued by the 25% hint
    ("What is 21 + 30?", "51", "bbbb"),  # rescued by the 50% hint
    ("What is 4 + 4?", "8", "never"),  # never solved: keeps its 75% rollouts
]


def scripted_generate(tok):
    def generate(model, tokenizer, prompts, G, max_new, temperature=1.0, top_p=1.0):
        completions = []
        for p in prompts:
            _, answer, needs = next(r for r in ROWS if r[0] in p)
            knows = needs is None or needs in p.split(ghpo.HINT_TEMPLATE)[-1]
            for j in range(G):
                text = f"\\boxed{{{answer}}}" if knows and j % 2 == 0 else "\\boxed{0}"
                completions.append(tok(text, add_special_tokens=False)["input_ids"]
                                   + [tok.eos_token_id])
        return completions, [False] * len(completions), [None] * len(completions)
    return generate


def scripted_rollout(tiny_model_dir, tmp_path, monkeypatch, **ghpo_keys):
    model, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    monkeypatch.setattr(ampo, "generate", scripted_generate(tok))
    cfg = hinted_cfg(tmp_path, **ghpo_keys)
    cfg.train.num_generations, cfg.train.verifier_workers = 4, 0
    rows = [{"problem": p, "messages": None, "answer": a, "solution": "aaaa bbbb cccc dddd",
             "teachers": []} for p, a, _ in ROWS]
    texts = [infra.build_prompt(tok, r, cfg.data.prompt_template, None) for r in rows]
    rollout, m = ghpo.rollout_step(model, tok, rows, texts, cfg, step=1)
    return model, tok, cfg, rows, texts, rollout, m


def test_rollout_regenerates_only_failing_groups(tiny_model_dir, tmp_path, monkeypatch):
    _, tok, cfg, rows, texts, rollout, m = scripted_rollout(tiny_model_dir, tmp_path, monkeypatch)
    G = 4
    sources = [rollout["source"][i * G] for i in range(4)]
    assert sources == ["policy", "hint-0.25", "hint-0.5", "hint-0.75"]
    assert all(len(set(rollout["source"][i * G:(i + 1) * G])) == 1 for i in range(4))
    # rewards are the real verifier's on the final rollouts: 2 of 4 right in solved groups
    assert rollout["rewards"] == [1.0, 0, 1.0, 0] * 3 + [0.0] * 4
    assert m["accuracy"] == 2 / 16  # the policy on the original prompts (stage 0)
    assert m["hard_frac"] == [0.75, 0.5, 0.25, 0.25]
    assert m["rescued_frac"] == [0.25, 0.25, 0.0]
    assert m["hint_hist"] == {"0": 1, "0.25": 1, "0.5": 1, "0.75": 1}
    assert m["hinted_frac"] == 0.75
    # hinted rollouts: stage 1 had 3 groups (1 solved), stage 2 had 2 (1), stage 3 had 1 (0)
    assert m["accuracy_hinted"] == pytest.approx(4 / 24)
    assert m["hint_has_answer"] == 0.0
    # each group's prompt is the one it was sampled from
    for i, ratio in enumerate([0.0, 0.25, 0.5, 0.75]):
        want = texts[i] if ratio == 0 else ghpo.hinted_prompt_text(tok, rows[i], cfg, ratio)[0]
        assert rollout["prompts"][i] == want


def test_hinted_prompt_reaches_the_loss(tiny_model_dir, tmp_path, monkeypatch):
    model, tok, cfg, _, _, rollout, _ = scripted_rollout(tiny_model_dir, tmp_path, monkeypatch)
    batch = ampo.build_batch(tok, rollout, cfg.train)
    C = batch["completion_mask"].shape[1]
    for i in range(4):
        s = i * 4  # the first sequence of group i: its prompt tokens are the sampled prompt's
        prompt = batch["input_ids"][s, :-C][batch["attention_mask"][s, :-C].bool()].tolist()
        assert prompt == tok(rollout["prompts"][i], add_special_tokens=False)["input_ids"]
    assert "aaaa bbbb cccc" in tok.decode(batch["input_ids"][12])  # the 75% hint, in context
    # The log-probs the loss uses are those of the completion after the hinted prompt.
    s, comp = 12, rollout["completions"][12]
    with torch.no_grad():
        logp, _ = ampo.completion_logprobs(model, batch["input_ids"][s:s + 1],
                                           batch["attention_mask"][s:s + 1], C)
        ids = tok(rollout["prompts"][3], add_special_tokens=False)["input_ids"] + comp
        alone = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    want = [float(alone[len(ids) - len(comp) - 1 + t, comp[t]]) for t in range(len(comp))]
    assert logp[0, :len(comp)].tolist() == pytest.approx(want, abs=1e-5)
    # GRPO advantages with the std, within each final group: (1 - 0.5) / (0.57735 + 1e-4)
    a = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    assert batch["advantages"][:12].tolist() == pytest.approx([a, -a, a, -a] * 3, rel=1e-5)
    assert batch["advantages"][12:].tolist() == [0.0] * 4  # still hard: nothing to learn


@pytest.mark.parametrize("mode, hinted", [("code_quirk", [False, False, False, True]),
                                          ("original_prompt", [False] * 4)])
def test_loss_context_switches(tiny_model_dir, tmp_path, monkeypatch, mode, hinted):
    _, _, _, _, texts, rollout, _ = scripted_rollout(tiny_model_dir, tmp_path, monkeypatch,
                                                     loss_context=mode)
    assert [ghpo.HINT_TEMPLATE in p for p in rollout["prompts"]] == hinted
    for i in range(4):
        if not hinted[i]:
            assert rollout["prompts"][i] == texts[i]
    # the completions stay the hinted ones whatever the loss context
    assert rollout["source"][4] == "hint-0.25"


def test_original_prompt_is_takes_pi_old_behind_the_hinted_prompt(tiny_model_dir, tmp_path,
                                                                   monkeypatch):
    # Guide's ratio: r_t = pi_theta(o_t | q) / pi_old(o_t | q + hint). The loss sees q, pi_old
    # comes from q + hint; both are computed here by hand, one sequence at a time, unpadded.
    model, tok, cfg, _, texts, rollout, _ = scripted_rollout(
        tiny_model_dir, tmp_path, monkeypatch, loss_context="original_prompt_is")
    assert rollout["prompts"] == texts  # the loss context: the original questions
    assert [ghpo.HINT_TEMPLATE in p for p in rollout["sampled_prompts"]] == [False] + [True] * 3
    cfg.train.num_minibatches, cfg.train.loss_type = 1, "dapo"
    batch = ampo.add_logprobs(ampo.build_batch(tok, rollout, cfg.train), model, None, cfg.train)
    assert batch["old_rows"].tolist() == [False] * 4 + [True] * 12  # group 0 was not hinted

    def alone(prompt, comp):  # log pi(comp_t | prompt, comp_<t), no padding anywhere
        ids = tok(prompt, add_special_tokens=False)["input_ids"] + comp
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        return [float(lp[len(ids) - len(comp) - 1 + t, comp[t]]) for t in range(len(comp))]

    ratios, clipped = [], 0
    for s in range(4, 16):
        comp = rollout["completions"][s]
        hinted, plain = alone(rollout["sampled_prompts"][s // 4], comp), alone(texts[s // 4], comp)
        assert batch["old_logp"][s, :len(comp)].tolist() == pytest.approx(hinted, abs=1e-5)
        A = float(batch["advantages"][s])
        for h, p in zip(hinted, plain):
            r = math.exp(p - h)
            ratios.append(h - p)
            clipped += (r < 0.8 and A < 0) or (r > 1.2 and A > 0)
    ours = ampo.train_on_batch(model, *infra.make_optimizer(model, cfg.train), batch, cfg.train,
                               0.1)
    n = batch["completion_mask"].sum()  # ppo_kl: mean of log pi_old - log pi over all tokens
    assert ours["ppo_kl"] == pytest.approx(sum(ratios) / float(n), abs=1e-5)
    assert ours["clip_frac"] == pytest.approx(clipped / float(n), abs=1e-6)
    assert ours["ppo_kl"] != 0.0  # the hint changes the answer's probabilities


# ---------------------------------------------------------------------------------------------
# Config and data
# ---------------------------------------------------------------------------------------------


def test_config_yaml_is_shared_by_both_scripts():
    g = infra.load_config("config.yaml", [], ghpo.Config, ("ampo",))
    a = infra.load_config("config.yaml", [], ampo.Config, ("ghpo",))
    assert g.ghpo.hint_ratios == [0.25, 0.5, 0.75] and g.ghpo.loss_context == "sampled_prompt"
    # GHPO's own loss defaults, AMPO's teachers off, its own output folder
    assert (g.train.loss_type, g.train.scale_rewards, g.train.entropy_coeff) == ("group_mean",
                                                                                True, 0.0)
    assert g.ampo.trigger == "never" and g.log.output_dir == "runs/ghpo"
    assert (a.train.loss_type, a.train.scale_rewards, a.log.output_dir) == ("dr_grpo", False,
                                                                             "runs/ampo")
    assert g.train.max_steps == a.train.max_steps == 16  # the shared block
    with pytest.raises(ValueError, match="belongs to ampo.py"):
        infra.load_config("config.yaml", ["--ampo.trigger=always"], ghpo.Config, ("ampo",))
    with pytest.raises(ValueError, match="belongs to ghpo.py"):
        infra.load_config("config.yaml", ["--ghpo.start_hint_step=3"], ampo.Config, ("ghpo",))
    with pytest.raises(ValueError, match="ghpo.hint_units"):
        infra.load_config("config.yaml", ["--ghpo.hint_units=char"], ghpo.Config, ("ampo",))


@pytest.mark.parametrize("key, value", [("hint_ratios", [0.5, 0.25]), ("hint_ratios", [0, 0.5]),
                                        ("hint_ratios", [1.5]), ("hint_unit", "word"),
                                        ("loss_context", "hinted")])
def test_check_config_names_the_key(key, value):
    cfg = ghpo.Config()
    setattr(cfg.ghpo, key, value)
    with pytest.raises(ValueError, match=f"ghpo.{key}"):
        ghpo.check_config(cfg)


def test_ghpo_schema_rows(tmp_path):
    # official GHPO columns: solution = the gold (here a MATH-style solution), solution_hint
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps({"problem": "Compute 3 + 4.", "solution": "It is $\\boxed{7}$.",
                                "solution_hint": "Add: 3 + 4 = 7. \\boxed{7}"}) + "\n")
    rows, _ = infra.load_dataset(str(path), workers=0, require_solution=True)
    assert rows[0]["answer"] == "7" and rows[0]["solution"] == "Add: 3 + 4 = 7. \\boxed{7}"


def test_row_without_a_solution_is_an_error_naming_it(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"problem": "1 + 1?", "answer": "2", "solution": "1 + 1 = 2"})
                    + "\n" + json.dumps({"problem": "2 + 2?", "answer": "4"}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl row 1: no worked solution"):
        infra.load_dataset(str(path), workers=0, require_solution=True)
    rows, _ = infra.load_dataset(str(path), workers=0)  # hints off: fine
    assert rows[1]["solution"] is None


# ---------------------------------------------------------------------------------------------
# End to end on the tiny model
# ---------------------------------------------------------------------------------------------


def tiny_ghpo_config(model_dir, tmp_path, **ghpo_keys):
    cfg = ghpo.Config()
    cfg.model.name_or_path = model_dir
    cfg.data.train_file = str(tmp_path / "train.jsonl")
    with open(cfg.data.train_file, "w") as f:
        for a, b in [(2, 3), (10, 7), (21, 30), (4, 4)]:
            f.write(json.dumps({"problem": f"What is {a} + {b}?", "answer": str(a + b),
                                "solution": f"Add: {a} + {b} = {a + b}. Check it. \\boxed{{{a + b}}}"})
                    + "\n")
    cfg.log.output_dir, cfg.log.sample_every = str(tmp_path / "run"), 1
    t = cfg.train
    t.max_steps, t.prompts_per_step, t.num_generations, t.max_completion_length = 2, 2, 4, 8
    t.micro_batch_size, t.verifier_workers, t.learning_rate = 3, 0, 1e-3
    for k, v in ghpo_keys.items():
        setattr(cfg.ghpo, k, v)
    return cfg


def test_ghpo_train_end_to_end_tiny(tiny_model_dir, tmp_path):
    # one step of plain GRPO (cold start), then a step with hints
    cfg = tiny_ghpo_config(tiny_model_dir, tmp_path, start_hint_step=1)
    last = ghpo.train(cfg)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2]
    # the random tiny model never answers right: every group is hard at every stage
    assert lines[0]["hard_frac"] == [1.0] and lines[0]["hint_hist"] == {"0": 2}
    assert lines[1]["hard_frac"] == [1.0] * 4 and lines[1]["rescued_frac"] == [0.0] * 3
    assert lines[1]["hint_hist"] == {"0.75": 2} and lines[1]["hinted_frac"] == 1.0
    # "Add: 2 + 3 = 5. Check it." shows "= 5" at 75% only: 1 of the 3 hints of every group
    assert lines[1]["hint_has_answer"] == 1 / 3
    for key in ("reward", "accuracy", "entropy", "grad_norm", "tokens_per_s", "loss"):
        assert all(math.isfinite(x[key]) for x in lines), key
    assert set(lines[1]["time"]) >= {"generate", "hints", "train", "step"}
    samples = [json.loads(x) for x in open(tmp_path / "run" / "samples.jsonl")]
    assert {s["source"] for s in samples} == {"policy", "hint-0.75"}
    ckpt = tmp_path / "run" / "checkpoint-2"
    reloaded = infra.load_config(str(ckpt / "config.yaml"), [], ghpo.Config, ("ampo",))
    assert reloaded.ghpo.start_hint_step == 1 and reloaded.train.loss_type == "group_mean"
    assert last["step"] == 2


# Real MATH-500 rows (problem and gold as in the official AMPO data/valid.parquet, rows 241,
# 300, 337) in GHPO's schema. Their golds are bare LaTeX or text, which the official GHPO
# reward cannot parse: parse(solution, extraction_mode="first_match") is empty, so the reward
# is None (official: src/open_r1/rewards.py L48-L51, L78-L81), the row never counts as all
# wrong and is never hinted (src/ghpo/ghpo_trainer.py L979, L997-L1001).
UNPARSED_ROWS = [
    {"problem": "Define\n\\[p = \\sum_{k = 1}^\\infty \\frac{1}{k^2} \\quad \\text{and} \\quad "
                "q = \\sum_{k = 1}^\\infty \\frac{1}{k^3}.\\]Find a way to write\n\\[\\sum_{j = "
                "1}^\\infty \\sum_{k = 1}^\\infty \\frac{1}{(j + k)^3}\\]in terms of $p$ and $q.$",
     "solution": "p - q", "solution_hint": "Count the pairs (j, k) with j + k = n: n - 1."},
    {"problem": "The polynomial $x^3 - 3x^2 + 4x - 1$ is a factor of $x^9 + px^6 + qx^3 + r.$  "
                "Enter the ordered triple $(p,q,r).$",
     "solution": "(6,31,-1)", "solution_hint": "Let a be a root; then a^3 = 3a^2 - 4a + 1."},
    {"problem": "A figure skater is facing north when she begins to spin to her right. She spins "
                "2250 degrees. Which direction (north, south, east or west) is she facing when "
                "she finishes her spin?",
     "solution": "\\text{east}", "solution_hint": "2250 = 6 * 360 + 90 degrees."},
]


def test_rows_whose_gold_does_not_parse_are_skipped(tiny_model_dir, tmp_path, capsys):
    cfg = tiny_ghpo_config(tiny_model_dir, tmp_path)
    with open(cfg.data.train_file, "a") as f:
        for row in UNPARSED_ROWS:
            f.write(json.dumps(row) + "\n")
    cfg.train.max_steps, cfg.train.prompts_per_step, cfg.train.num_generations = 1, 4, 2
    ghpo.train(cfg)  # 4 prompts a step: with 7 rows, any 4 but for the skip
    assert "3 skipped by gold_answer_parses" in capsys.readouterr().out
    samples = [json.loads(x) for x in open(tmp_path / "run" / "samples.jsonl")]
    assert len(samples) == 4 and all(s["problem"].startswith("What is") for s in samples)
    # One usable row short of a step: the skip is what makes it so.
    cfg.train.prompts_per_step, cfg.log.output_dir = 5, str(tmp_path / "run2")
    with pytest.raises(infra.InputError, match="4 usable rows, fewer than"):
        ghpo.train(cfg)
    # The switch off: all 7 rows train, the 3 unparsed ones included.
    cfg.ghpo.skip_unparsed_gold, cfg.train.prompts_per_step = False, 7
    cfg.log.output_dir = str(tmp_path / "run3")
    ghpo.train(cfg)
    samples = [json.loads(x) for x in open(tmp_path / "run3" / "samples.jsonl")]
    assert sum(not s["problem"].startswith("What is") for s in samples) == 3


def test_main_rejects_ampo_overrides_and_a_missing_solution(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="belongs to ampo.py"):
        ghpo.main(["--config", "config.yaml", "--ampo.trigger=always"])
    cfg = tiny_ghpo_config(tiny_model_dir, tmp_path)
    with open(cfg.data.train_file, "a") as f:
        f.write(json.dumps({"problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    with pytest.raises(ValueError, match="row 4: no worked solution"):
        ghpo.train(cfg)
    cfg.ghpo.hint_ratios = []  # GRPO: no hints, no solution needed
    cfg.train.max_steps = 1
    assert ghpo.train(cfg)["hard_frac"] == [1.0]


@pytest.mark.slow
def test_default_config_end_to_end(tmp_path):
    """One step of the real default: SmolLM2-135M, the bundled data, GHPO's hint stages."""
    cfg = infra.load_config("config.yaml", [
        "--train.max_steps=1", "--train.prompts_per_step=2", "--train.num_generations=4",
        "--train.max_completion_length=16", f"--log.output_dir={tmp_path / 'run'}"],
        ghpo.Config, ("ampo",))
    last = ghpo.train(cfg)
    assert len(last["hard_frac"]) == 4 and len(last["rescued_frac"]) == 3
    assert sum(last["hint_hist"].values()) == 2 and math.isfinite(last["loss"])
    assert (tmp_path / "run" / "checkpoint-1" / "model.safetensors").exists()
