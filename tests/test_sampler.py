"""sampler.py, the CPU decode loop: the same answers as HF generate, and the engine plumbing."""

import pytest
import torch

import ampo
import infra
import sampler


@pytest.fixture()
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    return infra.load_model(ampo.ModelConfig(name_or_path=tiny_model_dir))


def prompts_of(tok):
    chat = [[{"role": "user", "content": q}] for q in ("What is 2 + 3?", "Add 12 and 30, then 7.")]
    return [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chat]


def test_greedy_loop_equals_hf_generate_with_rows_finishing_early(tiny):
    # With a near-zero temperature both sample the argmax. The stop token is chosen among the
    # greedy tokens so that rows stop at different steps: finished rows leave the loop's batch
    # and its KV cache, which must not change the answers of the rows still running.
    model, tok = tiny
    prompts = prompts_of(tok)
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left",
              add_special_tokens=False)
    with torch.no_grad():
        free = model.generate(**enc, do_sample=False, max_new_tokens=12, min_new_tokens=12,
                              pad_token_id=tok.pad_token_id)[:, enc.input_ids.shape[1]:]
    stop = int(free[0, 4])  # row 0 stops at its 5th token or earlier
    tok.eos_token = tok.convert_ids_to_tokens(stop)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=12, eos_token_id=stop,
                             pad_token_id=tok.pad_token_id)[:, enc.input_ids.shape[1]:]
    want = [r[:r.index(stop) + 1] if stop in r else r for r in out.tolist()]
    got, truncated, _ = sampler.generate(sampler.make_sampler(model, bf16=False), tok, prompts, 1,
                                      12, temperature=1e-6)
    assert got == want
    assert len(got[0]) <= 5 and got[0][-1] == stop and not truncated[0]
    assert len(got[0]) != len(got[1])  # the rows did finish at different steps
    assert truncated[1] == (stop not in got[1])


def test_each_prompt_is_read_once_and_its_answers_continue_from_copies(tiny):
    # G = 3 greedy answers per prompt, from one read of each prompt whose cache is copied:
    # every copy must give HF generate's greedy answer of its own prompt, in prompt order.
    model, tok = tiny
    prompts = prompts_of(tok)
    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left",
              add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                             pad_token_id=tok.pad_token_id)[:, enc.input_ids.shape[1]:]
    got, _, _ = sampler.generate(sampler.make_sampler(model, bf16=False), tok, prompts, 3, 8,
                              temperature=1e-6)
    want = [row for row in out.tolist() for _ in range(3)]
    assert [g[:8] for g in got] == [w[:len(g)] for g, w in zip(got, want)]
    assert got[0] != got[3]  # the two prompts' answers differ: the copies did not mix


def test_sampled_answers_keep_ampo_generate_contract(tiny):
    model, tok = tiny
    torch.manual_seed(0)
    comps, trunc, _ = sampler.generate(sampler.make_sampler(model, bf16=True), tok, prompts_of(tok),
                                    3, 6, temperature=1.0, top_p=0.9)
    assert len(comps) == 6 and len(trunc) == 6
    for c, t in zip(comps, trunc):
        assert 1 <= len(c) <= 6 and all(0 <= x < model.config.vocab_size for x in c)
        assert t == (c[-1] != tok.eos_token_id)
        assert c.count(tok.eos_token_id) <= 1


def test_top_p_keeps_the_smallest_nucleus():
    # p = [0.5, 0.3, 0.2]: top_p 0.6 keeps {0, 1} (0.5 < 0.6, 0.8 >= 0.6), never token 2
    logits = torch.tensor([0.5, 0.3, 0.2]).log().expand(2000, 3)
    torch.manual_seed(0)
    drawn, logp = sampler.sample_next(logits, 1.0, 0.6)
    assert set(drawn.tolist()) == {0, 1}
    share = (drawn == 0).float().mean().item()  # 0.5 / 0.8 = 0.625 after renormalising
    assert abs(share - 0.625) < 0.05
    # the log-prob is the tempered one before the nucleus cut: log 0.5 or log 0.3, as pi_old's
    want = torch.tensor([0.5, 0.3, 0.2]).log()[drawn]
    assert torch.allclose(logp, want, atol=1e-6)


def test_engine_is_a_refreshed_bf16_copy_outside_the_policy(tiny, tmp_path):
    model, tok = tiny
    cfg = ampo.Config()
    cfg.train.sampler, cfg.train.bf16 = "loop", True
    keys = set(model.state_dict())
    policy = infra.wrap_model(model.train(), cfg.train)  # puts an autocast forward on the policy
    infra.attach_engine(policy, cfg, str(tmp_path))
    s = policy.fast_sampler
    assert set(policy.state_dict()) == keys  # not a submodule: not saved, not optimised
    assert "forward" not in vars(s)  # runs its own forward, not the policy's wrapper
    assert next(s.parameters()).dtype == torch.bfloat16 and not s.training
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5)
    assert not torch.equal(next(s.parameters()), next(policy.parameters()).bfloat16())
    infra.engine_refresh(policy, cfg)
    for mine, theirs in zip(s.parameters(), policy.parameters()):
        assert torch.equal(mine, theirs.detach().bfloat16())
    # asleep during the update its weights hold no memory; awake they are the new weights
    infra.engine_sleep(policy, cfg)
    assert sum(p.numel() for p in s.parameters()) == 0
    with torch.no_grad():
        for p in policy.parameters():
            p.mul_(0.5)
    infra.engine_refresh(policy, cfg)
    for mine, theirs in zip(s.parameters(), policy.parameters()):
        assert mine.dtype == torch.bfloat16 and torch.equal(mine, theirs.detach().bfloat16())
    tied = s.get_output_embeddings().weight is s.get_input_embeddings().weight
    assert tied == (policy.get_output_embeddings().weight is policy.get_input_embeddings().weight)
    comps, _, _ = ampo.generate(policy, tok, prompts_of(tok), 2, 4)  # dispatches to the loop
    assert len(comps) == 4


def test_loop_with_fsdp_is_refused():
    cfg = ampo.Config()
    cfg.train.sampler, cfg.train.parallelism = "loop", "fsdp"
    with pytest.raises(infra.InputError, match="train.sampler"):
        ampo.check_config(cfg)
