"""train.answer_rule reaches every place that reads a final answer, not only the reward: the
teacher-pool filter, the gold normalisation, the comprehension span and GHPO's hint cut.

Each test uses a text whose final answer differs between two rules:

    <think>so \\boxed{1}</think><answer>2</answer>

"ours" reads the last <answer> block (2); "ghpo" (math-verify, boxes first) the last \\boxed{}
anywhere (1).
"""

import json

import ampo
import ghpo
import infra
import verify

TWO_RULES = "<think>so \\boxed{1}</think><answer>2</answer>"


def test_the_text_reads_differently_under_the_two_rules():
    assert verify.extract_answer(TWO_RULES, "ours") == "2"
    assert verify.extract_answer(TWO_RULES, "ghpo") == "1"


def test_the_teacher_pool_is_filtered_by_the_configured_rule(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"problem": "q", "answer": "2", "teachers": [
        {"source": "tagged", "response": TWO_RULES},
        {"source": "plain", "response": "\\boxed{2}"}]}) + "\n")
    rows, stats = infra.load_dataset(str(path), workers=0, rule="ours")
    assert [s for s, _ in rows[0]["teachers"]] == ["tagged", "plain"]
    rows, stats = infra.load_dataset(str(path), workers=0, rule="ghpo")
    assert [s for s, _ in rows[0]["teachers"]] == ["plain"] and stats["teachers_dropped"] == 1


def test_load_prompts_passes_train_answer_rule_to_the_pool(tiny_model_dir, tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"problem": f"q{i}", "answer": "2", "teachers": [
        {"source": "tagged", "response": TWO_RULES}]}) + "\n" for i in range(2)))
    _, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    for rule, kept in (("ours", 1), ("ghpo", 0)):
        cfg = ampo.Config()
        cfg.data.train_file, cfg.train.answer_rule, cfg.train.verifier_workers = str(path), rule, 0
        cfg.train.prompts_per_step = 2
        rows, _, _ = infra.load_prompts(cfg, tok, False, False)
        assert [len(r["teachers"]) for r in rows] == [kept, kept], rule


def test_a_boxed_gold_is_read_by_the_configured_rule():
    rec = {"problem": "q", "answer": TWO_RULES}
    assert infra.normalise_row(rec, "x", "ours")["answer"] == "2"
    assert infra.normalise_row(rec, "x", "ghpo")["answer"] == "1"


def test_load_eval_prompts_reads_golds_by_the_configured_rule(tiny_model_dir, tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps({"problem": "q", "answer": TWO_RULES}) + "\n")
    _, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    cfg = ampo.Config()
    cfg.train.verifier_workers, cfg.train.answer_rule = 0, "ghpo"
    assert infra.load_eval_prompts(cfg, tok, str(path))[0][0]["answer"] == "1"


def test_the_comprehension_span_is_the_answer_the_rule_grades(tiny_model_dir):
    _, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    assert verify.gold_in_final_answer(TWO_RULES, "7", "ours")[0] == \
        "<think>so \\boxed{1}</think><answer>7</answer>"
    assert verify.gold_in_final_answer(TWO_RULES, "7", "ghpo")[0] == \
        "<think>so \\boxed{7}</think><answer>2</answer>"
    for rule, text in (("ours", "<answer>7</answer>"), ("ghpo", "\\boxed{7}</think>")):
        ids, mask = ampo.comprehension_inputs(tok, "Q: ", TWO_RULES, "7", "span", rule)
        assert text in tok.decode(ids)
        gold_ids = [i for i, m in zip(ids, mask) if m]
        assert "7" in tok.decode(gold_ids) and "2" not in tok.decode(gold_ids)


def test_ghpos_hint_cut_drops_the_answer_the_rule_grades(tiny_model_dir):
    solution = "First, 1 + 1 = 2.\n" + TWO_RULES
    assert ghpo.strip_final_answer(solution, "ours") == "First, 1 + 1 = 2.\n<think>so \\boxed{1}</think>"
    assert ghpo.strip_final_answer(solution, "ghpo") == "First, 1 + 1 = 2.\n<think>so"
    _, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    cfg = ghpo.Config()
    cfg.data.example = None
    row = {"problem": "q", "messages": None, "solution": solution}
    for rule, hint in (("ours", "First, 1 + 1 = 2.\n<think>so \\boxed{1}</think>"),
                       ("ghpo", "First, 1 + 1 = 2.\n<think>so")):
        cfg.train.answer_rule = rule
        assert ghpo.hinted_prompt_text(tok, row, cfg, 1.0)[1] == hint, rule
