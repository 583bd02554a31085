"""The benchmarks run end to end at tiny sizes (the smoke test .ci/run runs through pytest).

Nothing here looks at a time: the figures are in BENCHMARKS.md, measured on a quiet machine.
What is checked is what each benchmark promises besides speed: the same answers both ways.
"""

import json
import math
import os
import subprocess
import sys

import pytest

import ampo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(name, tmp_path, *extra):
    out = tmp_path / f"{name}.json"
    subprocess.run([sys.executable, os.path.join(ROOT, "bench", f"{name}.py"), "--tiny",
                    "--out", str(out), *extra], check=True, cwd=ROOT,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL)
    result = json.loads(out.read_text())
    assert result["benchmark"] == name and result["machine"]["torch"]
    return result["rows"]


def test_rollout_bench_measures_every_method_and_the_floors(tmp_path):
    rows = run_bench("rollout", tmp_path)
    methods = [r["method"] for r in rows]
    assert methods[:3] == ["generate float32 (baseline)", "loop float32", "loop bfloat16 (ours)"]
    assert {"floor float32", "floor bfloat16"} <= set(methods)
    for r in rows[:3]:  # at tiny sizes a difference of two times can be noise, even negative
        assert math.isfinite(r["ms_per_decode_step"]) and r["sampled_tokens_per_s"] > 0
    assert rows[0]["step_speedup"] == 1.0


def test_comprehension_bench_scores_agree_with_the_official_design(tmp_path):
    rows = run_bench("comprehension", tmp_path)
    by = {r["method"]: r for r in rows}
    assert by["ours batched, float32"]["max_abs_score_diff"] < 1e-5
    assert by["official per-prompt, float32"]["max_abs_score_diff"] == 0


def test_verification_bench_gives_the_same_verdicts_and_rejects_the_salt(tmp_path):
    plain, salted = run_bench("verification", tmp_path)
    assert plain["identical_verdicts"] and plain["correct_share"] == 0.5
    assert salted["identical_verdicts"] and salted["adversarial_all_wrong"]
    assert salted["every_item_answered"]


def test_step_vs_trl_bench_runs_both_sides(tmp_path):
    pytest.importorskip("trl")
    rows = run_bench("step_vs_trl", tmp_path)
    assert len(rows) == 4 and all(r["s_per_step"] > 0 for r in rows)


def test_memory_bench_measures_every_phase(tmp_path):
    rows = run_bench("memory", tmp_path)
    assert [r["phase"].split(" (")[0] for r in rows] == [
        "load model", "rollout", "teacher scoring", "batch", "update"] + [
        "log-prob pass alone"] * 4
    # the pass alone: all at once and in chunks, each without and with gradient checkpointing
    assert [r["phase"].split("), ")[1] for r in rows[5:]] == [
        f"chunk {c}, gradient checkpointing {g}" for g in ("off", "on") for c in ("none", 256)]
    assert all(r["peak_gib"] > 0 for r in rows) and rows[-1]["float32_NxCxV_gib"] > 0


def test_off_policy_bench_measures_the_mismatch_and_both_costs(tmp_path):
    rows = run_bench("off_policy", tmp_path)
    by = {r["what"]: r for r in rows}
    for level in ("token", "sequence"):
        r = by[f"ratio pi_old / mu per {level}"]
        assert 0 < r["min"] <= r["median"] <= r["max"] and r["n"] > 0
    updates = [r for r in rows if r["what"].startswith("update")]
    assert [r["what"].split()[-1] for r in updates] == list(ampo.IS_MODES)
    assert by["update, importance_sampling_mode none"]["ratio_to_none"] == 1.0
    assert all(0 <= r["capped_frac_cap_3"] <= 1 for r in updates)
    passes = [r for r in rows if r["what"].startswith("log-prob pass")]
    assert len(passes) == 4 and all(r["s"] > 0 for r in passes)


def test_shared_prompt_bench_times_every_path_on_one_batch(tmp_path):
    rows = run_bench("shared_prompt", tmp_path)
    result = json.loads((tmp_path / "shared_prompt.json").read_text())
    before, padded, shared, checkpointing, cast_per_pass = rows
    assert checkpointing["tokens_read"] == cast_per_pass["tokens_read"] == shared["tokens_read"]
    assert before["update_ratio"] == before["step_ratio"] == 1.0
    assert padded["tokens_read"] == before["tokens_read"]
    assert padded["head_tokens"] == shared["head_tokens"] <= before["head_tokens"]  # no padding
    assert shared["tokens_read"] < padded["tokens_read"]  # each prompt read once, not G times
    assert result["max_abs_logp_diff"] <= 1e-5  # float32 at --tiny: the same log-probs


def test_decode_compile_bench_times_eager_and_compiled_on_the_same_logits(tmp_path):
    rows = run_bench("decode_compile", tmp_path)
    eager, compiled = rows[0], rows[1:]
    assert eager["method"] == "eager" and eager["ratio_to_eager"] == 1.0
    assert compiled and all(r["method"].startswith("compile") for r in compiled)
    for r in compiled:  # a toolchain that cannot compile is reported, not a failure
        assert r.get("error") or (r["logits_match"] and r["max_abs_logit_diff"] <= r["tolerance"])
