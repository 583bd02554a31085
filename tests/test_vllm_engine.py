"""vllm_engine.py: the pure helpers on CPU; the engine itself only where vLLM and a GPU are."""

import subprocess
import sys

import pytest
import torch

import ampo
import infra
import vllm_engine


def test_importing_the_trainer_never_imports_vllm():
    code = "import sys, ampo, ghpo, vllm_engine; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_wrapper_prefixes_are_stripped_from_every_parameter_name(tiny_model_dir):
    model, _ = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))
    plain = [n for n, _ in model.named_parameters()]
    ddp_compiled = [f"module._orig_mod.{n}" for n in plain]  # DDP around torch.compile
    assert [vllm_engine.hf_param_name(n) for n in ddp_compiled] == plain
    assert [vllm_engine.hf_param_name(n) for n in plain] == plain


def test_to_completion_keeps_the_sampled_stop_token_and_flags_truncation():
    # vLLM ends a stopped sample with its stop token (check_stop keeps it in token_ids).
    assert vllm_engine.to_completion([4, 9, 2], "stop", eos_id=2) == ([4, 9, 2], False)
    assert vllm_engine.to_completion((4, 9, 2), "stop", eos_id=2) == ([4, 9, 2], False)
    # A stop on another generation_config EOS id (3): kept as sampled, nothing appended.
    assert vllm_engine.to_completion([4, 9, 3], "stop", eos_id=2) == ([4, 9, 3], False)
    # Out of tokens: truncated, as in ampo.generate (no stop token in the row).
    assert vllm_engine.to_completion([4, 9, 9], "length", eos_id=2) == ([4, 9, 9], True)
    # The contract cuts after the first EOS, whatever follows it.
    assert vllm_engine.to_completion([4, 2, 7], "stop", eos_id=2) == ([4, 2], False)


def test_to_completion_matches_the_hf_path_row_by_row():
    # ampo.generate's rule on a padded HF row: keep up to and including the first EOS;
    # truncated when the row has none. vLLM's rows have no padding after the stop.
    for row, reason in [([7, 8, 2], "stop"), ([7, 8, 9, 5], "length"), ([2], "stop")]:
        cut = row.index(2) + 1 if 2 in row else len(row)
        assert vllm_engine.to_completion(row, reason, eos_id=2) == (row[:cut], 2 not in row)


def test_engine_settings_follow_the_config(monkeypatch):
    cfg = infra.load_config("configs/ampo_qwen2.5-1.5b-instruct_1gpu.yaml", [], ampo.Config, ("ghpo",))
    cfg.train.vllm_max_model_len = 0  # 0: prompt + completion budget
    monkeypatch.delenv("RANK", raising=False)
    s = vllm_engine.engine_settings("/models/q", cfg)
    assert (s["model"], s["max_model_len"]) == ("/models/q", 9216)
    assert s["gpu_memory_utilization"] == 0.3
    assert (s["distributed_executor_backend"], s["seed"], s["dtype"]) == ("uni", 42, "bfloat16")
    assert s["max_num_seqs"] == 32 * 8  # prompts_per_step x G, all on this one rank
    monkeypatch.setenv("RANK", "3")  # under torchrun: join its processes, another seed
    monkeypatch.setenv("WORLD_SIZE", "4")
    s = vllm_engine.engine_settings("/models/q", cfg)
    assert (s["distributed_executor_backend"], s["seed"]) == ("external_launcher", 45)
    assert s["max_num_seqs"] == 32 // 4 * 8  # this rank's share of the prompts x G
    cfg.train.bf16, cfg.model.dtype = False, "float16"  # no bf16 compute: the model's dtype
    assert vllm_engine.engine_settings("/models/q", cfg)["dtype"] == "float16"


def test_use_vllm_without_vllm_is_a_clear_error(tiny_model_dir):
    try:
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="train.use_vllm"):
        vllm_engine.make_engine(tiny_model_dir, ampo.Config())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_vllm_generate_matches_the_hf_contract_and_takes_new_weights(tiny_model_dir):
    pytest.importorskip("vllm")
    cfg = ampo.Config()
    cfg.model.name_or_path = tiny_model_dir
    cfg.train.max_completion_length, cfg.data.max_prompt_length = 16, 64
    model, tok = infra.load_model(cfg.model)
    engine = vllm_engine.make_engine(tiny_model_dir, cfg)
    prompts = [infra.build_prompt(tok, {"problem": "What is 2 + 3?"}, "{problem}", None)] * 2
    completions, truncated, _ = vllm_engine.generate(engine, tok, prompts, 4, 16)
    assert len(completions) == 8 and len(truncated) == 8
    # vLLM also stops on the generation config's EOS ids (vllm_engine.to_completion).
    extra = engine.llm_engine.model_config.try_get_generation_config().get("eos_token_id") or []
    stops = {tok.eos_token_id, *([extra] if isinstance(extra, int) else extra)}
    for c, cut in zip(completions, truncated):
        assert (len(c) == 16) if cut else (c[-1] in stops)  # stop token kept, or out of tokens
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    vllm_engine.push_weights(engine, model)  # all-zero weights: logits tie, still runs
    assert len(vllm_engine.generate(engine, tok, prompts, 1, 4)[0]) == 2
