"""The paper-scale configs in configs/ load with the script that runs them, and say what the
specs say: a typo in a key fails to load, a wrong number fails here. No model is loaded."""

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

import ampo
import infra
import ghpo

CONFIGS = {p.name: p for p in
           sorted(Path(__file__).resolve().parent.parent.glob("configs/*.yaml"))}
AMPO_7B = "ampo_qwen2.5-7b-instruct_4gpu.yaml"
AMPO_1_5B = "ampo_qwen2.5-1.5b-instruct_1gpu.yaml"
GHPO_7B = "ghpo_qwen2.5-math-7b.yaml"


def script(path) -> str:
    """The script that runs a config: ghpo_*.yaml -> ghpo, the others -> ampo."""
    return "ghpo" if path.name.startswith("ghpo") else "ampo"


def load(path):
    """Load as each script's main() does: its own Config class, the other block foreign."""
    if script(path) == "ghpo":
        cfg = infra.load_config(str(path), [], ghpo.Config, ("ampo",))
        ghpo.check_config(cfg)  # ghpo.train() runs it before loading any model
        return cfg
    return infra.load_config(str(path), [], ampo.Config, ("ghpo",))


def gpus(path) -> int:
    """The GPU count of the launch command in the file's header; every file must state it."""
    found = re.findall(r"--nproc_per_node=(\d+)", path.read_text())
    assert found, f"{path.name}: no 'torchrun --nproc_per_node=N' in the header"
    assert len(set(found)) == 1, f"{path.name}: launch commands disagree: {found}"
    return int(found[0])


def test_there_are_three_configs():
    assert sorted(CONFIGS) == sorted([AMPO_1_5B, AMPO_7B, GHPO_7B])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_key_is_a_field_of_its_script(name):
    """Loading proves it for the script's own blocks; the other script's block would be skipped
    silently (foreign), so a config may not carry one, and every key is checked here too."""
    path = CONFIGS[name]
    raw = yaml.safe_load(path.read_text())
    cls = ghpo.Config if script(path) == "ghpo" else ampo.Config
    other = "ampo" if script(path) == "ghpo" else "ghpo"
    assert other not in raw, f"{name}: an {other}: block would be ignored by {script(path)}.py"
    cfg = cls()
    for section, values in raw.items():
        fields = {f.name for f in dataclasses.fields(getattr(cfg, section))}
        assert set(values) <= fields, f"{name} [{section}]: unknown {set(values) - fields}"
    load(path)  # and the loader itself accepts it (types included)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_fits_its_gpus(name):
    path = CONFIGS[name]
    cfg, n = load(path), gpus(path)
    t = cfg.train
    assert t.prompts_per_step % n == 0  # whole groups on every rank (train() checks it too)
    per_rank = t.prompts_per_step // n * t.num_generations  # sequences on each rank
    assert per_rank % t.num_minibatches == 0  # equal updates, equal micro-batches on all ranks
    assert (per_rank // t.num_minibatches) % t.micro_batch_size == 0
    text = path.read_text()
    assert "ARITHMETIC, NOT MEASURED" in text  # the memory budget is labelled as such
    assert "gradient checkpointing" in text and f"{t.vllm_gpu_memory_utilization} x 80 GB" in text
    assert t.parallelism == ("fsdp" if n > 1 else "ddp")
    assert t.bf16 and t.use_vllm and cfg.model.gradient_checkpointing
    assert t.vllm_max_model_len >= cfg.data.max_prompt_length + t.max_completion_length


def test_ampo_7b_is_the_release_run():
    """The official exp_scripts/train_ampo.sh, number by number."""
    path = CONFIGS[AMPO_7B]
    cfg = load(path)
    t, a = cfg.train, cfg.ampo
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-7B-Instruct" and gpus(path) == 4
    assert cfg.data.train_file == "data/openr1_math_4longcots.parquet"
    assert (t.max_steps, t.prompts_per_step, t.num_generations) == (510, 128, 8)
    assert (cfg.data.max_prompt_length, t.max_completion_length) == (1024, 8192)
    assert (t.temperature, t.top_p, t.learning_rate, t.warmup_steps) == (1.0, 1.0, 1e-6, 0)
    assert (t.weight_decay, t.adam_beta1, t.adam_beta2, t.max_grad_norm) == (0.1, 0.9, 0.999, 1.0)
    assert (t.num_minibatches, t.epsilon, t.epsilon_high, t.clip_ratio_c) == (2, 0.2, 0.2, 10.0)
    assert (t.beta, t.loss_type, t.scale_rewards) == (0.0, "dr_grpo", False)
    assert (t.format_weight, t.repetition_penalty, t.entropy_coeff) == (0.1, True, 1e-4)
    assert (a.trigger, a.num_off_policy_targets, a.max_available_targets) == ("adaptive", 2, 4)
    assert (a.selection, a.comprehension_score) == ("comprehension", "arith")
    assert a.comprehension_input == "official"  # <answer> rewrite, logits / T, + 0.1 format
    assert (a.shaping_gamma, a.teacher_reward) == (0.1, 1.0)
    assert (t.parallelism, t.bf16, t.use_vllm, t.vllm_enable_sleep_mode) == ("fsdp", True, True,
                                                                            True)
    assert (cfg.log.save_every, cfg.eval.every, cfg.eval.temperature) == (50, 10, 0.6)


def test_embedded_default_scores_comprehension_on_the_boxed_span():
    """config.yaml's teachers answer in \\boxed{} without <answer> tags: under the official rule
    every one would score 0 (docs/official.md, comprehension rows)."""
    cfg = infra.load_config("config.yaml", [], ampo.Config, ("ghpo",))
    assert cfg.ampo.comprehension_input == "span"


def test_ampo_1_5b_is_the_dev_recipe():
    """The authors' development runs (1 GPU), with the release's method settings."""
    path = CONFIGS[AMPO_1_5B]
    cfg, big = load(path), load(CONFIGS[AMPO_7B])
    t = cfg.train
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-1.5B-Instruct" and gpus(path) == 1
    assert (t.max_steps, t.prompts_per_step, t.num_minibatches) == (210, 32, 4)
    assert t.prompts_per_step // t.num_minibatches == 8  # ppo_mini_batch_size 8 prompts
    # what was not scaled is the release's
    same = ("num_generations", "max_completion_length", "temperature", "learning_rate",
            "weight_decay", "epsilon", "epsilon_high", "clip_ratio_c", "beta", "loss_type",
            "scale_rewards", "format_weight", "repetition_penalty", "entropy_coeff")
    assert {k: getattr(t, k) for k in same} == {k: getattr(big.train, k) for k in same}
    assert cfg.ampo == big.ampo and cfg.data == big.data


def test_ghpo_math_7b_is_the_official_recipe():
    """The official recipes/Qwen2.5-Math-7B/ghpo/config_ghpo.yaml."""
    path = CONFIGS[GHPO_7B]
    cfg = load(path)
    t, g = cfg.train, cfg.ghpo
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-Math-7B" and gpus(path) == 4
    assert (t.prompts_per_step, t.num_generations, t.learning_rate) == (112, 8, 1e-6)
    assert t.prompts_per_step // gpus(path) == 28  # per_device 8 completions x GA 28 / G 8
    assert (cfg.data.max_prompt_length, t.max_completion_length) == (2048, 2048)
    assert (t.temperature, t.top_p, t.weight_decay, t.max_grad_norm, t.seed) == (
        1.0, 1.0, 0.0, 1.0, 42)
    assert (t.beta, t.epsilon, t.epsilon_high, t.num_minibatches) == (0.0, 0.2, 0.2, 1)
    assert (t.scale_rewards, t.entropy_coeff) == (True, 0.0)
    # TRL's bnpo with per_device_train_batch_size 8 = num_generations: one group a micro-batch
    assert t.loss_type == "group_mean" and t.loss_type == ghpo.Config().train.loss_type
    assert (t.max_steps, t.warmup_steps) == (5 * (18300 // 112), 82)  # 5 epochs, warmup 0.1
    assert g.hint_ratios == [0.25, 0.5, 0.75] and g.start_hint_step == 0
    assert (g.hint_unit, g.hint_includes_answer) == ("char", True)
    assert g.hint_template == ghpo.HINT_TEMPLATE  # the official sentence, untouched
    assert g.skip_unparsed_gold  # official rewards.py L78-L81: no accuracy reward, no hint
    assert cfg.data.prompt_template == "{problem}"
    assert cfg.data.system_prompt.startswith("You are a helpful AI Assistant")
    assert cfg.data.system_prompt.endswith("<think>\n...\n</think>\n<answer>\n...\n</answer>")
    assert cfg.ampo.trigger == "never"  # no teachers in a GHPO run
    assert cfg.log.output_dir == "runs/ghpo-qwen2.5-math-7b"
