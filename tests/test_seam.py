"""The seam for a third guidance method: one file that imports the core, defines its config
block and its rollout function, and passes it to ampo.train(). No edit of ampo.py or infra.py.

The method here, "solution swap": in a group that all failed, replace `swap.slots` wrong
answers by the row's worked solution (off-policy, reward 1). It trains two steps on the tiny
model from a config file that also holds `ampo:` and `ghpo:` blocks, which ampo.py and ghpo.py
still read as their own.
"""

import json
from dataclasses import dataclass, field

import pytest
import yaml

import ampo
import ghpo
import infra


# ---- the whole method -----------------------------------------------------------------------
@dataclass
class SwapConfig:
    slots: int = 1  # wrong answers replaced by the worked solution in a group that all failed


@dataclass
class Config(ampo.Config):
    swap: SwapConfig = field(default_factory=SwapConfig)


def swap_rollout(model, tokenizer, rows, prompt_texts, cfg, **_):
    rollout, metrics = ampo.sample_step(model, tokenizer, rows, prompt_texts, cfg)  # GRPO's
    G, cap = cfg.train.num_generations, cfg.train.max_completion_length
    failing = [i for i in range(len(rows)) if not any(rollout["correct"][i * G:(i + 1) * G])]
    for i in failing:
        ids = tokenizer(rows[i]["solution"], add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
        for s in range(i * G, i * G + cfg.swap.slots):
            ampo.put_answer(rollout, s, ids[:cap], rows[i]["solution"], 1.0, "solution",
                            len(ids) > cap)
    metrics["swapped_frac"] = len(failing) / len(rows)
    return rollout, metrics


def train(cfg):
    return ampo.train(cfg, rollout_fn=swap_rollout, require_solution=True, teachers=False)
# ---------------------------------------------------------------------------------------------


def shared_config(tiny_model_dir, tmp_path):
    rows = [{"problem": f"What is {a} + {b}?", "answer": str(a + b),
             "solution": f"First, {a} + {b} = {a + b}.\nSo the answer is \\boxed{{{a + b}}}.",
             "teachers": [{"source": "short", "response": f"\\boxed{{{a + b}}}"}]}
            for a, b in [(2, 3), (10, 7), (21, 30), (4, 4)]]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"model": {"name_or_path": tiny_model_dir},
              "data": {"train_file": str(data)},
              "train": {"max_steps": 2, "prompts_per_step": 2, "num_generations": 4,
                        "max_completion_length": 24, "micro_batch_size": 4,
                        "verifier_workers": 0, "learning_rate": 1e-3, "sampler": "generate",
                        "bf16": False},
              "log": {"sample_every": 1},
              "ampo": {"trigger": "always"}, "ghpo": {"hint_ratios": [0.5]},
              "swap": {"slots": 2}}
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_a_third_method_trains_through_the_seam(tiny_model_dir, tmp_path):
    path = shared_config(tiny_model_dir, tmp_path)
    cfg = infra.load_config(path, [f"--log.output_dir={tmp_path / 'swap'}"], Config)
    assert cfg.swap.slots == 2
    last = train(cfg)
    steps = [json.loads(line) for line in open(tmp_path / "swap" / "metrics.jsonl")]
    assert [m["step"] for m in steps] == [1, 2]
    # the random tiny model solves nothing: every group gets two worked solutions, so every
    # group has a reward spread and the update a gradient
    assert all(m["swapped_frac"] == 1.0 and m["frac_reward_zero_std"] == 0.0 for m in steps)
    assert all(m["reward"] == 0.5 for m in steps)  # 2 of 4 answers a group score 1
    assert last["grad_norm"] > 0 and last["teacher_token_p"] > 0  # the shaped off-policy term
    samples = [json.loads(line) for line in open(tmp_path / "swap" / "samples.jsonl")]
    assert {s["source"] for s in samples} == {"solution"}  # slot 0 of every group


def test_the_shared_file_still_works_for_ampo_and_ghpo(tiny_model_dir, tmp_path):
    path = shared_config(tiny_model_dir, tmp_path)
    a = infra.load_config(path, [], ampo.Config, ("ghpo",))
    g = infra.load_config(path, [], ghpo.Config, ("ampo",))
    assert a.ampo.trigger == "always" and g.ghpo.hint_ratios == [0.5]
    for main, name in ((ampo.main, "a"), (ghpo.main, "g")):
        main(["--config", path, "--train.max_steps=1", f"--log.output_dir={tmp_path / name}"])
        assert len((tmp_path / name / "metrics.jsonl").read_text().splitlines()) == 1
    # an override of another method's block, or a typo of a section, is still an error
    with pytest.raises(infra.InputError, match="unknown config section 'swap'"):
        infra.load_config(path, ["--swap.slots=3"], ampo.Config, ("ghpo",))
    typo = tmp_path / "typo.yaml"
    typo.write_text("trian:\n  seed: 1\n")
    with pytest.raises(infra.InputError, match="did you mean 'train'"):
        infra.load_config(str(typo), [], ampo.Config, ("ghpo",))
