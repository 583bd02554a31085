"""The paper-scale configs in configs/ load with the script that runs them, and say what the
specs say: a typo in a key fails to load, a wrong number fails here. No model is loaded."""

import re
from pathlib import Path

import pytest

import ampo
import ghpo

CONFIGS = sorted(Path(__file__).resolve().parent.parent.glob("configs/*.yaml"))


def load(path):
    if path.name.startswith("ghpo"):
        cfg = ampo.load_config(str(path), [], ghpo.Config, ("ampo",))
        ghpo.check_config(cfg)
        return cfg
    return ampo.load_config(str(path))


def gpus(path) -> int:
    """The GPU count of the launch command in the file's header."""
    text = path.read_text()
    found = re.search(r"--nproc_per_node=(\d+)", text)
    return int(found.group(1)) if found else 1


def test_there_are_three_configs():
    assert [p.name for p in CONFIGS] == ["ampo_qwen2.5-1.5b-instruct_1gpu.yaml",
                                         "ampo_qwen2.5-7b-instruct_4gpu.yaml",
                                         "ghpo_qwen2.5-math-7b.yaml"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads_and_fits_its_gpus(path):
    cfg = load(path)
    n = gpus(path)
    assert cfg.train.prompts_per_step % n == 0  # whole groups on every rank
    assert "ARITHMETIC, NOT MEASURED" in path.read_text()  # the memory budget is labelled
    if n > 1 and cfg.train.parallelism == "fsdp":
        assert cfg.train.use_vllm  # FSDP2 on several ranks samples with vLLM
    assert cfg.train.vllm_max_model_len >= cfg.data.max_prompt_length + \
        cfg.train.max_completion_length


def test_ampo_7b_is_the_release_run():
    """spec/AMPO.md section 6, number by number."""
    cfg = load(CONFIGS[1])
    t, a = cfg.train, cfg.ampo
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-7B-Instruct" and gpus(CONFIGS[1]) == 4
    assert (t.max_steps, t.prompts_per_step, t.num_generations) == (510, 128, 8)
    assert (cfg.data.max_prompt_length, t.max_completion_length) == (1024, 8192)
    assert (t.temperature, t.top_p, t.learning_rate, t.weight_decay) == (1.0, 1.0, 1e-6, 0.1)
    assert (t.num_minibatches, t.epsilon, t.epsilon_high, t.clip_ratio_c) == (2, 0.2, 0.2, 10.0)
    assert (t.beta, t.loss_type, t.scale_rewards, t.format_weight) == (0.0, "dr_grpo", False, 0.1)
    assert (a.trigger, a.num_off_policy_targets, a.max_available_targets) == ("adaptive", 2, 4)
    assert (a.selection, a.shaping_gamma, a.teacher_reward) == ("comprehension", 0.1, 1.0)
    assert (t.parallelism, t.bf16, t.use_vllm) == ("fsdp", True, True)


def test_ampo_1_5b_is_the_dev_recipe():
    cfg = load(CONFIGS[0])
    t = cfg.train
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-1.5B-Instruct" and gpus(CONFIGS[0]) == 1
    assert (t.max_steps, t.prompts_per_step, t.num_minibatches) == (210, 32, 4)


def test_ghpo_math_7b_is_the_official_recipe():
    """spec/GHPO.md section 6."""
    cfg = load(CONFIGS[2])
    t, g = cfg.train, cfg.ghpo
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-Math-7B"
    assert (t.prompts_per_step, t.num_generations, t.learning_rate) == (112, 8, 1e-6)
    assert (cfg.data.max_prompt_length, t.max_completion_length) == (2048, 2048)
    assert (t.beta, t.epsilon, t.num_minibatches, t.scale_rewards) == (0.0, 0.2, 1, True)
    assert g.hint_ratios == [0.25, 0.5, 0.75] and g.start_hint_step == 0
    assert cfg.ampo.trigger == "never"  # no teachers in a GHPO run
