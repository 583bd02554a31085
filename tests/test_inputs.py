"""Nothing lost, nothing silently wrong: every malformed data row is an error that names the
file and the row, before anything is trained. Each case is a real file written to tmp_path and
read by the real functions."""

import json
import math

import pytest

import ampo
import infra
import verify

P = "What is 2 + 3?"


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ---------------------------------------------------------------------------------------------
# Data rows
# ---------------------------------------------------------------------------------------------


def test_a_simple_row_without_answer_does_not_take_its_solution_as_gold(tmp_path):
    # Only GHPO's schema (marked by its solution_hint column) has the gold in `solution`.
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": P, "answer": "5"},
                                             {"problem": P, "solution": "2 + 3 = 5. \\boxed{5}"}])
    with pytest.raises(infra.InputError, match=r"d\.jsonl row 1: missing the gold answer"):
        infra.load_dataset(path, workers=0)
    ghpo_row = {"problem": P, "solution": "5", "solution_hint": "2 + 3 = 5. \\boxed{5}"}
    rows, _ = infra.load_dataset(write_jsonl(tmp_path / "g.jsonl", [ghpo_row]), workers=0)
    assert (rows[0]["answer"], rows[0]["solution"]) == ("5", "2 + 3 = 5. \\boxed{5}")


@pytest.mark.parametrize("row, match", [
    ({"problem": P, "answer": "5", "teachers": "\\boxed{5}"},
     r"row 0: 'teachers' must be a list of objects, got str"),
    ({"problem": P, "answer": "5", "teachers": {"source": "a", "response": "\\boxed{5}"}},
     r"row 0: 'teachers' must be a list of objects, got dict"),
    ({"problem": P, "answer": "5", "teachers": [{"source": "a", "response": "\\boxed{5}"},
                                                "\\boxed{5}"]},
     r"row 0: teachers\[1\] must be an object, got str"),
    ({"prompt": [{"role": "user", "content": P}], "reward_model": {"ground_truth": "5"},
      "target_lst": {"content": "\\boxed{5}", "source": "a"}},
     r"row 0: 'target_lst' must be a list of objects, got dict"),
])
def test_teachers_that_are_not_a_list_of_objects_are_an_error(tmp_path, row, match):
    # Ignored, they would train the row with no teacher at all, and count nothing as dropped.
    with pytest.raises(infra.InputError, match=r"t\.jsonl " + match):
        infra.load_dataset(write_jsonl(tmp_path / "t.jsonl", [row]), workers=0)


@pytest.mark.parametrize("gold", [["5", "6"], {"value": 5}, True, float("nan")])
def test_a_gold_answer_that_is_not_text_or_a_finite_number_is_an_error(tmp_path, gold):
    # Stringified, it would be "['5', '6']", "True" or "nan": a gold no answer ever matches.
    # (json.dumps writes NaN, and json.loads reads it back as float nan.)
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": P, "answer": "5"},
                                              {"problem": P, "answer": gold}])
    with pytest.raises(infra.InputError, match=r"d\.jsonl row 1: the gold answer must be text "
                                               r"or a number"):
        infra.load_dataset(path, workers=0)


def test_gold_answers_from_parquet_numbers_and_nan(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    # A numeric column: finite numbers become text as before, a NaN cell is an error.
    path = tmp_path / "n.parquet"
    pq.write_table(pa.Table.from_pylist([{"problem": P, "answer": 5.0},
                                         {"problem": P, "answer": 2.5}]), path)
    rows, _ = infra.load_dataset(str(path), workers=0)
    assert [r["answer"] for r in rows] == ["5.0", "2.5"]
    pq.write_table(pa.Table.from_pylist([{"problem": P, "answer": 5.0},
                                         {"problem": P, "answer": math.nan}]), path)
    with pytest.raises(infra.InputError, match=r"n\.parquet row 1: the gold answer must be text "
                                               r"or a number, got nan"):
        infra.load_dataset(str(path), workers=0)
    # the official AMPO schema: a list as ground_truth
    pq.write_table(pa.Table.from_pylist([{"prompt": [{"role": "user", "content": P}],
                                          "reward_model": {"ground_truth": ["5"]}}]), path)
    with pytest.raises(infra.InputError, match=r"n\.parquet row 0: the gold answer"):
        infra.load_dataset(str(path), workers=0)


def test_a_non_utf8_byte_names_the_file_and_line(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_bytes(json.dumps({"problem": P, "answer": "5"}).encode() + b"\n"
                     + b'{"problem": "caf\xe9?", "answer": "1"}\n')
    with pytest.raises(infra.InputError, match=r"u\.jsonl line 2: not valid UTF-8 \(byte 0xe9"):
        infra.load_dataset(str(path), workers=0)
    path.write_bytes('{"problem": "café + 1?", "answer": "1"}\n'.encode())  # UTF-8 is fine
    assert infra.load_dataset(str(path), workers=0)[0][0]["problem"] == "café + 1?"


# ---------------------------------------------------------------------------------------------
# The verifier timeout reaches the teachers' check at load time
# ---------------------------------------------------------------------------------------------
# The timeout cannot be watched from outside without a slow clock, so a spy records what each
# call of the real verify.verify_batch was given, then runs it.


@pytest.fixture()
def timeouts(monkeypatch):
    seen, real = [], verify.verify_batch

    def spy(responses, golds, workers=2, timeout=5.0):
        seen.append(timeout)
        return real(responses, golds, workers=workers, timeout=timeout)

    monkeypatch.setattr(verify, "verify_batch", spy)
    return seen


# The teacher's 1/2 against the gold 0.5 needs math-verify, not the exact-string shortcut.
HALF = {"problem": "What is half of 1?", "answer": "0.5",
        "teachers": [{"source": "a", "response": "\\boxed{1/2}"}]}


def test_load_dataset_passes_its_timeout_to_the_verifier(tmp_path, timeouts):
    rows, stats = infra.load_dataset(write_jsonl(tmp_path / "d.jsonl", [HALF]), workers=0,
                                     timeout=3.0)
    assert timeouts == [3.0] and stats["teachers_kept"] == 1


def test_training_and_eval_data_use_train_verifier_timeout(tiny_model_dir, tmp_path, monkeypatch,
                                                           timeouts):
    model, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    cfg = ampo.Config()
    cfg.data.train_file = write_jsonl(tmp_path / "d.jsonl", [HALF])
    cfg.train.verifier_workers, cfg.train.verifier_timeout, cfg.train.prompts_per_step = 0, 7.0, 1
    rows, _, _ = infra.load_prompts(cfg, tok, require_solution=False, verbose=False)
    assert timeouts == [7.0] and rows[0]["teachers"] == [("a", "\\boxed{1/2}")]
    # evaluate loads its file the same way (then scores answers, with the same timeout)
    monkeypatch.setattr(ampo, "generate", lambda model, tok_, prompts, n, *a: (
        [tok("\\boxed{0.5}")["input_ids"]] * (len(prompts) * n), [False] * len(prompts) * n))
    cfg.eval.num_samples, cfg.eval.pass_k = 1, [1]
    assert ampo.evaluate(model, tok, cfg, cfg.data.train_file)["avg@1"] == 1.0
    assert timeouts == [7.0, 7.0, 7.0]
