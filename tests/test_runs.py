"""Nothing lost, nothing silently wrong: run folders, resume, runaway training, broken files.

Every test here trains the tiny random Qwen2 of conftest.py for a few steps on real files and
then does what a careful user might: start a second run in the same folder, resume with other
settings or another data file, resume after a disk filled up mid-write, or set a learning rate
that blows the weights up. Each checks that nothing already written is lost and that the run
either does what it says or stops with an error that names the key or the file.
"""

import json

import pytest
import torch

import ampo
import infra
from test_ampo import tiny_config, write_jsonl


def steps(run_dir):
    return [json.loads(x)["step"] for x in open(run_dir / "metrics.jsonl")]


def cli_args(cfg, *extra):
    """The command line of a tiny_config (the CLI is what a user runs)."""
    t = cfg.train
    return [f"--model.name_or_path={cfg.model.name_or_path}",
            f"--data.train_file={cfg.data.train_file}", f"--log.output_dir={cfg.log.output_dir}",
            f"--train.prompts_per_step={t.prompts_per_step}", "--train.num_generations=4",
            "--train.max_completion_length=8", "--train.verifier_workers=0",
            "--train.micro_batch_size=3", "--train.learning_rate=1e-3", *extra]


def test_a_fresh_run_never_touches_another_runs_folder(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    ampo.train(cfg)
    run = tmp_path / "run"
    before = {p.name: p.read_bytes() for p in run.glob("*.jsonl")}
    # even a run that would fail at start-up (no such data file) is refused first, and writes
    # nothing: the older run's metrics, samples and checkpoints are untouched
    for extra in ([], ["--data.train_file=/nonexistent.jsonl"]):
        with pytest.raises(SystemExit, match=r"log.output_dir: .* holds another run "
                                             r"\(checkpoint-2, metrics.jsonl, samples.jsonl\); "
                                             r"continue it with --resume"):
            ampo.main(cli_args(cfg, "--train.max_steps=6", *extra))
    assert {p.name: p.read_bytes() for p in run.glob("*.jsonl")} == before
    assert [p.name for p in infra.checkpoint_dirs(run)] == ["checkpoint-2"]
    # a folder with only an evaluation's results (or nothing logged) takes a new run
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "eval.jsonl").write_text('{"avg@4": 0.0}\n')
    (ev / "metrics.jsonl").write_text("")
    ampo.main(cli_args(cfg, f"--log.output_dir={ev}", "--train.max_steps=1"))
    assert steps(ev) == [1]


def test_resume_trains_with_the_new_learning_rate_and_weight_decay(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path, num_minibatches=1)
    ampo.train(cfg)
    ampo.main(cli_args(cfg, "--train.max_steps=3", "--train.learning_rate=3e-3",
                       "--train.weight_decay=0.02", "--train.num_minibatches=1", "--resume"))
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["lr"] for x in lines] == [1e-3, 1e-3, 3e-3]  # the warning's value is the truth
    saved = torch.load(tmp_path / "run" / "checkpoint-3" / "optimizer.pt", weights_only=True)
    assert [(g["lr"], g["weight_decay"]) for g in saved["param_groups"]] == [(3e-3, 0.02)]


def test_resume_drops_rows_that_no_longer_fit_max_prompt_length(tiny_model_dir, tmp_path):
    long = "What is 2 + 3? " + "Think of the tens first, then of the ones. " * 6
    data = write_jsonl(tmp_path / "d.jsonl", [{"problem": long, "answer": "5"}] + [
        {"problem": f"What is {a} + 1?", "answer": str(a + 1)} for a in range(5)])
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=1, prompts_per_step=1)
    cfg.data.train_file, cfg.data.max_prompt_length = data, 512
    cfg.log.save_every = 1
    ampo.train(cfg)
    order = torch.load(tmp_path / "run" / "checkpoint-1" / "trainer_state.pt",
                       weights_only=True)["order"]
    assert 0 in order  # the long row is still to come in this epoch
    ampo.main(cli_args(cfg, "--train.max_steps=7", "--data.max_prompt_length=40",
                       "--log.sample_every=1", "--resume"))
    problems = [json.loads(x)["problem"] for x in open(tmp_path / "run" / "samples.jsonl")]
    assert len(problems) == 7 and long not in problems[1:]


def test_resume_refuses_another_data_file(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    ampo.train(cfg)
    with open(cfg.data.train_file, "a") as f:  # the same path, other rows
        f.write(json.dumps({"problem": "What is 1 + 1?", "answer": "2"}) + "\n")
    with pytest.raises(SystemExit, match=r"data.train_file: .* is not the file checkpoint-2 "
                                         r"was trained on"):
        ampo.main(cli_args(cfg, "--train.max_steps=3", "--resume"))
    assert steps(tmp_path / "run") == [1, 2]


def test_weights_that_overflow_stop_the_run_before_they_are_saved(tiny_model_dir, tmp_path):
    """learning_rate 1e30: the gradient is finite, so the update happens, and the weights give
    inf/NaN from then on. Nothing may be saved, and the run must stop with a clear error
    instead of crashing in the next step's sampling."""
    cfg = tiny_config(tiny_model_dir, tmp_path, learning_rate=1e30, max_steps=3)
    cfg.log.save_every = 1
    with pytest.raises(RuntimeError, match="training diverged.*learning_rate = 1e\\+30"):
        ampo.train(cfg)
    assert infra.checkpoint_dirs(tmp_path / "run") == []


def test_a_run_that_skips_every_update_stops(tiny_model_dir, tmp_path, monkeypatch):
    """NaN advantages make every gradient NaN: every update is skipped, the weights never
    change again, and the run must stop rather than finish with exit code 0."""
    monkeypatch.setattr(ampo, "group_advantages", lambda rewards, group_size, scale=False:
                        torch.full((len(rewards),), float("nan")))
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=10, max_skipped_steps=2)
    with pytest.raises(RuntimeError, match="2 steps in a row skipped every update"):
        ampo.train(cfg)
    assert steps(tmp_path / "run") == [1]  # the second such step stops before it is logged


def truncate(path):
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize("broken", ["optimizer.pt", "trainer_state.pt", "model.safetensors",
                                    "rng_state_0.pt"])
def test_a_broken_newest_checkpoint_falls_back_to_the_one_before(tiny_model_dir, tmp_path,
                                                                 capsys, broken):
    cfg = tiny_config(tiny_model_dir, tmp_path, max_steps=4)
    cfg.log.save_every = 2
    ampo.train(cfg)
    run = tmp_path / "run"
    truncate(run / "checkpoint-4" / broken)  # a full disk, say
    capsys.readouterr()
    ampo.main(cli_args(cfg, "--train.max_steps=5", "--log.save_every=2", "--resume"))
    out = capsys.readouterr().out
    assert f"checkpoint-4: {broken} cannot be read" in out
    assert "resumed from" in out and "checkpoint-2 at step 3" in out
    assert steps(run) == [1, 2, 3, 4, 5]


def test_no_readable_checkpoint_names_every_broken_file(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    ampo.train(cfg)
    truncate(tmp_path / "run" / "checkpoint-2" / "optimizer.pt")
    with pytest.raises(SystemExit, match=r"no usable checkpoint .*checkpoint-2: optimizer.pt "
                                         r"cannot be read"):
        ampo.main(cli_args(cfg, "--train.max_steps=3", "--resume"))


def test_a_half_written_metrics_line_is_dropped_on_resume(tiny_model_dir, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    ampo.train(cfg)
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "reward": 0.')  # killed mid-write
    ampo.main(cli_args(cfg, "--train.max_steps=3", "--resume"))
    assert steps(tmp_path / "run") == [1, 2, 3]
    # a broken line elsewhere is not a crash's trace: an error names the file and the line
    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
    with pytest.raises(SystemExit, match=r"metrics.jsonl line 2: not valid JSON"):
        ampo.main(cli_args(cfg, "--train.max_steps=4", "--resume"))


def test_eval_drops_and_counts_over_long_prompts(tiny_model_dir, tmp_path):
    test_file = write_jsonl(tmp_path / "t.jsonl", [
        {"problem": "What is 1 + 1?", "answer": "2"},
        {"problem": "What is 2 + 2? " + "Please think. " * 5000, "answer": "4"},
        {"problem": "What is 3 + 3?", "answer": "6"}])
    out = ampo.main(["--eval", f"--model.name_or_path={tiny_model_dir}",
                     f"--eval.files=[{test_file}]", "--eval.num_samples=2", "--eval.pass_k=[1]",
                     f"--log.output_dir={tmp_path / 'ev'}", "--train.max_completion_length=4",
                     "--train.verifier_workers=0", "--data.max_prompt_length=64"])
    assert out[0]["problems"] == 2 and out[0]["dropped"] == 1
