"""The whole training step: ampo.py (as GRPO) vs TRL's GRPOTrainer, doing the same work.

    pip install -r bench/requirements.txt                 # TRL, for this benchmark only
    HF_HUB_OFFLINE=1 python bench/step_vs_trl.py          # 5 steps a run, one run of each side
    python bench/step_vs_trl.py --tiny                    # the smoke test: 2 steps, 16 tokens

Both sides train the embedded SmolLM2-135M-Instruct on the bundled problems with config.yaml's
prompt (the same chat template), 2 prompts x G = 8 answers a step, up to 96 new tokens,
temperature 0.7, learning rate 1e-5, one optimizer update a step, no KL term (beta 0), the
Dr. GRPO loss, HF generation, and the same reward function (verify.reward_batch, the same
worker processes). Each side runs in its own process; the sides alternate. Per step, ours is
metrics.jsonl's time.step, TRL's is the time between on_step_begin and on_step_end (its
generation and reward happen inside the step). The first step of every run is a warm-up and is
left out. Ours runs three times: with the embedded defaults (train.bf16, the decode loop, each
prompt read once per group: train.shared_prompt), the same with the padded batch (every answer
reads its own prompt copy, as TRL's does), and with float32 and plain HF generate, TRL's settings.

What still differs: answers are sampled, so each side generates a different number of tokens
(reported: seconds per 1,000 completion tokens too); TRL computes log-probs of the old policy
only when it needs them, as ours does; ours runs AMPO's entropy bonus (1e-4), TRL has none.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))


def run_trl(args):
    """One TRL run in this process; writes per-step seconds and completion tokens as JSON."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import ampo
    import infra
    import verify

    cfg = infra.load_config(os.path.join(ROOT, "config.yaml"), [], ampo.Config, ("ghpo",))
    path = args.model or infra.model_path(cfg.model.name_or_path)
    rows, _ = infra.load_dataset(os.path.join(ROOT, cfg.data.train_file), 0, workers=0)
    data = Dataset.from_list([{"prompt": infra.chat_messages(r, cfg.data.prompt_template,
                                                             cfg.data.system_prompt,
                                                             cfg.data.example),
                               "answer": r["answer"]} for r in rows])
    tokens = []
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = tok.pad_token or tok.eos_token

    def reward(completions, answer, completion_ids=None, **kwargs):
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        tokens.append(sum(len(c) for c in completion_ids) if completion_ids else
                      sum(len(tok(t, add_special_tokens=False).input_ids) + 1 for t in texts))
        return verify.reward_batch(texts, list(answer), workers=2)[0]

    times, tick = [], [0.0]

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            tick[0] = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - tick[0])

    torch.manual_seed(0)
    out = tempfile.mkdtemp()
    config = GRPOConfig(output_dir=out, max_steps=args.steps, per_device_train_batch_size=16,
                        num_generations=8, max_completion_length=args.tokens, temperature=0.7,
                        learning_rate=1e-5, beta=0.0, loss_type="dr_grpo",
                        num_iterations=1, gradient_accumulation_steps=1, use_cpu=True,
                        bf16=False, logging_steps=1, save_strategy="no", report_to=[],
                        shuffle_dataset=True, seed=0, disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    with open(args.result, "w") as f:
        json.dump({"step_s": times, "completion_tokens": tokens}, f)


def run_ours(args, extra: list[str]) -> dict:
    out = tempfile.mkdtemp()
    cmd = [sys.executable, os.path.join(ROOT, "ampo.py"), "--config",
           os.path.join(ROOT, "config.yaml"), "--ampo.trigger=never",
           f"--train.max_steps={args.steps}", f"--train.max_completion_length={args.tokens}",
           f"--log.output_dir={out}", "--log.sample_every=0", "--train.loss_type=dr_grpo"]
    if args.model:
        cmd.append(f"--model.name_or_path={args.model}")
    subprocess.run(cmd + extra, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return {"step_s": [x["time"]["step"] for x in lines],
            "completion_tokens": [x["completion_tokens"] for x in lines]}


def main():
    import common

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--model", default=None, help="a model folder (default: config.yaml's)")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "step_vs_trl.json"))
    ap.add_argument("--trl-side", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tiny:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        from conftest import make_tiny_model

        args.steps, args.tokens = 2, 16
        args.model = args.model or make_tiny_model(tempfile.mkdtemp())
    if args.trl_side:
        return run_trl(args)
    sides = {"TRL GRPOTrainer (float32, HF generate)": None,
             "ours (defaults: bf16, decode loop, shared prompt)": [],
             "ours (defaults, padded batch: train.shared_prompt false)":
                 ["--train.shared_prompt=false"],
             "ours (float32, HF generate)": ["--train.bf16=false", "--train.sampler=generate"]}
    runs = {s: [] for s in sides}
    for _ in range(args.repeats):
        for side, extra in sides.items():
            if extra is None:
                result = os.path.join(tempfile.mkdtemp(), "trl.json")
                subprocess.run([sys.executable, os.path.abspath(__file__), "--trl-side",
                                "--result", result, f"--steps={args.steps}",
                                f"--tokens={args.tokens}"]
                               + ([f"--model={args.model}"] if args.model else []), check=True)
                runs[side].append(json.load(open(result)))
            else:
                runs[side].append(run_ours(args, extra))
    rows, trl_s = [], None
    for side, rs in runs.items():
        steps = [s for r in rs for s in r["step_s"][1:]]  # the first step is a warm-up
        toks = [t for r in rs for t in r["completion_tokens"][1:]]
        per_step = sum(steps) / len(steps)
        trl_s = trl_s or per_step
        rows.append({"side": side, "s_per_step": per_step, "steps_timed": len(steps),
                     "completion_tokens_per_step": sum(toks) / max(len(toks), 1),
                     "s_per_1k_tokens": 1e3 * sum(steps) / max(sum(toks), 1),
                     "ratio_to_trl": per_step / trl_s})
    import trl

    common.report("step_vs_trl", rows, args.out,
                  extra={"trl": trl.__version__, "steps": args.steps, "repeats": args.repeats,
                         "max_completion_length": args.tokens})


if __name__ == "__main__":
    main()
