"""Two ranks (torchrun, gloo, CPU) against one process on the same global batch.

The loss normalisers are global (token counts all-reduced, sequences counted over ranks) and
the backward is scaled by the world size to undo DDP's gradient averaging, so an update must
not depend on how many ranks share the batch. These tests start real processes: a few seconds
each, most of it importing torch and transformers.
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import ampo
import infra

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "distributed_worker.py")


def run(args, nproc=1, cwd=ROOT):
    launch = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--standalone"] if nproc > 1 else [sys.executable])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": ROOT}
    done = subprocess.run(launch + args, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.mark.parametrize("loss_type,parallelism,shared", [
    ("dr_grpo", "ddp", "1"), ("dapo", "ddp", "0"), ("grpo", "ddp", "1"), ("dapo", "fsdp", "1"),
    ("dapo", "fsdp", "0"), ("group_mean", "ddp", "1")])
def test_two_ranks_update_like_one_process(tiny_model_dir, tmp_path, loss_type, parallelism,
                                           shared):
    """One SGD step at learning rate 1 (weights after = weights before - gradient), read back
    from the checkpoint each run writes; FSDP2 runs on CPU with gloo as well. The one process
    reads every prompt once per answer (the padded batch); the two ranks with shared "1" run
    each group's prompt once (train.shared_prompt), its two forwards under DDP and FSDP2."""
    one, two = tmp_path / "one", tmp_path / "two"
    run([WORKER, "step", tiny_model_dir, str(one), loss_type, "ddp", "0"])
    run([WORKER, "step", tiny_model_dir, str(two), loss_type, parallelism, shared], nproc=2)
    assert (two / "checkpoint-1" / "rng_state_1.pt").exists()  # every rank saves its generators
    a, b = (infra.load_model(ampo.ModelConfig(name_or_path=str(p / "checkpoint-1")))[0]
            for p in (one, two))
    start, _ = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    moved = 0.0
    for (name, p), q, before in zip(a.named_parameters(), b.parameters(), start.parameters()):
        torch.testing.assert_close(q, p, atol=2e-6, rtol=1e-5, msg=name)
        moved = max(moved, float((p - before).detach().abs().max()))
    assert moved > 1e-4  # the step did move the weights: the comparison is not vacuous
    ma, mb = (torch.load(p / "checkpoint-1" / "trainer_state.pt", weights_only=True)["metrics"]
              for p in (one, two))
    for key in ("loss", "entropy", "grad_norm", "clip_frac", "teacher_token_p"):
        assert math.isclose(ma[key], mb[key], rel_tol=1e-5, abs_tol=1e-7), key


def test_torchrun_training_run_logs_once_and_resumes(tiny_model_dir, tmp_path):
    """`torchrun --nproc_per_node=2 ampo.py` end to end: one prompt per rank, guidance on every
    group, metrics merged over ranks and written once, periodic evaluation sharded over ranks
    (3 problems: 2 on rank 0, 1 on rank 1), a checkpoint with both ranks' generators, then
    `--resume` for one more step."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(
        {"problem": f"What is {a} + {b}?", "answer": str(a + b),
         "teachers": [{"source": "short", "response": f"\\\\boxed{{{a + b}}}"},
                      {"source": "long", "response": f"{a} and {b}: \\\\boxed{{{a + b}}}"}]}) + "\n"
        for a, b in [(2, 3), (10, 7), (21, 30), (4, 4)]))
    args = [os.path.join(ROOT, "ampo.py"), f"--model.name_or_path={tiny_model_dir}",
            f"--data.train_file={data}", f"--log.output_dir={tmp_path / 'run'}",
            "--train.max_steps=2", "--train.prompts_per_step=2", "--train.num_generations=4",
            "--train.max_completion_length=8", "--train.micro_batch_size=4",
            "--train.verifier_workers=0", "--ampo.trigger=always", "--log.save_every=1",
            f"--eval.files=[{data}]", "--eval.every=2", "--eval.max_problems=3",
            "--eval.num_samples=2", "--eval.pass_k=[1,2]"]
    run(args, nproc=2)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2]
    # 2 teachers in each of the 2 groups, one group on each rank: the counts add up
    assert all(sum(x["teachers_picked"].values()) == 4 for x in lines)
    assert all(x["guided_frac"] == 1.0 for x in lines)
    assert lines[1]["eval"][0]["problems"] == 3
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoint-2").glob("rng_state_*")) == \
        ["rng_state_0.pt", "rng_state_1.pt"]
    run(args + ["--train.max_steps=3", "--resume"], nproc=2)  # the later override wins
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert (tmp_path / "run" / "checkpoint-3" / "model.safetensors").exists()


def test_evaluate_per_data_source_over_two_ranks(tiny_model_dir, tmp_path):
    """Two benchmarks interleaved in one file, 5 problems: rank 0 answers problems 0-2, rank 1
    problems 3-4; each sums its own per source and the sums are all-reduced. Both ranks must
    report exactly what one process does, per source and over sources."""
    from test_ampo import SOURCES, write_valid_parquet

    path = write_valid_parquet(tmp_path / "valid.parquet")
    plan = json.dumps({q: [gold, c] for _, q, gold, c in SOURCES})
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    run([WORKER, "evaluate", tiny_model_dir, path, plan, str(tmp_path / "one")])
    run([WORKER, "evaluate", tiny_model_dir, path, plan, str(tmp_path / "two")], nproc=2)
    one = json.loads((tmp_path / "one" / "rank0.json").read_text())
    for rank in (0, 1):
        two = json.loads((tmp_path / "two" / f"rank{rank}.json").read_text())
        assert two["by_source"].keys() == one["by_source"].keys() == {"aime", "math"}
        for source, scores in one["by_source"].items():
            assert two["by_source"][source] == pytest.approx(scores)
        assert two["source_mean"] == pytest.approx(one["source_mean"])
        assert two["source_mean"]["avg@4"] == pytest.approx(1 / 3)  # (2/8 + 5/12) / 2
        assert {k: two[k] for k in ("problems", "avg@4", "pass@2")} == pytest.approx(
            {k: one[k] for k in ("problems", "avg@4", "pass@2")})


def test_fsdp_guidance_with_only_one_rank_guided(tiny_model_dir, tmp_path):
    """FSDP2 on 2 ranks: rank 0's group failed (guided, 2 candidates to score), rank 1's did not
    (nothing to score). Every FSDP2 forward is a collective, so rank 1 must run as many dummy
    forwards as rank 0 runs scoring batches; calling a different collective instead hung.
    Rank 0's scores must equal the same scoring in one unsharded process."""
    run([WORKER, "guide", tiny_model_dir, str(tmp_path)], nproc=2)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["metrics"]["guided_frac"] == 1.0 and sum(r0["off_policy"]) == 2
    assert r1["metrics"]["guided_frac"] == 0.0 and not any(r1["off_policy"])
    policy, tok = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    row = {"problem": "What is 0 + 2?", "messages": None}
    prompt = infra.build_prompt(tok, row, ampo.DataConfig().prompt_template, None)
    alone = ampo.comprehension_scores(policy, tok, [prompt] * 2,
                                      ["\\boxed{2}", "0 plus 2 is \\boxed{2}"], ["2", "2"])
    assert r0["metrics"]["comprehension_mean"] == pytest.approx(sum(alone) / 2, rel=1e-4)


def test_a_skipped_update_is_counted_once_over_ranks(tiny_model_dir, tmp_path):
    """A non-finite gradient is the same event on every rank (the grad norm is global), so two
    ranks that both skip one update report skipped_updates 1, not 2."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"problem": f"What is {a} + 1?", "answer": str(a + 1)})
                            + "\n" for a in range(4)))
    cfg = {"model": {"name_or_path": tiny_model_dir},
           "data": {"train_file": str(data)},
           "train": {"max_steps": 2, "prompts_per_step": 2, "num_generations": 2,
                     "max_completion_length": 4, "verifier_workers": 0, "num_minibatches": 1},
           "ampo": {"trigger": "never"}, "log": {"output_dir": str(tmp_path / "run")}}
    run([WORKER, "nan", json.dumps(cfg)], nproc=2)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [x["skipped_updates"] for x in lines] == [1, 1]
