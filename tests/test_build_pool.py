"""data/build_pool.py: the pool keeps exactly the answers the training verifier accepts."""

import json
import os
import sys

import pytest

import ampo
import infra

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "data"))
import build_pool  # noqa: E402

ROWS = [infra.normalise_row(r, f"row {i}") for i, r in enumerate([
    {"problem": "What is 2 + 3?", "answer": "5",
     "teachers": [{"source": "old", "response": "\\boxed{5}"}]},
    {"problem": "What is half of 1?", "answer": "\\frac{1}{2}"},
    {"problem": "What is 6 x 7?", "answer": "42", "solution": "6 x 7 = 42. \\boxed{42}"}])]


def scripted(answers):
    """A teacher that answers row i with answers[i] (a list of n texts)."""
    return lambda rows, n: [answers[i][:n] for i in range(len(rows))]


def test_pool_keeps_verified_answers_up_to_keep_per_teacher():
    good = scripted([["\\boxed{5}", "so 5", "\\boxed{5.0}"],          # right, no box, right
                     ["\\boxed{0.5}", "\\boxed{1/2}", "\\boxed{2}"],  # right, right, wrong
                     ["\\boxed{41}", "\\boxed{43}", "\\boxed{}"]])     # wrong, wrong, empty
    bad = scripted([["\\boxed{6}"] * 3, ["no idea"] * 3, ["\\boxed{42}"] * 3])
    pool, stats = build_pool.build_pool(ROWS, [("good", good), ("bad", bad)], samples=3,
                                        keep=1, workers=0)
    assert [[t["source"] for t in r["teachers"]] for r in pool] == \
        [["old", "good"], ["good"], ["bad"]]
    assert pool[0]["teachers"][1]["response"] == "\\boxed{5}"  # the first correct one
    assert stats["teachers"] == {"good": {"generated": 9, "correct": 4, "kept": 2},
                                 "bad": {"generated": 9, "correct": 3, "kept": 1}}
    assert stats["rows"] == 3 and stats["rows_without_teacher"] == 0
    assert pool[2]["solution"] == "6 x 7 = 42. \\boxed{42}" and "solution" not in pool[0]


def test_keep_two_and_a_row_no_teacher_solves():
    t = scripted([["\\boxed{5}"] * 3, ["\\boxed{0.5}", "x", "\\boxed{0.50}"], ["\\boxed{1}"] * 3])
    pool, stats = build_pool.build_pool(ROWS, [("t", t)], samples=3, keep=2, workers=0)
    assert [len(r["teachers"]) for r in pool] == [3, 2, 0]
    assert stats["rows_without_teacher"] == 1


def test_pool_file_loads_in_the_trainer(tmp_path):
    t = scripted([["\\boxed{5}"], ["\\boxed{1/2}"], ["\\boxed{42}"]])
    pool, _ = build_pool.build_pool(ROWS, [("t", t)], samples=1, keep=1, workers=0)
    path = str(tmp_path / "pool.jsonl")
    build_pool.write_jsonl(path, pool)
    assert not os.path.exists(path + ".tmp")
    rows, stats = infra.load_dataset(path, workers=0)
    assert stats == {"rows": 3, "teachers_kept": 4, "teachers_dropped": 0}
    assert rows[1]["teachers"] == [("t", "\\boxed{1/2}")]


def test_cli_with_a_real_model_writes_a_consistent_pool(tiny_model_dir, tmp_path):
    src = tmp_path / "problems.jsonl"
    src.write_text("".join(json.dumps({"problem": f"What is {a} + 1?", "answer": str(a + 1)})
                           + "\n" for a in range(3)))
    out = tmp_path / "pool.jsonl"
    stats = build_pool.main(["--input", str(src), "--output", str(out), "--teacher",
                             f"tiny={tiny_model_dir}", "--samples", "2", "--keep", "1",
                             "--max-new-tokens", "8", "--workers", "0"])
    rows = [json.loads(x) for x in open(out)]
    assert len(rows) == 3 and stats["teachers"]["tiny"]["generated"] == 6
    kept = sum(len(r["teachers"]) for r in rows)
    assert kept == stats["teachers"]["tiny"]["kept"] <= 3
    assert stats["rows_without_teacher"] == 3 - kept


def test_cli_errors_name_the_problem(tmp_path):
    with pytest.raises(SystemExit, match="expected NAME=MODEL"):
        build_pool.main(["--input", "x", "--output", "y", "--teacher", "nomodel"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "2+2?"}) + "\n")
    with pytest.raises(SystemExit, match="row 0: missing the gold answer"):
        build_pool.main(["--input", str(bad), "--output", "y", "--teacher", "a=b"])


def test_vllm_engine_without_vllm_is_a_clear_error():
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="--engine vllm"):
        build_pool.vllm_sampler("unused", 8, 0.6, "{problem}")
