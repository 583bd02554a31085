"""Nothing lost, round two: a run owns its folder (a lock; two real processes on one folder),
a bad or full output folder is one clear error before the work, a resume keeps its model, and
malformed chat messages of the official AMPO schema name their row. (compare.py's stale results:
tests/test_compare.py.)"""

import errno
import json
import os
import socket
import subprocess
import sys

import pytest
import yaml

import ampo
import infra

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_config(tiny_model_dir, tmp_path, out, **train):
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b),
             "teachers": [{"source": "t", "response": f"\\boxed{{{a + b}}}"}]}
            for a, b in [(2, 3), (10, 7), (21, 30), (4, 4)]]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": {"name_or_path": tiny_model_dir}, "data": {"train_file": str(data)},
              "train": {"max_steps": 3, "prompts_per_step": 2, "num_generations": 2,
                        "max_completion_length": 4, "micro_batch_size": 4,
                        "verifier_workers": 0, "sampler": "generate", "bf16": False, **train},
              "log": {"output_dir": str(out), "save_every": 0},
              "eval": {"files": [str(data)], "max_problems": 2, "num_samples": 2,
                       "pass_k": [1]}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


# ---- 1. one folder, one run ------------------------------------------------------------------

def test_two_processes_started_at_once_on_one_folder_one_refuses(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    config = write_config(tiny_model_dir, tmp_path, out)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    procs = [subprocess.Popen([sys.executable, "ampo.py", "--config", config, f"--train.seed={s}"],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for s in (1, 2)]
    results = [(p.wait(timeout=900), p.stderr.read()) for p in procs]
    assert sorted(rc != 0 for rc, _ in results) == [False, True], results
    _, err = next(r for r in results if r[0] != 0)
    # at the same time: the lock (naming its owner); one after the other: the finished run
    assert (f"{out} is in use by another run (pid" in err or f"{out} holds another run" in err), err
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl")]
    assert steps == [1, 2, 3]  # one run's log, not two interleaved
    assert not (out / infra.LOCK).exists()  # released at the end


def test_the_lock_names_a_live_owner_and_is_taken_over_from_a_dead_one(tmp_path):
    lock = tmp_path / infra.LOCK
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(),
                                "started": "2026-01-01 00:00:00"}))
    with pytest.raises(infra.InputError, match=rf"in use by another run \(pid {os.getppid()} on "
                                               rf"{socket.gethostname()}, since 2026-01-01"):
        infra.claim_folder(tmp_path)
    lock.write_text(json.dumps({"pid": 1234, "host": "another-machine"}))
    with pytest.raises(infra.InputError, match=f"delete {lock}"):
        infra.claim_folder(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    infra.claim_folder(tmp_path)  # a run killed with -9 on this machine: its lock is stale
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    infra.release_folder(lock)
    assert not lock.exists()


# ---- 3. bad and full output folders ----------------------------------------------------------

def test_an_output_folder_that_is_a_file_or_under_one_is_refused_before_training(
        tiny_model_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, cause in ((blocker, "a file, not a folder"), (blocker / "run", "a file is in its path")):
        config = write_config(tiny_model_dir, tmp_path, out)
        monkeypatch.setattr(infra, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
        with pytest.raises(SystemExit, match=f"cannot write to {out}: {cause}"):
            ampo.main(["--config", config])
        with pytest.raises(SystemExit, match=f"cannot write to {out}: {cause}"):
            ampo.main(["--config", config, "--eval"])  # before the evaluation, not after


def test_a_read_only_or_full_folder_names_the_cause(tmp_path, monkeypatch):
    for code, cause in ((errno.EROFS, "a read-only file system"),
                        (errno.ENOSPC, "no space left on the device")):
        def refuse(*a, code=code, **k):
            raise OSError(code, os.strerror(code))
        monkeypatch.setattr("builtins.open", refuse)
        with pytest.raises(infra.InputError, match=f"cannot write to {tmp_path}: {cause}"):
            infra.check_output_dir(tmp_path)
        monkeypatch.undo()


def test_eval_prints_its_scores_before_writing(tiny_model_dir, tmp_path, capsys, monkeypatch):
    config = write_config(tiny_model_dir, tmp_path, tmp_path / "out")
    real_open = open

    def no_eval_log(path, *a, **k):
        if str(path).endswith("eval.jsonl"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", no_eval_log)
    with pytest.raises(OSError):
        ampo.main(["--config", config, "--eval"])
    assert "avg@2" in capsys.readouterr().out  # the scores reached the screen first


def test_a_full_disk_at_checkpoint_time_says_so_and_leaves_no_partial_folder(
        tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = write_config(tiny_model_dir, tmp_path, out, max_steps=2)
    ampo.main(["--config", config, "--log.save_every=1", "--train.max_steps=1"])
    real_save = infra.torch.save

    def full(obj, f, *a, **k):  # what torch.save raises when the disk fills up
        if "trainer_state" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos "
                               "basic_ios::clear: iostream error")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(infra.torch, "save", full)
    monkeypatch.setattr(infra.shutil, "disk_usage", lambda p: type("U", (), {"free": 4096})())
    with pytest.raises(OSError, match=r"checkpoint-2.tmp failed: no space left on the device "
                                      r"\(0.0 MiB free\)"):
        ampo.main(["--config", config, "--log.save_every=1", "--resume"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    monkeypatch.undo()
    # a stale half checkpoint (a crash of an older version, kill -9) is cleared on resume
    (out / "checkpoint-2.tmp").mkdir()
    (out / "checkpoint-2.tmp" / "junk").write_bytes(b"x" * 1000)
    ampo.main(["--config", config, "--log.save_every=1", "--resume"])
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]


# ---- 4. a resume keeps its model -------------------------------------------------------------

def test_resume_with_another_model_is_refused(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    config = write_config(tiny_model_dir, tmp_path, out, max_steps=1, beta=0.01)
    ampo.main(["--config", config])
    with pytest.raises(SystemExit, match=r"model.name_or_path: --resume continues the run "
                                         r"started from '.*', got '/elsewhere'"):
        ampo.main(["--config", config, "--resume", "--train.max_steps=2",
                   "--model.name_or_path=/elsewhere"])


# ---- 5. the official AMPO schema as JSONL ----------------------------------------------------

@pytest.mark.parametrize("prompt,match", [
    ("What is 1 + 1?", r"row 1: 'prompt' must be a non-empty chat list"),
    ([{"role": "user"}], r"row 1: prompt\[0\] must be a message .* got \{'role': 'user'\}"),
    ([{"role": "banana", "content": "hi"}], r"row 1: prompt\[0\] must be a message"),
    (["What is 1 + 1?"], r"row 1: prompt\[0\] must be a message"),
])
def test_official_rows_with_bad_messages_name_the_file_and_row(tmp_path, prompt, match):
    good = {"data_source": "x", "reward_model": {"ground_truth": "2"}, "target_lst": [],
            "prompt": [{"role": "user", "content": "What is 1 + 1?"}]}
    path = tmp_path / "official.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, prompt=prompt)) + "\n")
    with pytest.raises(infra.InputError, match=rf"official.jsonl {match}"):
        infra.load_dataset(str(path), workers=0)
