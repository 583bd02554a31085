"""data/make_data.py rewrites the bundled files byte for byte; data/measure.py measures a model
per problem type and per hint stage; data.example puts one worked exchange before a question."""

import importlib.util
import json
import os

import pytest
import yaml

import ampo
import infra

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(DATA, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_data_regenerates_the_bundled_files_byte_for_byte(tmp_path):
    load_script("make_data").main(str(tmp_path))
    for name in ("train.jsonl", "test.jsonl", "train_hard.jsonl", "test_hard.jsonl"):
        assert (tmp_path / name).read_bytes() == open(os.path.join(DATA, name), "rb").read()
    kinds = [json.loads(line)["data_source"] for line in (tmp_path / "train.jsonl").open()]
    assert {"add1", "sub1", "word_small", "add", "word_age"} <= set(kinds)
    # the hard files are exactly the rows of the hard types, in the same order
    hard = load_script("make_data").HARD_TYPES
    for name in ("train", "test"):
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").open()]
        kept = [json.loads(line) for line in (tmp_path / f"{name}_hard.jsonl").open()]
        assert kept == [r for r in rows if r["data_source"] in hard] and kept


def test_measure_prints_each_type_and_each_hint_stage(tiny_model_dir, tmp_path, capsys):
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b), "data_source": kind,
             "solution": f"First, {a} + {b} = {a + b}.\nSo the answer is \\boxed{{{a + b}}}."}
            for a, b, kind in [(2, 3, "easy"), (4, 4, "easy"), (21, 30, "hard")]]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": tiny_model_dir}, "data": {"train_file": str(data)},
        "train": {"max_completion_length": 6, "verifier_workers": 0, "sampler": "generate"},
        "ghpo": {"hint_ratios": [0.5, 1.0]}}))
    load_script("measure").main(["--config", str(config), "--rows", "2", "--samples", "2",
                                 "--hints"])
    out = capsys.readouterr().out
    # The random tiny model writes no box: 0% everywhere, every group goes to the hint stages.
    assert "| easy | 0.0% | 0.0% | 0 / 2 |" in out and "| hard | 0.0% | 0.0% | 0 / 1 |" in out
    assert "| all | 0.0% | 0.0% | 0 / 3 |" in out
    assert "| 0.5 | 3 | 0 | 0.0% | 0.0% |" in out and "| 1 | 3 | 0 |" in out
    assert "still unsolved after every stage: 3 of 3 groups" in out


def test_the_example_is_one_earlier_exchange_in_every_prompt(tiny_model_dir):
    cfg = infra.load_config("config.yaml", [], ampo.Config, ("ghpo",))
    question, answer = cfg.data.example
    assert "\\boxed{5}" in answer
    _, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    row = {"problem": "What is 7 + 1?", "messages": None}
    text = infra.build_prompt(tok, row, cfg.data.prompt_template, None, cfg.data.example)
    # example question, example answer, then the question, each turn in order
    assert text.index(question) < text.index(answer) < text.index("What is 7 + 1?")
    assert text.endswith("<|im_start|>assistant\n")
    cfg.data.example = ["only a question"]
    with pytest.raises(infra.InputError, match="data.example: \\[problem, answer\\]"):
        ampo.check_config(cfg)
