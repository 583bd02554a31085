"""Build a teacher pool for AMPO from your own problems: sample each teacher, keep what verifies.

    python data/build_pool.py --input problems.jsonl --output pool.jsonl \
        --teacher qwen7b=Qwen/Qwen2.5-7B-Instruct --teacher r1=/models/DeepSeek-R1-Distill-Qwen-7B \
        --samples 4 --keep 1 [--engine hf|vllm] [--max-new-tokens 8192] [--temperature 0.6]

AMPO's teachers are offline: their solutions are generated once, before training, and stored
next to each problem (infra.py section 2). The official pool was built this way from four 7-8B
reasoning models, keeping only correct solutions. This script does the same for any file that
ampo.py can read (simple schema, official AMPO or GHPO parquet): for every problem and teacher
it samples `--samples` answers, checks them with verify.py (the training verifier, so the pool
holds exactly what the trainer would score as correct), keeps up to `--keep` correct ones, and
writes the simple schema: {"problem", "answer", "solution"?, "teachers": [{"source",
"response"}]}. Teachers a row already had are kept first. The output is written to a temporary
file and renamed into place, so an interrupted run never leaves half a pool.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ampo  # noqa: E402
import infra  # noqa: E402
import verify  # noqa: E402

# =============================================================================================
# The pool: sample, verify, keep (pure: a teacher is any function rows, n -> n texts per row)
# =============================================================================================


def build_pool(rows: list[dict], teachers: list, samples: int, keep: int, workers: int = 2,
               timeout: float = 5.0) -> tuple[list[dict], dict]:
    """Rows (infra.normalise_row's dicts) with up to `keep` verified answers of each teacher.

    teachers: [(name, sample_fn)], sample_fn(rows, n) -> one list of n texts per row.
    Returns (rows in the simple schema, stats): per teacher the answers generated and kept,
    and how many rows ended with no teacher at all (AMPO cannot guide those).
    """
    out = [{"problem": r["problem"], "answer": r["answer"],
            **({"solution": r["solution"]} if r.get("solution") else {}),
            "teachers": [{"source": s, "response": t} for s, t in r["teachers"]]} for r in rows]
    stats = {"teachers": {}}
    for name, sample in teachers:
        answers = sample(rows, samples)  # [len(rows)][samples]
        flat = [(i, text) for i, texts in enumerate(answers) for text in texts]
        # One batch through the verifier's process pool; a timeout counts as wrong.
        correct = verify.verify_batch([text for _, text in flat],
                                      [rows[i]["answer"] for i, _ in flat],
                                      workers=workers, timeout=timeout)
        taken = Counter()
        for (i, text), ok in zip(flat, correct):
            if ok and taken[i] < keep:
                out[i]["teachers"].append({"source": name, "response": text})
                taken[i] += 1
        stats["teachers"][name] = {"generated": len(flat), "correct": sum(correct),
                                   "kept": sum(taken.values())}
    stats["rows"] = len(out)
    stats["rows_without_teacher"] = sum(not r["teachers"] for r in out)
    return out, stats


def write_jsonl(path: str, rows: list[dict]):
    """One JSON object a line, written to path.tmp and renamed into place."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# =============================================================================================
# Teachers: a model sampled with HF generate (any machine) or vLLM (GPU, much faster)
# =============================================================================================


def hf_sampler(model_path: str, max_new_tokens: int, temperature: float, template: str,
               batch_size: int = 8):
    """sample_fn of a model, with the trainer's own prompt building and HF generate. The model is
    loaded when the pool asks for its answers, so only one teacher is in memory at a time."""

    def sample(rows: list[dict], n: int) -> list[list[str]]:
        model, tokenizer = infra.load_model(ampo.ModelConfig(name_or_path=model_path))
        texts = []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            prompts = [infra.build_prompt(tokenizer, r, template, None) for r in chunk]
            completions, _, _ = ampo.generate(model, tokenizer, prompts, n, max_new_tokens,
                                           temperature)
            texts += tokenizer.batch_decode(completions, skip_special_tokens=True)
        return [texts[i * n:(i + 1) * n] for i in range(len(rows))]

    return sample


def vllm_sampler(model_path: str, max_new_tokens: int, temperature: float, template: str):
    """sample_fn of a model served by vLLM in this process (GPU only)."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise ImportError("--engine vllm: vLLM is not installed; pip install -r "
                          "requirements-vllm.txt on a GPU machine, or use --engine hf") from e
    from transformers import AutoTokenizer

    def sample(rows: list[dict], n: int) -> list[list[str]]:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        llm = LLM(model=model_path)
        prompts = [infra.build_prompt(tokenizer, r, template, None) for r in rows]
        params = SamplingParams(n=n, temperature=temperature, max_tokens=max_new_tokens)
        return [[o.text for o in out.outputs] for out in llm.generate(prompts, params)]

    return sample


# =============================================================================================
# Command line
# =============================================================================================


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="problems: .jsonl or .parquet, any schema "
                                                  "ampo.py reads (problem and answer needed)")
    p.add_argument("--output", required=True, help="the pool, simple-schema .jsonl")
    p.add_argument("--teacher", action="append", required=True, metavar="NAME=MODEL",
                   help="a teacher's name and its local folder or hub id (repeatable)")
    p.add_argument("--samples", type=int, default=4, help="answers sampled per problem")
    p.add_argument("--keep", type=int, default=1, help="correct answers kept per teacher")
    p.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    p.add_argument("--max-new-tokens", type=int, default=8192)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--template", default=ampo.DataConfig.prompt_template,
                   help="user message from {problem} (rows with a chat prompt keep theirs)")
    p.add_argument("--workers", type=int, default=2, help="verifier processes")
    args = p.parse_args(argv)
    try:
        names = [t.split("=", 1) for t in args.teacher]
        bad = [t for t, n in zip(args.teacher, names) if len(n) != 2 or not all(n)]
        if bad:
            raise ValueError(f"--teacher {bad[0]!r}: expected NAME=MODEL")
        if not os.path.exists(args.input):
            raise FileNotFoundError(f"data file not found: {args.input}")
        rows = [infra.normalise_row(rec, f"{args.input} row {i}")
                for i, rec in enumerate(infra.read_records(args.input))]
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    make = hf_sampler if args.engine == "hf" else vllm_sampler
    teachers = [(name, make(path, args.max_new_tokens, args.temperature, args.template))
                for name, path in names]
    pool, stats = build_pool(rows, teachers, args.samples, args.keep, args.workers)
    write_jsonl(args.output, pool)
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
