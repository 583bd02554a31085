"""train.shared_prompt: each group's prompt runs once, its keys and values read by the group's
answers (ampo.shared_prompt_hidden). It must give the numbers of the padded batch, where every
answer reads its own copy of the prompt: log-probs, entropy, loss and gradients to 1e-5 in
float32 on the tiny model (on the real one to float32's own noise, see its test), for groups
with teacher answers, prompts of different lengths, GHPO's hinted prompts (and the rows whose
pi_old is taken behind another prompt), micro-batches that split a group or join two, the
pi_old and reference passes, gradient checkpointing. Two ranks (DDP, FSDP2) are in
tests/test_distributed.py."""

import collections
import contextlib
import copy

import pytest
import torch

import ampo
import infra

G = 4


def rollout(tok, prompts, sampled_prompts=None):
    """len(prompts) groups of G answers of lengths 1 to 7; one teacher answer a group."""
    n = len(prompts) * G
    g = torch.Generator().manual_seed(1)
    comps = [torch.randint(3, 300, (1 + (3 * i) % 7,), generator=g).tolist() for i in range(n)]
    out = {"prompts": prompts, "completions": comps, "off_policy": [i % G == 1 for i in range(n)],
           "rewards": [float(i % 3 == 0) for i in range(n)], "sampler_logp": [None] * n}
    if sampled_prompts:
        out["sampled_prompts"] = sampled_prompts
    return out


def train_cfg(**kw):
    base = dict(num_generations=G, micro_batch_size=G, num_minibatches=1, entropy_coeff=0.01,
                max_grad_norm=1e9, max_completion_length=8, learning_rate=0.0)
    return ampo.TrainConfig(**{**base, **kw})


PROMPTS = ["What is 2 + 3? Think.", "1 + 1?", "Add 21 and 30, then box it."]


def logprobs_and_grads(model, batch, rows, shared):
    """log pi, entropy [b, c] of some rows of a batch, and the gradient of a loss of both."""
    model.zero_grad(set_to_none=True)
    mb = infra.micro_batch(batch, rows)
    c = mb["completion_mask"].shape[1]
    logp, ent = ampo.completion_logprobs(model, mb["input_ids"], mb["attention_mask"], c,
                                         with_entropy=True, chunk_size=5,
                                         groups=mb["group"] if shared else None)
    m = mb["completion_mask"]
    w = torch.linspace(-1, 1, logp.numel()).view_as(logp)  # a loss that weighs every token
    ((w * logp + ent) * m).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logp.detach() * m, ent.detach() * m, grads


def assert_same(a, b):
    for x, y in zip(a[:2], b[:2]):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    assert a[2].keys() == b[2].keys() and a[2]
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.fixture()
def tiny(tiny_model_dir):
    return infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))


@pytest.mark.parametrize("rows", [slice(0, 12), slice(0, 4), slice(2, 7), slice(3, 9)],
                         ids=["three groups", "one group", "split groups", "two halves"])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])  # eager: bf16 + checkpointing on a CPU
def test_logprobs_entropy_and_gradients_equal_the_padded_batch(tiny, rows, checkpointing,
                                                               attention):
    model, tok = tiny
    model.set_attn_implementation(attention)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = ampo.build_batch(tok, rollout(tok, PROMPTS), train_cfg())
    assert batch["group"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    padded = logprobs_and_grads(model, batch, rows, shared=False)
    shared = logprobs_and_grads(model, batch, rows, shared=True)
    assert_same(padded, shared)
    assert padded[0].abs().sum() > 0 and padded[1].abs().sum() > 0  # not vacuous


def test_gradient_checkpointing_changes_no_number(tiny):
    # config.yaml's default recomputes the layers in the backward: the same values, less memory
    model, tok = tiny
    model.train()
    batch = ampo.build_batch(tok, rollout(tok, PROMPTS), train_cfg())
    kept = logprobs_and_grads(model, batch, slice(0, 12), shared=True)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert_same(kept, logprobs_and_grads(model, batch, slice(0, 12), shared=True))


def test_bf16_once_casts_each_weight_once_per_micro_batch(tiny):
    # Under train.bf16 autocast casts the float32 weights in every forward it wraps: the prompts'
    # pass, the answers' pass and each recompute. Inside infra.bf16_once it casts each once.
    from torch.utils._python_dispatch import TorchDispatchMode

    model, tok = tiny
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cfg = train_cfg(bf16=True)
    model = infra.wrap_model(model.train(), cfg)  # forward under autocast
    params = {p.data_ptr(): n for n, p in model.named_parameters()}
    batch = ampo.build_batch(tok, rollout(tok, PROMPTS), cfg)

    class CountCasts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if (func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.bfloat16
                    and args[0].data_ptr() in params):
                self.casts[params[args[0].data_ptr()]] += 1
            return func(*args, **kwargs)

    runs = []
    for context in (contextlib.nullcontext(), infra.bf16_once(cfg)):
        counter = CountCasts()
        counter.casts = collections.Counter()
        with counter, context:
            runs.append((logprobs_and_grads(model, batch, slice(0, 12), shared=True),
                         counter.casts))
    (each_pass, casts_each), (once, casts_once) = runs
    q = "model.layers.0.self_attn.q_proj.weight"
    assert casts_each[q] == 4  # prompts, answers, and both again in the recompute
    layers = [n for n in casts_each if n.startswith("model.layers.")]
    assert len(layers) == 20 and {casts_once[n] for n in layers} == {1}
    # The head: the model's own (on no rows) and completion_logprobs's cast, out of the recompute
    assert casts_each["lm_head.weight"] == 3 and casts_once["lm_head.weight"] == 2
    # The same bfloat16 weights: the same values; the gradients to bfloat16's rounding (the
    # passes' gradients to a weight now add up in bfloat16 before its float32 .grad).
    torch.testing.assert_close(once[0], each_pass[0], atol=0, rtol=0)
    for name, g in each_pass[2].items():
        torch.testing.assert_close(once[2][name], g, atol=1e-3, rtol=2e-2, msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rule is for a CPU")
@pytest.mark.parametrize("checkpointing", [False, True])
def test_bf16_on_a_cpu_takes_eager_attention_only_with_checkpointing(tiny_model_dir,
                                                                     checkpointing):
    # eager: faster than the CPU's bf16 sdpa, but it keeps [b, heads, L, L] per layer
    model, _ = infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir,
                                                 gradient_checkpointing=checkpointing))
    assert model.config._attn_implementation == "sdpa"
    infra.wrap_model(model, train_cfg(bf16=True))
    assert model.config._attn_implementation == ("eager" if checkpointing else "sdpa")


def update(model, batch, cfg, ref=None):
    """One train_on_batch (SGD at lr 0 keeps the weights): its gradients and metrics."""
    model = copy.deepcopy(model)
    batch = ampo.add_logprobs(dict(batch), model, ref, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    grads = {}
    opt.register_step_pre_hook(lambda *_: grads.update(
        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda u: 1.0)
    metrics = ampo.train_on_batch(model, opt, sched, batch, cfg, 0.1)
    return grads, metrics, batch


@pytest.mark.parametrize("loss_type", ["dr_grpo", "grpo", "group_mean"])
@pytest.mark.parametrize("micro,minibatches,beta", [(4, 1, 0.0), (3, 1, 0.0), (8, 2, 0.0),
                                                    (5, 2, 0.1)],
                         ids=["whole groups", "split groups", "joined groups, pi_old pass",
                              "pi_old and reference passes"])
def test_the_update_equals_the_padded_batch(tiny, loss_type, micro, minibatches, beta):
    model, tok = tiny
    model.train()
    ref = copy.deepcopy(model).eval() if beta else None
    if ref is not None:
        with torch.no_grad():  # a reference policy that differs from the policy
            for p in ref.parameters():
                p.mul_(0.9)
    out = {}
    for shared in (False, True):
        cfg = train_cfg(loss_type=loss_type, micro_batch_size=micro, num_minibatches=minibatches,
                        beta=beta, shared_prompt=shared)
        batch = ampo.build_batch(tok, rollout(tok, PROMPTS), cfg)
        out[shared] = update(model, batch, cfg, ref)
    (g0, m0, b0), (g1, m1, b1) = out[False], out[True]
    for key in ("old_logp", "ref_logp"):
        if b0[key] is not None:
            torch.testing.assert_close(b1[key], b0[key], atol=1e-5, rtol=1e-5)
    assert (b0["old_logp"] is not None) == (minibatches > 1)
    for key in ("loss", "entropy", "grad_norm", "clip_frac", "teacher_token_p", "kl"):
        if key in m0:
            assert m1[key] == pytest.approx(m0[key], rel=1e-5, abs=1e-7), key
    assert g0.keys() == g1.keys() and m0["grad_norm"] > 0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-5, msg=name)


def test_ghpo_hinted_prompts_and_pi_old_behind_the_sampled_prompt(tiny):
    """GHPO trains a group behind its hinted prompt (one per stage, so groups' prompts differ
    in length); with loss_context original_prompt_is the answers' pi_old is taken behind the
    prompt that sampled them (batch["sampled_context"]): both passes shared, both equal."""
    model, tok = tiny
    model.train()
    hinted = [PROMPTS[0] + " Hint: 2 + 3", PROMPTS[1], PROMPTS[2] + " Hint: 21 + 30 = 51, so"]
    out = {}
    for shared in (False, True):
        cfg = train_cfg(micro_batch_size=3, shared_prompt=shared)
        batch = ampo.build_batch(tok, rollout(tok, PROMPTS, sampled_prompts=hinted), cfg)
        assert batch["sampled_context"][0] == [0, 1, 2, 3, 8, 9, 10, 11]
        out[shared] = update(model, batch, cfg)
    (g0, m0, b0), (g1, m1, b1) = out[False], out[True]
    assert b0["old_rows"].tolist() == [True] * 4 + [False] * 4 + [True] * 4
    torch.testing.assert_close(b1["old_logp"], b0["old_logp"], atol=1e-5, rtol=1e-5)
    assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-5, abs=1e-7)
    assert m1["ppo_kl"] == pytest.approx(m0["ppo_kl"], rel=1e-5, abs=1e-7) and m0["ppo_kl"] != 0
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-5, rtol=1e-5, msg=name)


def test_the_real_model_gives_the_padded_numbers():
    """SmolLM2-135M-Instruct (the embedded default, offline), float32, with its chat template
    and the default's one-shot example: 2 groups x 4 answers, then rows 2-4 (a split group).

    Through 30 layers float32 rounding is larger than the tiny model's, for the padded batch
    itself: the same 8 rows in micro-batches of one group each (other padding, other sums)
    moved single gradient entries by up to 9e-4 of their tensor's largest and the whole
    gradient by 3e-5 of its norm (AMD EPYC). The shared prompt moved them by 4e-5 and 2.5e-6,
    log-probs by 2.1e-5, entropy by 1.0e-5. So the bounds here are the gradient's norm to 1e-5
    (relative), each tensor to 2e-4 of its largest entry, log-probs and entropy to 1e-4: an
    error in what the answers attend to (a wrong prompt, position or mask) is of order 1.
    """
    cfg = infra.load_config("config.yaml", [], ampo.Config, ("ghpo",))
    model, tok = infra.load_model(cfg.model)
    model.train()
    rows = [{"problem": "What is 12 + 30?", "messages": None},
            {"problem": "What is 7 * 6? Show your steps.", "messages": None}]
    prompts = [infra.build_prompt(tok, r, cfg.data.prompt_template, None, cfg.data.example)
               for r in rows]
    answers = ["12 + 30 = 42, so \\boxed{42}.", "\\boxed{42}", "It is 40.", "12 and 30 make 42",
               "7 * 6 = 42. \\boxed{42}", "42", "Seven sixes: \\boxed{42}", "6 * 7 is 42."]
    ids = tok(answers, add_special_tokens=False)["input_ids"]
    ro = {"prompts": prompts, "completions": [a + [tok.eos_token_id] for a in ids],
          "off_policy": [i % 4 == 1 for i in range(8)], "rewards": [1.0, 1, 0, 0, 1, 0, 1, 0],
          "sampler_logp": [None] * 8}
    batch = ampo.build_batch(tok, ro, train_cfg())
    for rows in (slice(0, 8), slice(2, 5)):
        padded = logprobs_and_grads(model, batch, rows, shared=False)
        shared = logprobs_and_grads(model, batch, rows, shared=True)
        for x, y in zip(shared[:2], padded[:2]):
            torch.testing.assert_close(x, y, atol=1e-4, rtol=0)
        g0, g1 = padded[2], shared[2]
        assert g0.keys() == g1.keys() and g0
        for name in g0:
            assert (g1[name] - g0[name]).abs().max() <= 2e-4 * g0[name].abs().max(), name
        norm = lambda g: torch.sqrt(sum((x.double() ** 2).sum() for x in g.values()))  # noqa: E731
        assert norm({n: g1[n] - g0[n] for n in g0}) <= 1e-5 * norm(g0)
