"""A fast CPU rollout engine: a bfloat16 copy of the policy and a plain decode loop; and HF
generate, the sampler it replaces (hf_generate, at the end).

    train.sampler: loop     # this file (the embedded CPU default)
    train.sampler: generate # HF model.generate on the policy itself (the default elsewhere)

Why not `generate`? On a 2-core CPU, SmolLM2-135M at batch 16 spends ~150 ms a decode step in
HF generate. A profile of one step (BENCHMARKS.md) shows where: the matrix products (~60%,
float32), the KV cache's torch.cat (~20%) and attention. What transformers offers for speed
did not help here: a static KV cache is slower on CPU (attention over the whole cache), and a
compiled static-cache step was slower still after a minute of compiling. Three things do help,
each measured side by side in bench/rollout.py:

  1. bfloat16 weights: this CPU has native bf16 dot products (avx512_bf16), so the products
     run about twice as fast and read half the bytes. The copy is refreshed from the float32
     policy after every update, exactly as a vLLM engine gets its weights pushed.
  2. eager attention: PyTorch's CPU scaled_dot_product_attention is slow in bfloat16 for one
     query token (~1 ms a layer); the plain matmul-softmax-matmul is not.
  3. finished rows leave the batch: an answer that has emitted its stop token costs nothing
     more, while `generate` keeps decoding padding for it until the longest answer ends.

Is sampling from a bfloat16 copy on-policy? Nearly: bfloat16 keeps about three significant
digits, so the copy's probabilities differ a little from the float32 policy's (gold-token
probabilities moved by up to 0.05 in bench/comprehension.py), the same mismatch as a bf16 vLLM
engine beside an fp32 trainer. pi_old is the training policy's own log-prob (ampo.add_logprobs),
so the PPO ratio stays exactly 1 on the first update; the sampler's own log-probs come back
with every answer, and train.importance_sampling_mode corrects the loss for the difference
(ampo.py section 8), with the mismatch logged every step either way.
"""

from __future__ import annotations

import copy

import torch
from transformers import DynamicCache


def make_sampler(policy, bf16: bool):
    """A frozen copy of the policy for sampling: bfloat16 (and eager attention) when bf16."""
    sampler = copy.deepcopy(policy).eval().requires_grad_(False)
    # infra.wrap_model may have put an autocast wrapper of the policy's own forward on the
    # instance; the copy must run its own.
    vars(sampler).pop("forward", None)
    if bf16:
        sampler.to(torch.bfloat16)
        sampler.set_attn_implementation("eager")
    sampler.config.use_cache = True
    return sampler


def release(sampler):
    """Free the sampler's weights during the update (a vLLM engine's sleep mode): the bfloat16
    copy (0.25 GiB for SmolLM2-135M) is dead weight while the update's activations peak."""
    for mine in sampler.parameters():
        mine.data = torch.empty(0, dtype=mine.dtype, device=mine.device)


def refresh(sampler, policy):
    """Copy the policy's weights (just updated) into the sampler, casting to its dtype; after
    release, into new storage."""
    with torch.no_grad():
        for mine, theirs in zip(sampler.parameters(), policy.parameters()):
            theirs = theirs.full_tensor() if hasattr(theirs, "full_tensor") else theirs
            if mine.shape == theirs.shape:
                mine.copy_(theirs)
            else:
                mine.data = theirs.detach().to(mine.dtype, copy=True)


def sample_next(logits, temperature: float, top_p: float):
    """One token per row from softmax(logits / T), restricted to the top-p nucleus, and its
    log-prob log softmax(logits / T) before the nucleus cut (what the trainer's pi_old is).

    >>> _ = torch.manual_seed(0)
    >>> tokens, logp = sample_next(torch.tensor([[0.0, 9.0, 0.0], [9.0, 0.0, 0.0]]), 1.0, 0.5)
    >>> tokens.tolist(), [round(x, 4) for x in logp.tolist()]
    ([1, 0], [-0.0002, -0.0002])
    """
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)  # [n, V]
    probs = logp_all.exp()  # [n, V]
    if top_p < 1.0:
        # keep the most likely tokens until their mass reaches top_p (the first always stays)
        sorted_p, order = probs.sort(dim=-1, descending=True)  # [n, V]
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # [n, V]
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))  # [n, V]
    tokens = torch.multinomial(probs, 1).squeeze(-1)  # [n]
    return tokens, logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # [n], [n]


def generate(sampler, tokenizer, prompts: list[str], num_generations: int, max_new_tokens: int,
             temperature: float = 1.0, top_p: float = 1.0):
    """ampo.generate's contract: (completions, truncated, logps), G per prompt in prompt order,
    each completion up to and including its first stop token, logps its tokens' log-probs."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left",
                    add_special_tokens=False)
    G, stop = num_generations, tokenizer.eos_token_id
    N = enc.input_ids.shape[0] * G
    completions, logps = [[] for _ in range(N)], [[] for _ in range(N)]
    alive = torch.arange(N)  # [n] which sequences are still being decoded
    cache = DynamicCache(config=sampler.config)
    # Left padding shifts every prompt; positions count real tokens only.
    positions = (enc.attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]
    with torch.inference_mode():
        # Each prompt is read once, then its cache and last logits are copied for its G
        # answers: the G copies of a prompt are identical up to here. (With a one-shot example
        # the prompt is longer than the answer, and reading it G times cost most of the time.)
        logits = sampler(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                         position_ids=positions, past_key_values=cache,
                         logits_to_keep=1).logits[:, -1]  # [B, V]
        cache.batch_repeat_interleave(G)
        logits = logits.repeat_interleave(G, 0)  # [N, V]
        mask = enc.attention_mask.repeat_interleave(G, 0)  # [N, P]
        positions = positions[:, -1:].repeat_interleave(G, 0)  # [N, 1]
        for step in range(max_new_tokens):
            tokens, logp = sample_next(logits, temperature, top_p)  # [n], [n]
            for row, tok, lp in zip(alive.tolist(), tokens.tolist(), logp.tolist()):
                completions[row].append(tok)
                logps[row].append(lp)
            keep = tokens != stop  # [n]
            if not keep.all():  # finished rows leave the batch and the cache
                alive, tokens, mask, positions = alive[keep], tokens[keep], mask[keep], positions[keep]
                cache.batch_select_indices(keep.nonzero().squeeze(-1))
            if len(alive) == 0 or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, mask.new_ones((len(alive), 1))], dim=-1)  # [n, L + 1]
            positions = positions + 1  # [n, 1]
            logits = sampler(input_ids=tokens.unsqueeze(-1), attention_mask=mask,
                             position_ids=positions, past_key_values=cache).logits[:, -1]  # [n, V]
    truncated = [not c or c[-1] != stop for c in completions]
    return completions, truncated, logps


def hf_generate(model, tokenizer, prompts: list[str], num_generations: int, max_new_tokens: int,
                temperature: float = 1.0, top_p: float = 1.0):
    """ampo.generate's contract with HF model.generate on the policy itself (train.sampler:
    generate), reading each prompt G times."""
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
            use_cache=True, output_logits=True, return_dict_in_generate=True)
    model.train(was_training)
    new = out.sequences[:, enc.input_ids.shape[1]:]  # [B*G, C]
    # log softmax(logits / T) of each sampled token, one decode step ([B*G, V]) at a time
    logps = torch.stack([(step.float() / temperature).log_softmax(-1).gather(
        -1, new[:, t:t + 1]).squeeze(-1) for t, step in enumerate(out.logits)], 1)  # [B*G, C]
    completions, truncated, sampler_logps = [], [], []
    for row, lp in zip(new.tolist(), logps.tolist()):
        # Up to the first stop token, which itself stays (ampo.generate says why).
        cut = row.index(stop) + 1 if stop in row else len(row)
        completions.append(row[:cut])
        truncated.append(stop not in row)
        sampler_logps.append(lp[:cut])
    return completions, truncated, sampler_logps
