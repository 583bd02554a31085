"""Experiment trackers for a run: `log.report_to` (TRL's knob, TRL's values).

    python ampo.py --config config.yaml --log.report_to=tensorboard
    python ghpo.py --config config.yaml --log.report_to=[tensorboard,trackio]
    tensorboard --logdir runs/ampo/tensorboard        # or: trackio show --project ampo-ghpo

`none` (the default) writes metrics.jsonl alone; `tensorboard`, `wandb` and `trackio` each get
every figure of metrics.jsonl as well, step by step. A small flat module rather than a section
of infra.py: infra.py calls it in three places (start_run opens the trackers, log_step logs a
step, end_run closes them), and a reader who never asks for a tracker never needs to read it.

Names. Where TRL's GRPOTrainer logs the same figure, it goes under TRL's name, as transformers
writes it to a tracker (`train/` in front: `train/reward`, `train/clip_ratio/region_mean`, ...,
TRL_NAMES); AMPO's and GHPO's own figures under `ampo/` and `ghpo/`; every other figure under
`train/` with our own name. Nested dicts (the seconds per phase, the teachers picked) and
per-stage lists (GHPO's hard_frac) are flattened with `/`: `train/time/generate`,
`ampo/teachers_picked/teacher-terse`, `ghpo/rescued_frac/0` (the first hint stage). An
evaluation goes under `eval/<data source>/<score>` and `eval/mean/<score>` (the mean over
sources, the official avg_score). NaN (a figure with nothing to measure this step, such as the
comprehension of a step that guided nothing) is left out. The run's resolved config is logged
when the run starts (TensorBoard: a text summary `config`; wandb and trackio: the run config).

Offline by default: TensorBoard writes event files to <output_dir>/tensorboard, trackio to its
local SQLite store (~/.cache/huggingface/trackio, or TRACKIO_DIR), wandb in offline mode to
<output_dir>/wandb unless WANDB_MODE or WANDB_API_KEY says otherwise (then `wandb sync` is not
needed). The project is WANDB_PROJECT / TRACKIO_PROJECT, else `ampo-ghpo`.

Resume. A run's tracker id (run_id, kept in <output_dir>/trackers.json) names the
wandb run and the trackio run, so `--resume` continues the same run instead of starting a
second one; TensorBoard continues in the same folder and hides the steps the interrupted run
logged after its checkpoint (purge_step), as metrics.jsonl drops them.

Each tracker is an optional dependency with its own requirements file
(requirements-<tracker>.txt), imported only when a run asks for it; a missing one is a config
error that names the pip command.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import uuid
from pathlib import Path

TRACKERS = ("none", "tensorboard", "wandb", "trackio")
PROJECT = "ampo-ghpo"
# Our key -> TRL GRPOTrainer's (trl/trainer/grpo_trainer.py: self._metrics[mode][...], and
# transformers' Trainer for loss, grad_norm and learning_rate), with the "train/" that
# transformers' rewrite_logs puts in front. clip_frac is TRL's region clip: A < 0 below 1 - eps,
# A > 0 above 1 + eps_high, over the policy's own tokens.
TRL_NAMES = {"reward": "reward", "frac_reward_zero_std": "frac_reward_zero_std",
             "entropy": "entropy", "clip_frac": "clip_ratio/region_mean", "kl": "kl",
             "completion_len": "completions/mean_length",
             "truncated_frac": "completions/clipped_ratio", "loss": "loss",
             "grad_norm": "grad_norm", "lr": "learning_rate",
             # the sampler's mismatch (ampo.py section 8): TRL's sampling/ figures
             "sampling_logp_diff_mean": "sampling/sampling_logp_difference/mean",
             "sampling_logp_diff_max": "sampling/sampling_logp_difference/max",
             "is_ratio_mean": "sampling/importance_sampling_ratio/mean",
             "is_ratio_min": "sampling/importance_sampling_ratio/min",
             "is_ratio_max": "sampling/importance_sampling_ratio/max"}
METHOD_KEYS = {"ampo": ("guided_frac", "teachers_picked", "comprehension_mean",
                        "comprehension_picked", "teacher_token_p"),
               "ghpo": ("hard_frac", "rescued_frac", "hint_hist", "hinted_frac",
                        "accuracy_hinted", "hint_has_answer")}
# The package each tracker imports (requirements-<tracker>.txt installs it).
MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
# The id the trackers know a run by (the wandb run id, the trackio run name), kept in the run
# folder so that --resume continues that run rather than starting a second one.
RUN_ID = "trackers.json"


def install_hint(name: str) -> str:
    return f"pip install -r requirements-{name}.txt"


class TrackerError(ValueError):
    """A bad log.report_to, a tracker not installed, a bad trackers.json: infra.py turns it
    into its InputError (one line naming the key or file). This module imports nothing of
    infra.py, which imports it."""


def check_names(names: list, key: str = "log.report_to"):
    """An error naming the key unless every name is a tracker of TRACKERS ("none" alone)."""
    for name in names:
        if name not in TRACKERS:
            raise TrackerError(f"config key {key}: one of {'|'.join(TRACKERS)}, got {name!r}")
    if "none" in names and len(names) > 1:
        raise TrackerError(f"config key {key}: 'none' with other trackers, got {names!r}")


def flat(prefix: str, value) -> dict:
    """Scalars of a number, a dict or a list, flattened with "/"; NaN and text left out.

    >>> flat("ampo/teachers_picked", {"terse": 2, "stepwise": 1})
    {'ampo/teachers_picked/terse': 2.0, 'ampo/teachers_picked/stepwise': 1.0}
    >>> flat("ghpo/rescued_frac", [0.0, 0.5]), flat("ampo/comprehension_mean", float("nan"))
    ({'ghpo/rescued_frac/0': 0.0, 'ghpo/rescued_frac/1': 0.5}, {})
    """
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in flat(f"{prefix}/{key}", item).items()}
    if isinstance(value, list):
        return {k: v for i, item in enumerate(value) for k, v in flat(f"{prefix}/{i}", item).items()}
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return {prefix: float(value)}
    return {}


def scalars(m: dict, source_scores: dict | None = None) -> dict:
    """A step's metrics (one line of metrics.jsonl) under the trackers' names.
    source_scores: {data source: {score: value}}, the step's evaluation per source.

    >>> scalars({"step": 3, "reward": 0.25, "clip_frac": 0.0, "guided_frac": 1.0,
    ...          "time": {"generate": 5.5}, "hard_frac": [1.0, 0.5], "eval_mean": {"avg@4": 0.1}},
    ...         {"add3": {"avg@4": 0.2}})  # doctest: +NORMALIZE_WHITESPACE
    {'train/reward': 0.25, 'train/clip_ratio/region_mean': 0.0, 'ampo/guided_frac': 1.0,
     'train/time/generate': 5.5, 'ghpo/hard_frac/0': 1.0, 'ghpo/hard_frac/1': 0.5,
     'eval/mean/avg@4': 0.1, 'eval/add3/avg@4': 0.2}
    """
    out = {}
    for key, value in m.items():
        if key in ("step", "eval"):  # the step is the x axis; eval comes per source below
            continue
        method = next((p for p, keys in METHOD_KEYS.items() if key in keys), None)
        name = (f"{method}/{key}" if method else "eval/mean" if key == "eval_mean"
                else f"train/{TRL_NAMES.get(key, key)}")
        out.update(flat(name, value))
    for source, scores in (source_scores or {}).items():
        out.update(flat(f"eval/{source}", scores))
    return out


def require(name: str):
    """Import a tracker's package, or stop with the pip command that installs it."""
    try:
        return importlib.import_module(MODULES[name])
    except ImportError:
        raise TrackerError(f"config key log.report_to: {name} is not installed; "
                         f"{install_hint(name)}") from None


def run_id(out_dir: Path, resume: bool) -> str:
    """On --resume the id in out_dir/trackers.json (when the run had trackers before), else a
    new one, saved there: the folder's name and 8 random hex digits (os.urandom: the run's
    seeded generators are not touched)."""
    path = out_dir / RUN_ID
    if resume and path.exists():
        try:
            return str(json.loads(path.read_text())["id"])
        except (OSError, ValueError, KeyError, TypeError):
            raise TrackerError(f"{path}: not the tracker id file a run writes ({{\"id\": ...}}); "
                             f"delete it to start new tracker runs") from None
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in out_dir.resolve().name)
    new = f"{name}-{uuid.uuid4().hex[:8]}"
    tmp = path.with_name(path.name + ".tmp")  # written whole, then renamed: never half a file
    tmp.write_text(json.dumps({"id": new}))
    os.replace(tmp, path)
    return new


def start(names: list, out_dir: Path, resume: bool, config: dict, first_step: int) -> list:
    """Open every tracker of `names` for this run (rank 0 only) and log the config once.
    Returns [(name, handle)]. first_step > 1 on --resume: the steps from there on are the
    resumed run's."""
    names = [n for n in names if n != "none"]
    if not names:
        return []
    for name in names:  # every package first: a missing one stops the run before it writes
        require(name)
    opened, run = [], run_id(out_dir, resume)
    for name in names:
        if name == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=first_step)
            writer.add_text("config", config_text(config), first_step)
            opened.append((name, writer))
        elif name == "wandb":
            import wandb

            offline = not (os.environ.get("WANDB_MODE") or os.environ.get("WANDB_API_KEY"))
            opened.append((name, wandb.init(
                project=os.environ.get("WANDB_PROJECT", PROJECT), id=run, name=run,
                resume="allow", dir=str(out_dir), config=config,
                mode="offline" if offline else None)))
        elif name == "trackio":
            import trackio

            # resume "allow": the same name continues the run; without the config again
            # trackio would store an empty one. No CPU/GPU sampling thread: figures only.
            opened.append((name, trackio.init(
                project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=run, config=config,
                resume="allow", embed=False, auto_log_cpu=False, auto_log_gpu=False)))
    return opened


def config_text(config: dict) -> str:
    """The resolved config as YAML in a Markdown code block (TensorBoard renders Markdown)."""
    import yaml

    return "```\n" + yaml.safe_dump(config, sort_keys=False) + "```"


def log(opened: list, step: int, values: dict):
    """One step's scalars to every open tracker. TensorBoard is flushed every step so that a
    run killed mid-way keeps what it logged (its writer would otherwise wait up to 2 min)."""
    for name, handle in opened:
        if name == "tensorboard":
            for key, value in values.items():
                handle.add_scalar(key, value, step)
            handle.flush()
        else:  # wandb and trackio: the same call
            handle.log(values, step=step)


def finish(opened: list):
    """Close every tracker once (end_run, and atexit after an error); the list is emptied."""
    while opened:
        name, handle = opened.pop()
        if name == "tensorboard":
            handle.close()
        else:
            handle.finish()
