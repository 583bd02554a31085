"""log.report_to: real tiny runs write real tracker files, read back with the trackers' own
readers. TensorBoard's event files through TensorBoard's EventAccumulator, trackio's local
SQLite store (TRACKIO_DIR, in tmp_path) through sqlite3; --resume continues the same tracker
run; a missing package and an unknown tracker are errors that say what to do.

The trackers are optional dependencies that requirements.txt does not install (CI installs
requirements.txt alone), so each one's tests install its requirements-<tracker>.txt first
when it is missing, and are skipped, saying why, only when that install fails (no network).
"""

import importlib
import json
import os
import sqlite3
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import ampo
import infra
import trackers
from test_ampo import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def need(name: str):
    """The tracker's package, pip-installed from requirements-<name>.txt when it is missing;
    a skip that names the failed install when pip cannot get it."""
    try:
        return importlib.import_module(trackers.MODULES[name])
    except ImportError:
        pass
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-r",
                           str(ROOT / f"requirements-{name}.txt")], capture_output=True, text=True)
    importlib.invalidate_caches()
    try:
        return importlib.import_module(trackers.MODULES[name])
    except ImportError:
        pytest.skip(f"{name} is not installed and `pip install -r requirements-{name}.txt` "
                    f"failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")


@pytest.fixture(scope="module")
def tensorboard():
    need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def read(folder):  # every scalar tag -> {step: value}, and the text summaries
        acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)}
                   for tag in acc.Tags()["scalars"]}
        counts = {tag: [e.step for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
        texts = {tag: [e.tensor_proto.string_val[0].decode() for e in acc.Tensors(tag)]
                 for tag in acc.Tags()["tensors"]}
        return scalars, counts, texts

    return read


@pytest.fixture(scope="module")
def trackio():
    need("trackio")


def metrics(run_dir):
    return [json.loads(x) for x in open(run_dir / "metrics.jsonl")]


def test_tensorboard_gets_every_figure_under_trls_names(tiny_model_dir, tmp_path, tensorboard):
    cfg = tiny_config(tiny_model_dir, tmp_path)  # AMPO: the tiny model fails, teachers come
    cfg.log.report_to = ["tensorboard"]
    cfg.eval.files, cfg.eval.every = [cfg.data.train_file], 2
    cfg.eval.num_samples, cfg.eval.pass_k, cfg.eval.max_problems = 2, [1, 2], 2
    ampo.train(cfg)
    run = tmp_path / "run"
    lines = metrics(run)
    scalars, steps, texts = tensorboard(run / "tensorboard")
    for m in lines:
        s = m["step"]
        for ours, trl in [("reward", "reward"), ("frac_reward_zero_std", "frac_reward_zero_std"),
                          ("clip_frac", "clip_ratio/region_mean"), ("entropy", "entropy"),
                          ("grad_norm", "grad_norm"), ("completion_len", "completions/mean_length"),
                          ("truncated_frac", "completions/clipped_ratio"), ("loss", "loss"),
                          ("lr", "learning_rate")]:
            assert scalars[f"train/{trl}"][s] == pytest.approx(m[ours]), trl
        # AMPO's own figures under ampo/, nested dicts flattened with "/", ours under train/
        assert scalars["ampo/guided_frac"][s] == m["guided_frac"] == 1.0
        assert {t: scalars[f"ampo/teachers_picked/{t}"][s] for t in m["teachers_picked"]} == \
            m["teachers_picked"] == {"short": 2, "long": 2}
        assert scalars["ampo/comprehension_picked"][s] == pytest.approx(m["comprehension_picked"])
        assert scalars["train/time/generate"][s] == pytest.approx(m["time"]["generate"])
        assert scalars["train/solve_none"][s] == m["solve_none"]
    # the evaluation of step 2 (eval.every), per data source (the file's name) and their mean
    ev = lines[1]["eval"][0]
    assert steps["eval/train.jsonl/avg@2"] == [2] and steps["eval/mean/pass@2"] == [2]
    assert scalars["eval/train.jsonl/pass@2"][2] == pytest.approx(ev["by_source"]["train.jsonl"]["pass@2"])
    assert scalars["eval/mean/avg@2"][2] == pytest.approx(lines[1]["eval_mean"]["avg@2"])
    # every figure at the steps metrics.jsonl has, once; the config once, as the run resolved it
    assert steps["train/reward"] == [1, 2]
    (config,) = texts["config/text_summary"]
    assert yaml.safe_load(config.strip("`\n"))["log"]["report_to"] == ["tensorboard"]
    assert len(trackers.scalars(lines[0])) == len([t for t in scalars if 1 in scalars[t]])


def run_cli(script, args, env):
    done = subprocess.run([sys.executable, script, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


def trackio_rows(store: Path, project: str):
    """(run name, step, metrics) of every row of trackio's local SQLite store of a project."""
    with sqlite3.connect(store / f"{project}.db") as db:
        return [(name, step, json.loads(m)) for name, step, m in
                db.execute("SELECT run_name, step, metrics FROM metrics ORDER BY id")]


def test_resume_continues_the_same_tracker_run(tiny_model_dir, tmp_path, tensorboard, trackio):
    """GHPO through the command line with TensorBoard and trackio. The first run logs 3 steps
    and is cut back to its checkpoint of step 2, as a run killed after logging step 3 is; its
    --resume logs steps 3 and 4 into the same tracker run (same id, same TensorBoard folder,
    where the interrupted step 3 is purged: each step once, with the resumed run's figures)."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({
        "problem": f"What is {a} + {b}?", "answer": str(a + b),
        "solution": f"Add: {a} + {b} = {a + b}. \\boxed{{{a + b}}}"}) + "\n"
        for a, b in [(2, 3), (10, 7), (21, 30), (4, 4)]))
    run = tmp_path / "run"
    args = [f"--model.name_or_path={tiny_model_dir}", f"--data.train_file={rows}",
            f"--log.output_dir={run}", "--train.prompts_per_step=2", "--train.num_generations=2",
            "--train.max_completion_length=8", "--train.verifier_workers=0",
            "--train.sampler=generate", "--train.bf16=false", "--ghpo.hint_ratios=[0.5]",
            "--log.save_every=2", "--log.report_to=[tensorboard,trackio]"]
    env = dict(os.environ, TRACKIO_DIR=str(tmp_path / "trackio"), TRACKIO_PROJECT="tiny",
               HF_HUB_OFFLINE="1")
    run_cli("ghpo.py", args + ["--train.max_steps=3"], env)
    first_id = json.loads((run / "trackers.json").read_text())["id"]
    interrupted = metrics(run)[2]
    shutil.rmtree(run / "checkpoint-3")  # killed after step 3 was logged, before its checkpoint
    run_cli("ghpo.py", args + ["--train.max_steps=4", "--resume"], env)
    assert json.loads((run / "trackers.json").read_text())["id"] == first_id
    lines = metrics(run)
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    # TensorBoard: one folder, each step once, step 3 the resumed run's (its own time)
    scalars, steps, texts = tensorboard(run / "tensorboard")
    assert steps["train/time/step"] == [1, 2, 3, 4]
    assert [scalars["train/time/step"][m["step"]] for m in lines] == \
        pytest.approx([m["time"]["step"] for m in lines])
    assert scalars["train/time/step"][3] != pytest.approx(interrupted["time"]["step"])
    assert len(texts["config/text_summary"]) == 2  # each start logs the config it resolved
    # GHPO's own figures under ghpo/, per stage
    assert scalars["ghpo/hard_frac/0"][4] == lines[3]["hard_frac"][0] == 1.0
    assert scalars["ghpo/rescued_frac/0"][4] == lines[3]["rescued_frac"][0]
    # trackio: one run of that id in the project, steps 1-4 with the metrics' figures; the
    # interrupted step 3 is kept beside the resumed one (trackio has no purge)
    got = trackio_rows(tmp_path / "trackio", "tiny")
    assert {name for name, _, _ in got} == {first_id}
    assert [step for _, step, _ in got] == [1, 2, 3, 3, 4]
    last = {step: m for _, step, m in got}  # the latest row of each step
    for m in lines:
        assert last[m["step"]]["train/reward"] == pytest.approx(m["reward"])
        assert last[m["step"]]["ghpo/hinted_frac"] == pytest.approx(m["hinted_frac"])


def test_wandb_runs_offline_and_resume_continues_its_run_id(tiny_model_dir, tmp_path):
    """No account, no network: an offline run in <output_dir>/wandb under the id of
    trackers.json; --resume writes the next offline segment under that same id (`wandb sync`
    makes them one run). The figures are in wandb's own record file under TRL's names."""
    need("wandb")
    from test_runs import cli_args

    cfg = tiny_config(tiny_model_dir, tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    args = [*cli_args(cfg), "--train.sampler=generate", "--log.report_to=wandb"]
    run_cli("ampo.py", args + ["--train.max_steps=1"], env)
    run_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["id"]
    run_cli("ampo.py", args + ["--train.max_steps=2", "--resume"], env)
    segments = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(segments) == 2 and all(p.name.endswith(f"-{run_id}") for p in segments)
    records = (segments[0] / f"run-{run_id}.wandb").read_bytes()
    for name in (b"train/reward", b"train/clip_ratio/region_mean", b"ampo/guided_frac"):
        assert name in records, name


def test_a_missing_tracker_names_the_pip_command(tiny_model_dir, tmp_path, monkeypatch):
    from test_runs import cli_args

    # whatever this machine has installed: the package is looked up under a name no one has
    monkeypatch.setitem(trackers.MODULES, "wandb", "wandb_is_not_installed_here")
    cfg = tiny_config(tiny_model_dir, tmp_path)
    with pytest.raises(SystemExit, match=r"error: config key log.report_to: wandb is not "
                                         r"installed; pip install -r requirements-wandb.txt"):
        ampo.main(cli_args(cfg, "--train.max_steps=1", "--log.report_to=wandb"))
    assert not (tmp_path / "run" / "trackers.json").exists()  # stopped before it wrote


@pytest.mark.parametrize("value, match", [
    ("tensorbord", r"log.report_to: one of none\|tensorboard\|wandb\|trackio, got 'tensorbord'"),
    ("[none,trackio]", r"log.report_to: 'none' with other trackers"),
    ("3", r"log.report_to: expected list, got 3"),
])
def test_an_unknown_tracker_is_an_error_naming_the_key(value, match):
    with pytest.raises(infra.InputError, match=match):
        ampo.check_config(infra.load_config(None, [f"--log.report_to={value}"], ampo.Config))


def test_one_tracker_name_is_a_list_of_one():
    cfg = infra.load_config(None, ["--log.report_to=trackio"], ampo.Config, ("ghpo",))
    assert cfg.log.report_to == ["trackio"]
    assert ampo.Config().log.report_to == ["none"]  # TRL's default: no tracker
