"""Colocated vLLM rollouts for ampo.py and ghpo.py (optional, GPU only).

    pip install -r requirements-vllm.txt          # after requirements.txt, on a GPU machine
    python ampo.py --config configs/ampo_qwen2.5-1.5b-instruct_1gpu.yaml   # train.use_vllm: true

Why a second module: HF `generate` (ampo.py section 2) is the readable reference and the
fallback everywhere; vLLM samples the same answers many times faster, but drags in its own
pinned torch and transformers and breaks transformers' model loading on a CPU-only machine.
So every vLLM call lives here, vllm is imported inside the functions that need it, and
importing this file (or ampo.py) never imports vllm.

The engine is colocated: under torchrun each rank builds its own engine on its own GPU, beside
the policy it trains, and samples its own prompts (whole groups, see infra.py section 4). After
every optimizer step the policy's new weights are copied into the engine in place, one tensor
at a time, and the engine's prefix cache is dropped (its KV entries were computed with the old
weights). With sleep mode the engine gives its GPU memory back during the training step.

What this was checked against (vllm==0.32.0 is pinned; its tag could not be read here: the
vLLM repository snapshot is over this project's fetch limit, so recent stored copies of the
same files were read instead, next to TRL's colocate mode, trl/generation/vllm_generation.py):
  - vllm/config/parallel.py: external_launcher sets VLLM_ENABLE_V1_MULTIPROCESSING=0 itself;
  - vllm/v1/engine/llm_engine.py: `model_executor` exists only when the engine core runs
    in-process, and vLLM reaches its own model as model_executor.driver_worker.model_runner
    .model (`_get_driver_model_for_cleanup`), the path TRL's load_weights call uses too;
  - vllm/v1/core/sched/utils.py (check_stop): the stop token stays in token_ids, and EOS is
    tested before max_tokens, so an EOS sampled as the last allowed token is a "stop";
  - vllm/sampling_params.py: top_k 0 disables top-k (-1 is still accepted);
    update_from_generation_config adds the generation config's other EOS ids as stop tokens.
Not run here: this project's machines have no vLLM (see docs/scale.md).
"""

from __future__ import annotations

import os

# =============================================================================================
# Pure helpers (tested on CPU, tests/test_vllm_engine.py)
# =============================================================================================

# Wrappers add these parts to parameter names: DDP ("module"), torch.compile ("_orig_mod"),
# activation checkpointing ("_checkpoint_wrapped_module"). vLLM knows the plain HF names.
WRAPPER_PARTS = {"module", "_orig_mod", "_checkpoint_wrapped_module"}


def hf_param_name(name: str) -> str:
    """The Hugging Face name of a (possibly wrapped) parameter.

    >>> hf_param_name("module.model.layers.0._checkpoint_wrapped_module.mlp.up_proj.weight")
    'model.layers.0.mlp.up_proj.weight'
    """
    return ".".join(part for part in name.split(".") if part not in WRAPPER_PARTS)


def to_completion(token_ids, finish_reason: str | None, eos_id: int):
    """One vLLM sample as ampo.generate returns it: (tokens up to and including the first stop
    token, truncated).

    vLLM keeps the stop token in token_ids (the policy must learn to stop, so it must stay).
    "length" means max_tokens (or max_model_len) ran out first: truncated. A "stop" may end on
    a token other than eos_id: vLLM also stops on the model's generation_config EOS ids (Qwen2.5
    Instruct: <|endoftext|> beside <|im_end|>). That token was sampled, so it stays as it is;
    nothing is appended that the policy did not sample.

    >>> to_completion([5, 6, 2], "stop", eos_id=2), to_completion([5, 6, 3], "stop", eos_id=2)
    (([5, 6, 2], False), ([5, 6, 3], False))
    >>> to_completion([5, 6, 7], "length", eos_id=2)
    ([5, 6, 7], True)
    """
    tokens = list(token_ids)
    if eos_id in tokens:  # vLLM stops at the first EOS, so this only guards the contract
        tokens = tokens[:tokens.index(eos_id) + 1]
        return tokens, False
    return tokens, finish_reason == "length"


def engine_settings(model_path: str, cfg) -> dict:
    """The keyword arguments of vllm.LLM for this rank (cfg is ampo's Config)."""
    t = cfg.train
    under_torchrun = "RANK" in os.environ
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return dict(
        model=model_path,
        # One engine per rank, each on its own GPU (no tensor parallelism): the ranks already
        # split the prompts. "external_launcher" tells vLLM that torchrun started the processes,
        # so it joins them instead of spawning workers of its own; "uni" runs one worker here.
        tensor_parallel_size=1,
        distributed_executor_backend="external_launcher" if under_torchrun else "uni",
        # The engine shares the GPU with training: take an explicit share, never vLLM's 0.9.
        gpu_memory_utilization=t.vllm_gpu_memory_utilization,
        # Without it vLLM sizes for the model's full context (32k for Qwen2.5) and may not fit.
        max_model_len=t.vllm_max_model_len or (cfg.data.max_prompt_length
                                               + t.max_completion_length),
        enable_sleep_mode=t.vllm_enable_sleep_mode,
        # Sampled tokens' log-probs after temperature (and, with top_p < 1, after the nucleus
        # cut, unlike sampler.py's), for the importance correction (ampo.py section 8).
        logprobs_mode="processed_logprobs",
        # G answers per prompt share their prompt: the prefix cache computes it once.
        enable_prefix_caching=True,
        # Sample in the dtype the policy computes in (train.bf16: bfloat16 matmuls).
        dtype="bfloat16" if t.bf16 else cfg.model.dtype,
        # TRL's colocate value: vLLM's start-up memory profile of a larger prefill chunk
        # reserves activations that the KV cache then lacks (trl vllm_generation.py). Longer
        # prompts are prefilled in chunks.
        max_num_batched_tokens=4096,
        # A whole step's rollouts (or one eval batch) decode together; the KV cache, sized by
        # gpu_memory_utilization, is the real bound (vLLM preempts when it runs out). vLLM
        # wants at most max_num_batched_tokens of them.
        max_num_seqs=min(max(t.prompts_per_step // world * t.num_generations,
                             cfg.eval.prompts_per_batch * cfg.eval.num_samples, 1), 4096),
        seed=t.seed + rank,  # different answers on different ranks
        trust_remote_code=cfg.model.trust_remote_code,
    )


# =============================================================================================
# The vLLM block: every call into vllm is below
# =============================================================================================


def make_engine(model_path: str, cfg):
    """A vllm.LLM on this rank's GPU, with the settings of engine_settings()."""
    try:
        import vllm
    except ImportError as e:
        raise ImportError("config key train.use_vllm: vLLM is not installed; "
                          "pip install -r requirements-vllm.txt on a GPU machine") from e
    # Keep the engine core in this process, so push_weights can write into its model. vLLM
    # does this itself under external_launcher (vllm/config/parallel.py), not for "uni".
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    engine = vllm.LLM(**engine_settings(model_path, cfg))
    engine.sleep_mode = cfg.train.vllm_enable_sleep_mode  # read by sleep() and wake_up()
    return engine


def generate(engine, tokenizer, prompts: list[str], num_generations: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0):
    """ampo.generate's contract: (completions, truncated, logps), G per prompt, in prompt order.

    logps: vLLM's log-prob of each sampled token (logprobs=0 asks for the sampled one only),
    after temperature (engine_settings sets logprobs_mode to processed_logprobs)."""
    from vllm import SamplingParams

    # The prompts are chat-formatted text already: token ids exactly as ampo.generate makes
    # them (no extra BOS), so the training pass sees the very tokens that were sampled from.
    ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    # Plain sampling as in ampo.generate: top_k 0 (off), no repetition penalty; vLLM takes the
    # model's generation_config defaults only when no SamplingParams is given.
    params = SamplingParams(n=num_generations, temperature=temperature, top_p=top_p, top_k=0,
                            max_tokens=max_new_tokens, stop_token_ids=[tokenizer.eos_token_id],
                            logprobs=0)
    outputs = engine.generate([{"prompt_token_ids": p} for p in ids], params, use_tqdm=False)
    completions, truncated, logps = [], [], []
    for out in outputs:  # one RequestOutput per prompt, in order, with n samples each
        for sample in out.outputs:
            tokens, cut = to_completion(sample.token_ids, sample.finish_reason,
                                        tokenizer.eos_token_id)
            completions.append(tokens)
            truncated.append(cut)
            # one {token id: Logprob} per position; the sampled token is always in it
            logps.append([lp[t].logprob for lp, t in zip(sample.logprobs, tokens)])
    return completions, truncated, logps


def push_weights(engine, policy):
    """Copy the policy's weights into the engine, in place, after an optimizer step.

    Every rank must call it: under FSDP2 each parameter is a DTensor shard, and full_tensor()
    gathers it from all ranks. Gathering one tensor at a time keeps the peak at one full tensor
    (not a whole second model) on top of training's memory.
    """
    import torch
    from torch.distributed.tensor import DTensor

    # The engine's model, in this process (see make_engine); vLLM's and TRL's own path to it.
    model = engine.llm_engine.model_executor.driver_worker.model_runner.model
    with torch.no_grad():
        for name, param in policy.state_dict().items():
            full = param.full_tensor() if isinstance(param, DTensor) else param
            # load_weights maps HF names to vLLM's fused layers (q/k/v -> qkv_proj) and casts
            # to the engine's dtype; a tied lm_head.weight is skipped by the model itself.
            model.load_weights([(hf_param_name(name), full)])
            del full
    # Cached KV blocks were computed by the old weights: drop them.
    engine.reset_prefix_cache()


def sleep(engine):
    """Free the engine's GPU memory for the training step (level 1: weights to CPU RAM, KV
    cache discarded). A no-op without vllm_enable_sleep_mode."""
    if engine.sleep_mode:
        engine.sleep(level=1)


def wake_up(engine):
    """Bring weights and KV cache back before push_weights and the next rollout."""
    if engine.sleep_mode:
        engine.wake_up()
