"""Nothing lost, nothing silently wrong: every bad config value and every malformed data row is
an error that names the key, or the file and the row, before anything is loaded or trained.
Each case is a real file written to tmp_path and read by the real functions."""

import json
import math

import pytest

import ampo
import ghpo
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

    def spy(responses, golds, workers=2, timeout=5.0, **rule):
        seen.append(timeout)
        return real(responses, golds, workers=workers, timeout=timeout, **rule)

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


# ---------------------------------------------------------------------------------------------
# Config values: errors naming the key, before the model or the data is touched
# ---------------------------------------------------------------------------------------------


def run_main(main, tmp_path, *overrides):
    """main() on config.yaml, with a model and data that do not exist: only an error raised
    before anything loads can name the key."""
    main(["--config", "config.yaml", *overrides, "--model.name_or_path=/nonexistent/model",
          "--data.train_file=/nonexistent/train.jsonl", f"--log.output_dir={tmp_path / 'run'}"])


@pytest.mark.parametrize("override, match", [
    # a group of one is its own baseline: advantage 0 (NaN with scale_rewards), nothing learnt
    ("--train.num_generations=1", r"train.num_generations: at least 2, got 1"),
    ("--train.num_generations=0", r"train.num_generations: at least 2, got 0"),
    ("--train.learning_rate=-1e-6", r"train.learning_rate: at least 0, got -1e-06"),
    ("--train.weight_decay=-0.1", r"train.weight_decay: at least 0, got -0.1"),
    ("--train.max_completion_length=0", r"train.max_completion_length: at least 1, got 0"),
    ("--train.temperature=0", r"train.temperature: above 0, got 0.0"),
    ("--train.top_p=1.5", r"train.top_p: in \(0, 1\], got 1.5"),
    ("--train.top_p=0", r"train.top_p: in \(0, 1\], got 0.0"),
    ("--train.epsilon=-0.2", r"train.epsilon: at least 0, got -0.2"),
    ("--train.epsilon_high=-0.1", r"train.epsilon_high: at least 0, got -0.1"),
    ("--eval.temperature=0", r"eval.temperature: above 0, got 0.0"),
    ("--eval.top_p=2", r"eval.top_p: in \(0, 1\], got 2.0"),
    ("--train.max_grad_norm=-1", r"train.max_grad_norm: above 0"),
    ("--train.adam_beta2=1", r"train.adam_beta2: in \[0, 1\)"),
    ("--train.clip_ratio_c=0.5", r"train.clip_ratio_c: above 1"),
    ("--ampo.shaping_gamma=0", r"ampo.shaping_gamma: above 0"),
    ("--train.learning_rate=nan", r"train.learning_rate: not a finite number, got nan"),
    ("--train.max_grad_norm=.inf", r"train.max_grad_norm: not a finite number, got inf"),
    ("--train.temperature=true", r"train.temperature: expected float, got True"),
])
def test_bad_values_name_the_key_before_anything_loads(tmp_path, override, match):
    shared = not override.startswith("--ampo.")  # ghpo.py has no ampo: block
    for main in (ampo.main, ghpo.main) if shared else (ampo.main,):
        with pytest.raises(SystemExit, match="error: config key " + match):
            run_main(main, tmp_path, override)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("template, match", [
    ("Solve it.", r"needs \{problem\} and no other \{field\}"),  # the problem silently dropped
    ("Solve {question}", r"needs \{problem\} and no other \{field\}"),
    ("{problem} in {y}", r"needs \{problem\} and no other \{field\}"),
    ("{problem} in \\boxed{}.", r"needs \{problem\} and no other \{field\}"),  # {} is a field
    ("x {problem", r"expected '\}' before end of string"),  # str.format's own words
    ("{problem} }", r"Single '\}' encountered"),
    ("{problem!z}", r"Unknown conversion specifier z"),
])
def test_prompt_template_needs_problem_and_no_other_field(tmp_path, template, match):
    # in a file, quoted: on the command line YAML would read {problem} as a mapping
    path = tmp_path / "c.yaml"
    path.write_text(f"data:\n  prompt_template: {json.dumps(template)}\n")
    for main in (ampo.main, ghpo.main):
        with pytest.raises(SystemExit, match="error: config key data.prompt_template: " + match):
            main(["--config", str(path), "--model.name_or_path=/nonexistent/model"])


@pytest.mark.parametrize("override, match", [
    ("--ghpo.start_hint_step=-1", r"ghpo.start_hint_step: at least 0, got -1"),
    ("--ghpo.hint_ratios=[true]", r"ghpo.hint_ratios: increasing numbers in \(0, 1\]"),
    ("--ghpo.hint_ratios=[0.5, .nan]", r"ghpo.hint_ratios: not a finite number, got nan"),
])
def test_bad_ghpo_values_name_the_key(tmp_path, override, match):
    with pytest.raises(SystemExit, match="error: config key " + match):
        run_main(ghpo.main, tmp_path, override)


def test_good_templates_and_every_bundled_config_pass():
    for template in ["{problem}", "{problem}\nPut your final answer within \\boxed{{}}.",
                     "Problem: {problem}\n{{braces}} and {problem} again"]:
        infra.check_template(template, "data.prompt_template")
    for path, cls, check in [("config.yaml", ampo.Config, ampo.check_config),
                             ("config.yaml", ghpo.Config, ghpo.check_config),
                             ("configs/ampo_qwen2.5-1.5b-instruct_1gpu.yaml", ampo.Config,
                              ampo.check_config),
                             ("configs/ampo_qwen2.5-7b-instruct_4gpu.yaml", ampo.Config,
                              ampo.check_config),
                             ("configs/ghpo_qwen2.5-math-7b.yaml", ghpo.Config, ghpo.check_config)]:
        foreign = ("ghpo",) if cls is ampo.Config else ("ampo",)
        # (the AMPO recipes evaluate every 10 steps on a file the user names)
        check(infra.load_config(path, ["--eval.files=[data/test.jsonl]"], cls, foreign))


# ---------------------------------------------------------------------------------------------
# Config files: errors naming the file (and line), not yaml tracebacks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, match", [
    (b"train: 5\n", r"config section train in .*c\.yaml: expected its keys, got 5"),
    (b"ampo:\n  - trigger\n", r"config section ampo in .*c\.yaml: expected its keys"),
    (b"train:\n  seed: [1, 2\n  max_steps: 3\n",
     r"config file .*c\.yaml line 3: not valid YAML \(expected ',' or '\]', but got ':'; "
     r"while parsing a flow sequence from line 2\)"),
    (b"train:\n\tseed: 1\n", r"config file .*c\.yaml line 2: not valid YAML"),
    (b"train:\n  seed: 1  # caf\xe9\n", r"config file .*c\.yaml line 2: not valid UTF-8"),
    (b"- train\n", r"config file .*c\.yaml: expected a mapping of sections, got list"),
])
def test_config_file_errors_name_the_file(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_bytes(text)
    with pytest.raises(infra.InputError, match=match):
        infra.load_config(str(path), [], ampo.Config, ("ghpo",))


def test_missing_config_file_and_bad_override_value_are_one_line_errors(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SystemExit, match=r"error: config file .*nope\.yaml: No such file"):
        ampo.main(["--config", str(missing)])
    with pytest.raises(SystemExit, match=r"error: override '--eval.pass_k=\[1, 2': not valid "
                                         r"YAML \(expected ',' or '\]'"):
        ampo.main(["--config", "config.yaml", "--eval.pass_k=[1, 2"])


def test_an_empty_section_in_the_file_takes_overrides(tmp_path):
    # `train:` with nothing under it is an empty section (YAML null), not a broken one
    path = tmp_path / "c.yaml"
    path.write_text("train:\nampo:\n  trigger: never\n")
    cfg = infra.load_config(str(path), ["--train.seed=3"], ampo.Config, ("ghpo",))
    assert (cfg.train.seed, cfg.ampo.trigger) == (3, "never")
