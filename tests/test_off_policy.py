"""Off-policy done right: the head in chunks (same values and gradients), the sampler's own
log-probs, and the importance weights pi_old / pi_sampler (ampo.py sections 7-8)."""

import math

import pytest
import torch

import ampo
import infra
import sampler


@pytest.fixture()
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    return infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))


def padded_batch(tok, n=5, seed=0):
    """A left/right padded batch of random prompts and completions of different lengths."""
    g = torch.Generator().manual_seed(seed)
    V = len(tok)
    prompts = [torch.randint(3, V, (3 + i % 3,), generator=g).tolist() for i in range(n)]
    comps = [torch.randint(3, V, (2 + (3 * i) % 5,), generator=g).tolist() for i in range(n)]
    return ampo.pad_sequences(prompts, comps, tok.pad_token_id)


def full_vocab_reference(model, ids, attn, C, temperature):
    """The log-probs and entropy as computed before chunking: the whole [N, C, V] at once, the
    padding after shorter answers included (set to 0, as completion_logprobs leaves it)."""
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=pos).logits  # [N, L, V]
    logp_all = (logits[:, -C - 1:-1].float() / temperature).log_softmax(-1)  # [N, C, V]
    logp = logp_all.gather(-1, ids[:, -C:].unsqueeze(-1)).squeeze(-1)
    real = attn[:, -C:].bool()  # [N, C]
    return logp * real, -(logp_all.exp() * logp_all).sum(-1) * real


@pytest.mark.parametrize("chunk", [0, 1, 7, 10_000])
def test_chunked_logprobs_and_entropy_equal_the_full_vocabulary_pass(tiny, chunk):
    model, tok = tiny
    model.float()
    ids, attn, cm = padded_batch(tok)
    C = cm.shape[1]
    weights = torch.randn(2, *cm.shape, generator=torch.Generator().manual_seed(1))

    def run(fn):
        model.zero_grad(set_to_none=True)
        logp, ent = fn()
        ((logp * weights[0] * cm).sum() + (ent * weights[1] * cm).sum()).backward()
        return logp.detach(), ent.detach(), [p.grad.clone() for p in model.parameters()]

    want = run(lambda: full_vocab_reference(model, ids, attn, C, 0.7))
    got = run(lambda: ampo.completion_logprobs(model, ids, attn, C, 0.7, True, chunk))
    assert torch.allclose(got[0], want[0], atol=1e-6) and torch.allclose(got[1], want[1], atol=1e-6)
    for g, w in zip(got[2], want[2]):
        assert torch.allclose(g, w, atol=1e-6, rtol=1e-5)
    # without gradients (pi_old, pi_ref) the same values, and no entropy asked, none returned
    with torch.no_grad():
        logp, ent = ampo.completion_logprobs(model, ids, attn, C, 0.7, False, chunk)
    assert ent is None and torch.allclose(logp, want[0], atol=1e-6)


def test_chunks_keep_no_vocabulary_wide_tensor_for_the_backward(tiny):
    # What autograd keeps between forward and backward: with chunks, nothing of size [N*C, V]
    # (each chunk is recomputed in the backward); all at once, the float32 log-softmax and more.
    model, tok = tiny
    ids, attn, cm = padded_batch(tok, n=6)
    N, C, V = *cm.shape, model.config.vocab_size

    weights = {p.data_ptr() for p in model.parameters()}

    def vocabulary_wide_saved(chunk):  # activations (not weights) with a V-wide last axis
        sizes = []

        def keep(t):
            if t.data_ptr() not in weights and t.dim() and t.shape[-1] == V:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            logp, ent = ampo.completion_logprobs(model, ids, attn, C, 1.0, True, chunk)
        (logp.sum() + ent.sum()).backward()
        return sizes

    # all at once: the float32 log-softmax of the real tokens (the head skips the padding)
    assert max(vocabulary_wide_saved(0)) == int(cm.sum()) * V < N * C * V
    assert vocabulary_wide_saved(4) == []


def test_importance_weights_by_hand():
    # r_t = pi_old / mu: [5, 0.5, 2] on row 0; row 1 is a teacher's row (not corrected)
    old = torch.log(torch.tensor([[0.5, 0.2, 0.4], [0.3, 0.3, 0.3]]))
    mu = torch.log(torch.tensor([[0.1, 0.4, 0.2], [0.9, 0.9, 0.9]]))
    mask = torch.tensor([[True, True, True], [False, False, False]])
    w, r = ampo.importance_weights(old, mu, mask, "token_truncate", 3.0)
    assert w[0].tolist() == pytest.approx([3.0, 0.5, 2.0]) and w[1].tolist() == [1.0] * 3
    assert r[0].tolist() == pytest.approx([5.0, 0.5, 2.0])
    w, _ = ampo.importance_weights(old, mu, mask, "token_mask", 3.0)
    assert w[0].tolist() == pytest.approx([0.0, 0.5, 2.0]) and w[1].tolist() == [1.0] * 3
    # R = 5 * 0.5 * 2 = 5 > 3
    w, r = ampo.importance_weights(old, mu, mask, "sequence_truncate", 3.0)
    assert w[0].tolist() == pytest.approx([3.0] * 3) and r[0].tolist() == pytest.approx([5.0] * 3)
    w, _ = ampo.importance_weights(old, mu, mask, "sequence_mask", 3.0)
    assert w[0].tolist() == [0.0] * 3 and w[1].tolist() == [1.0] * 3
    w, _ = ampo.importance_weights(old, mu, mask, "sequence_mask", 6.0)
    assert w[0].tolist() == pytest.approx([5.0] * 3)
    w, r = ampo.importance_weights(old, mu, mask, "none", 3.0)
    assert w.tolist() == [[1.0] * 3] * 2 and r[0].tolist() == pytest.approx([5.0, 0.5, 2.0])
    # a padded token (mask False) inside a corrected row does not enter its sequence ratio
    w, _ = ampo.importance_weights(old[:1], mu[:1], torch.tensor([[True, True, False]]),
                                   "sequence_truncate", 3.0)
    assert w[0].tolist() == pytest.approx([2.5] * 3)
    with pytest.raises(ValueError, match="train.importance_sampling_mode"):
        ampo.importance_weights(old, mu, mask, "tis", 3.0)


def sampled_batch(model, tok, cfg):
    """Two prompts x 4 answers sampled by the configured engine, scored and batched."""
    infra.attach_engine(model, cfg, None)
    rows = [{"problem": q, "answer": "5", "teachers": []} for q in ("2 + 3?", "1 + 4?")]
    prompts = [tok.apply_chat_template([{"role": "user", "content": r["problem"]}],
                                       add_generation_prompt=True, tokenize=False) for r in rows]
    rollout, _ = ampo.sample_groups(model, tok, rows, prompts, cfg)
    return rollout, ampo.build_batch(tok, rollout, cfg.train)


@pytest.mark.parametrize("engine", ["loop", "generate"])
def test_float32_sampler_gives_weights_of_one(tiny, engine):
    # A float32 sampler is the policy: pi_old / mu = 1 on every sampled token, to 1e-6.
    model, tok = tiny
    cfg = ampo.Config()
    cfg.train.sampler, cfg.train.bf16, cfg.train.verifier_workers = engine, False, 0
    cfg.train.num_generations, cfg.train.max_completion_length = 4, 12
    rollout, batch = sampled_batch(model, tok, cfg)
    assert all(len(lp) == len(c) for lp, c in zip(rollout["sampler_logp"], rollout["completions"]))
    old = ampo.sequence_logprobs(model, batch, 8, cfg.train.temperature)
    mask = batch["completion_mask"] & batch["has_sampler"].unsqueeze(-1)
    w, r = ampo.importance_weights(old, batch["sampler_logp"], mask, "token_truncate", 3.0)
    assert mask.sum() > 8
    assert (r[mask] - 1).abs().max() < 1e-6 and (w[mask] - 1).abs().max() < 1e-6


def test_bf16_sampler_mismatch_is_measured_and_corrected(tiny):
    # A bfloat16 copy samples; the float32 policy trains. The step logs the mismatch, and the
    # weights change the loss by exactly w (the entropy bonus off, one update: ratio 1).
    model, tok = tiny
    cfg = ampo.Config()
    t = cfg.train
    t.sampler, t.bf16, t.verifier_workers, t.num_generations = "loop", True, 0, 4
    t.max_completion_length, t.num_minibatches, t.entropy_coeff = 12, 1, 0.0
    t.temperature, t.loss_type = 1.0, "dapo"
    rollout, batch = sampled_batch(model, tok, cfg)
    t.bf16 = False  # the update in float32: the sampler's bf16 copy is the only difference
    batch["advantages"] = torch.linspace(-1, 1, 8)  # every row has a gradient
    batch["old_logp"] = batch["ref_logp"] = None
    mask = batch["completion_mask"]
    with torch.no_grad():
        old, _ = ampo.completion_logprobs(model, batch["input_ids"], batch["attention_mask"],
                                          mask.shape[1], 1.0)
    d = (old - batch["sampler_logp"])[mask]
    assert d.abs().max() > 1e-4  # bfloat16 moves the probabilities
    losses = {}
    for mode in ("none", "token_truncate", "sequence_mask"):
        t.importance_sampling_mode, t.importance_sampling_cap = mode, 1.001
        opt, sched = infra.make_optimizer(model, t)
        t.learning_rate = 0.0  # measure, do not move the weights
        opt.param_groups[0]["lr"] = 0.0
        losses[mode] = ampo.train_on_batch(model, opt, sched, batch, t, 0.1)
    m = losses["none"]
    assert m["sampling_logp_diff_mean"] == pytest.approx(float(d.abs().mean()), rel=1e-4)
    assert m["sampling_logp_diff_max"] == pytest.approx(float(d.abs().max()), rel=1e-4)
    assert m["sampling_kl"] == pytest.approx(float((d.exp() - 1 - d).mean()), rel=1e-3)
    assert m["is_ratio_max"] == pytest.approx(float(d.exp().max()), rel=1e-4)
    assert m["is_capped_frac"] == 0.0  # mode none changes no weight
    # by hand: per-token loss -A (ratio 1), weighted by min(r, C), token mean over the batch
    A = batch["advantages"].unsqueeze(-1).expand_as(mask)[mask]
    r = d.exp()
    want = float((-A * r.clamp(max=1.001)).sum() / mask.sum())
    assert losses["token_truncate"]["loss"] == pytest.approx(want, rel=1e-4, abs=1e-7)
    assert losses["token_truncate"]["is_capped_frac"] == pytest.approx(
        float((r > 1.001).float().mean()))
    assert losses["none"]["loss"] == pytest.approx(float((-A).sum() / mask.sum()), abs=1e-6)
    assert 0 < losses["sequence_mask"]["is_capped_frac"] <= 1


def test_teacher_answers_have_no_sampler_log_probs():
    r = ampo.make_rollout(["Q"], [[5, 2], [7, 2]], ["5", "7"], [0.0, 0.0], [False, False],
                          [False, False], sampler_logp=[[-0.1, -0.2], [-0.3, -0.4]])
    ampo.put_answer(r, 1, [9, 9, 2], "9", 1.0, "teacher-a")
    assert r["sampler_logp"] == [[-0.1, -0.2], None]
    assert math.isclose(sum(r["sampler_logp"][0]), -0.3)
