"""compare.py end to end at a tiny budget: three methods, one seed, one step each, evaluated
before and after; the JSON, the table and the PNGs written; a rerun trains nothing again, a
rerun with other settings refuses to reuse; the hard regime by its switch; per-type figures."""

import json
import subprocess

import pytest
import yaml

import ampo
import compare


def write_rows(path):
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b),
             "solution": f"First, {a} + {b} = {a + b}.\nSo the answer is \\boxed{{{a + b}}}.",
             "teachers": [{"source": "short", "response": f"\\boxed{{{a + b}}}"},
                          {"source": "long", "response": f"{a} + {b} = {a + b}. \\boxed{{{a + b}}}"}]}
            for a, b in [(2, 3), (10, 7), (21, 30), (4, 4)]]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def tiny_compare(tiny_model_dir, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl")
    config = {"model": {"name_or_path": tiny_model_dir},
              "data": {"train_file": data, "example": ["What is 1 + 1?", "\\boxed{2}"]},
              "train": {"max_steps": 1, "prompts_per_step": 2, "num_generations": 4,
                        "max_completion_length": 8, "micro_batch_size": 4, "verifier_workers": 0,
                        "learning_rate": 1e-3, "sampler": "generate", "bf16": False},
              "eval": {"files": [data]}, "log": {"sample_every": 1},
              "ghpo": {"hint_ratios": [0.5]}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path), tmp_path / "compare"


def test_compare_writes_results_and_plots_and_resumes(tiny_compare, monkeypatch):
    config, out = tiny_compare
    args = ["--config", config, "--seeds", "1", "--out", str(out), "--problems", "3"]
    record = compare.main(args)
    for name in ("results.json", "results.md", "curves.png", "mechanism.png", "passk.png"):
        assert (out / name).stat().st_size > 0, name
    for png in ("curves.png", "mechanism.png", "passk.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the comparison's page: the table, the plots inlined, the same group under each method
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == 3 and "<th>avg@8</th>" in page
    problem = json.loads((out / "grpo-seed1" / "samples.jsonl").read_text().splitlines()[0])
    side = page[page.index("The same groups"):]
    assert side.count(f'<p class="problem">{problem["problem"]}</p>') == 3  # one per method
    assert all(f"<h3>{m}</h3>" in side for m in ("GRPO", "AMPO", "GHPO"))
    assert "teacher short" in side and "hint ratio" in side  # AMPO's teachers, GHPO's stages
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == record["summary"]
    runs = {r["method"]: r for r in saved["runs"]}
    assert sorted(runs) == ["ampo", "ghpo", "grpo"]
    base = saved["base"][0]["eval"]
    assert base["problems"] == 3
    for method, r in runs.items():
        assert r["eval"]["problems"] == 3
        # pass@k never falls as k grows; avg@8 equals pass@1 (both are c / n per problem)
        ks = [r["eval"][f"pass@{k}"] for k in compare.PASS_K]
        assert ks == sorted(ks) and r["eval"]["avg@8"] == pytest.approx(r["eval"]["pass@1"])
        # the gain is paired by seed: after - before of the same seed
        gain = saved["summary"][method]["gain avg@8"]["mean"]
        assert gain == pytest.approx(r["eval"]["avg@8"] - base["avg@8"], abs=1e-4)
        # every method trained one step with the same budget
        metrics = (out / f"{method}-seed1" / "metrics.jsonl").read_text().splitlines()
        assert len(metrics) == 1
    assert "guided_first_half" in runs["ampo"]["train"]
    assert "guided_first_half" not in runs["grpo"]["train"]
    assert len(runs["ghpo"]["train"]["rescued_per_stage"]) <= 1
    table = (out / "results.md").read_text()
    assert all(f"| {m} |" in table for m in ("base", "grpo", "ampo", "ghpo"))
    # A rerun trains and evaluates nothing again: every run has its result.json.
    monkeypatch.setattr(ampo, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(compare.infra, "evaluate_files",
                        lambda *a, **k: pytest.fail("evaluated again"))
    assert compare.main(args)["summary"] == record["summary"]


def test_ghpo_gets_ampos_train_block_and_grpo_no_teachers(tiny_compare):
    config, out = tiny_compare
    cfgs = {m: compare.method_config(m, config, ["--train.learning_rate=3e-3"], 2, out / m, 5)
            for m in compare.METHODS}
    assert cfgs["ghpo"].train == cfgs["ampo"].train == cfgs["grpo"].train
    assert cfgs["ghpo"].train.learning_rate == 3e-3 and cfgs["ghpo"].train.seed == 2
    # the control: grpo without the entropy bonus, nothing else changed
    noent = cfgs["grpo-noent"]
    assert noent.train.entropy_coeff == 0.0 and cfgs["grpo"].train.entropy_coeff > 0
    assert compare.config_diff(compare.dataclasses.asdict(noent),
                               compare.dataclasses.asdict(cfgs["grpo"])) == [
        "log.output_dir", "train.entropy_coeff"]
    # without the comparison GHPO would train with its official loss
    assert compare.infra.load_config(config, [], compare.ghpo.Config,
                                     ("ampo",)).train.loss_type == "group_mean"
    assert cfgs["ampo"].train.loss_type != "group_mean"
    assert cfgs["grpo"].ampo.trigger == "never" and cfgs["ampo"].ampo.trigger == "adaptive"
    assert cfgs["ghpo"].ghpo.hint_ratios == [0.5]
    assert (cfgs["grpo"].eval.num_samples, cfgs["grpo"].eval.pass_k) == (8, [1, 2, 4, 8])


def test_a_rerun_with_other_settings_refuses_stale_results_or_retrains(tiny_compare):
    config, out = tiny_compare
    args = ["--config", config, "--seeds", "1", "--out", str(out), "--problems", "3",
            "--methods", "grpo"]
    first = compare.main(args)
    with pytest.raises(SystemExit, match=r"base-seed1.json was made with another config "
                                         r"\(train.learning_rate, train.max_steps differ\)"):
        compare.main(args + ["--train.max_steps=2", "--train.learning_rate=1e-2"])
    again = compare.main(args + ["--train.max_steps=2", "--rerun-stale"])
    assert len(again["runs"][0]["train"]) and again["budget"]["max_steps"] == 2
    assert len((out / "grpo-seed1" / "metrics.jsonl").read_text().splitlines()) == 2
    assert first["budget"]["max_steps"] == 1


def test_per_type_figures_and_type_groups_from_hand_made_evaluations():
    ev = lambda add1, chain, sub: {  # noqa: E731  three types, 2 / 1 / 1 problems
        "problems": 4, **{k: (2 * add1 + chain + sub) / 4 for k in compare.KEYS},
        "by_type": {"add1": {"problems": 2, **{k: add1 for k in compare.KEYS}},
                    "chain": {"problems": 1, **{k: chain for k in compare.KEYS}},
                    "sub": {"problems": 1, **{k: sub for k in compare.KEYS}}}}
    flat = compare.held_out(ev(0.5, 0.0, 0.25))
    # add1 is an easy type; chain and sub are hard: pooled over their 2 problems
    assert flat["easy types avg@8"] == 0.5 and flat["hard types avg@8"] == 0.125
    assert flat["type chain pass@8"] == 0.0 and flat["avg@8"] == 0.3125
    base = [{"seed": s, "eval": ev(0.5, 0.0, 0.0)} for s in (1, 2)]
    runs = [{"method": m, "seed": s, "train_s": 60.0, "eval": ev(0.5, c, 0.0),
             "train": {"grad_norm": 0.0, "frac_reward_zero_std": 1.0}}
            for m, c in [("grpo", 0.0), ("ampo", 0.5)] for s in (1, 2)]
    runs[3]["eval"] = ev(0.5, 1.0, 0.0)  # ampo seed 2 solves every chain problem
    summary = compare.summarise(base, runs)
    assert summary["ampo"]["gain hard types avg@8"]["mean"] == 0.375  # (0.25 + 0.5) / 2
    assert summary["ampo"]["vs grpo avg@8"]["min"] == 0.125
    assert summary["ampo"]["gain easy types avg@8"]["mean"] == 0.0
    assert summary["grpo"]["gain type chain avg@8"]["max"] == 0.0
    table = compare.table(summary)
    assert "| easy types | hard types | add1 | chain | sub |" in table
    assert "| ampo | 50.0 ± 0.0 | 37.5 ± 17.7 | 50.0 ± 0.0 | 75.0 ± 35.4 | 0.0 ± 0.0 |" in table


def test_both_regimes_give_every_method_the_same_budget_and_seeds(tiny_compare):
    config, out = tiny_compare
    for regime in compare.REGIMES.values():
        overrides = regime["overrides"]
        cfgs = {m: compare.method_config(m, config, overrides, 3, out / m, regime["problems"])
                for m in compare.METHODS}
        assert cfgs["grpo"].train == cfgs["ampo"].train == cfgs["ghpo"].train
        assert cfgs["grpo-noent"].train == compare.dataclasses.replace(cfgs["grpo"].train,
                                                                       entropy_coeff=0.0)
        assert {c.train.seed for c in cfgs.values()} == {3}
        assert len({(c.data.train_file, tuple(c.eval.files), c.eval.max_problems,
                     c.eval.num_samples, c.eval.temperature) for c in cfgs.values()}) == 1
    hard = compare.method_config("ampo", config, compare.REGIMES["hard"]["overrides"], 1, out, 8)
    assert hard.data.train_file == "data/train_hard.jsonl"
    assert hard.eval.files == ["data/test_hard.jsonl"]


def test_the_hard_regime_end_to_end_trains_and_evaluates_on_the_hard_types(tiny_compare):
    config, out = tiny_compare
    record = compare.main(["--config", config, "--seeds", "1", "--out", str(out), "--problems",
                           "6", "--regime", "hard", "--train.max_steps=1"])
    assert record["regime"] == "hard" and record["overrides"][:3] == [
        "--data.train_file=data/train_hard.jsonl", "--eval.files=[data/test_hard.jsonl]",
        "--train.max_steps=32"]
    assert record["budget"]["max_steps"] == 1  # the command line's override wins
    # the hard regime runs the control beside the three methods, with its own gains
    assert [r["method"] for r in record["runs"]] == list(compare.METHODS)
    assert "vs grpo-noent avg@8" in record["summary"]["ampo"]
    assert "vs grpo avg@8" in record["summary"]["grpo-noent"]
    assert "| grpo-noent |" in (out / "results.md").read_text()
    for r in record["runs"]:
        types = set(r["eval"]["by_type"])
        assert types and types <= set(compare.TYPE_GROUPS["hard types"]), types
        assert sum(b["problems"] for b in r["eval"]["by_type"].values()) == 6
    assert "hard types avg@8" in record["summary"]["ampo"]
    assert "easy types avg@8" not in record["summary"]["ampo"]
    # the tiny random model solves nothing: AMPO guides every group, GRPO's have no spread
    assert record["summary"]["ampo"]["train guided_or_rescued"]["mean"] == 1.0
    assert record["summary"]["grpo"]["train frac_reward_zero_std"]["mean"] == 1.0


def test_paired_gains_count_seeds_and_mark_gains_within_their_spread():
    g = compare.paired([0.1, -0.05, 0.2])
    assert (g["above"], g["below"], g["n"]) == (2, 1, 3)
    # mean 0.0833, std 0.1258: within its spread
    assert compare.gain_cell(g) == "~+8.3 ± 12.6 (2/3)"
    assert compare.gain_cell(compare.paired([0.1, 0.12, 0.14])) == "+12.0 ± 2.0 (3/3)"
    assert compare.gain_cell(compare.paired([0.0, 0.0])) == "~+0.0 ± 0.0 (0/2)"


def git(repo, *args):
    return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True,
                          check=True).stdout


def test_commit_keeps_each_run_across_sessions_and_report_only_rebuilds(tiny_compare,
                                                                        monkeypatch):
    """--commit: each finished run's small outputs are committed (no weights), so a fresh
    clone (the next session) holds them; --report-only there trains nothing and rebuilds the
    tables from the complete seeds, leaving out the rest."""
    config, out = tiny_compare
    repo = out.parent / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    git(repo, "config", "user.email", "t@t")
    git(repo, "config", "user.name", "t")
    monkeypatch.chdir(repo)
    args = ["--config", config, "--out", "cmp", "--problems", "3", "--methods", "grpo"]
    first = compare.main(args + ["--seeds", "1", "--commit"])
    tracked = git(repo, "ls-files").split()
    assert sorted(tracked) == sorted(
        ["cmp/base-seed1.json"] + [f"cmp/grpo-seed1/{n}" for n in ("metrics.jsonl",
                                                                    "result.json",
                                                                    "samples.jsonl")]
        + [f"cmp/{n}" for n in ("results.json", "results.md", "curves.png", "mechanism.png",
                                "passk.png", "report.html")])
    assert not compare.infra.checkpoint_dirs(repo / "cmp" / "grpo-seed1")  # weights gone
    assert "cmp: grpo seed 1 (avg@8" in git(repo, "log", "--format=%s")
    # the next session: a clean clone, two seeds asked for, one done
    git(out.parent, "clone", "-q", str(repo), "next")
    monkeypatch.chdir(out.parent / "next")
    monkeypatch.setattr(ampo, "train", lambda *a, **k: pytest.fail("trained"))
    monkeypatch.setattr(compare.infra, "evaluate_files", lambda *a, **k: pytest.fail("evaluated"))
    again = compare.main(args + ["--seeds", "2", "--report-only"])
    assert again["seeds"] == [1] and again["summary"] == first["summary"]
    with pytest.raises(SystemExit, match="no seed has all its runs done"):
        compare.main(args + ["--seeds", "1", "--report-only", "--methods", "grpo,ampo"])
