"""compare.py end to end at a tiny budget: three methods, one seed, one step each, evaluated
before and after; the JSON, the table and the PNGs written; a rerun trains nothing again."""

import json

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
              "eval": {"files": [data]},
              "ghpo": {"hint_ratios": [0.5]}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path), tmp_path / "compare"


def test_compare_writes_results_and_plots_and_resumes(tiny_compare, monkeypatch):
    config, out = tiny_compare
    args = ["--config", config, "--seeds", "1", "--out", str(out), "--problems", "3"]
    record = compare.main(args)
    for name in ("results.json", "results.md", "curves.png", "passk.png"):
        assert (out / name).stat().st_size > 0, name
    for png in ("curves.png", "passk.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
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
    monkeypatch.setattr(ampo, "evaluate_files", lambda *a, **k: pytest.fail("evaluated again"))
    assert compare.main(args)["summary"] == record["summary"]


def test_ghpo_gets_ampos_train_block_and_grpo_no_teachers(tiny_compare):
    config, out = tiny_compare
    cfgs = {m: compare.method_config(m, config, ["--train.learning_rate=3e-3"], 2, out / m, 5)
            for m in compare.METHODS}
    assert cfgs["ghpo"].train == cfgs["ampo"].train == cfgs["grpo"].train
    assert cfgs["ghpo"].train.learning_rate == 3e-3 and cfgs["ghpo"].train.seed == 2
    # without the comparison GHPO would train with its official loss
    assert compare.infra.load_config(config, [], compare.ghpo.Config,
                                     ("ampo",)).train.loss_type == "group_mean"
    assert cfgs["ampo"].train.loss_type != "group_mean"
    assert cfgs["grpo"].ampo.trigger == "never" and cfgs["ampo"].ampo.trigger == "adaptive"
    assert cfgs["ghpo"].ghpo.hint_ratios == [0.5]
    assert (cfgs["grpo"].eval.num_samples, cfgs["grpo"].eval.pass_k) == (8, [1, 2, 4, 8])
