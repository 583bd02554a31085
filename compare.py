"""GRPO vs AMPO vs GHPO: the same start, the same budget, several seeds, tables and plots.

    HF_HUB_OFFLINE=1 python compare.py --config config.yaml --seeds 3 [--regime mixed|hard]
        [--out runs/compare] [--problems 48] [--commit] [--report-only] [--section.key=value ...]

For each seed, and each method in turn:

  grpo        ampo.py with ampo.trigger=never (no teachers: plain GRPO with AMPO's loss)
  grpo-noent  grpo with train.entropy_coeff=0: the control that tells "guidance prevents a
              collapse" (GRPO's only gradient on unsolved groups is the entropy bonus) from
              "guidance teaches"
  ampo        ampo.py as configured (teachers replace rollouts in groups that all failed)
  ghpo        ghpo.py as configured, with AMPO's whole train: block (loss, advantages, entropy
              bonus, weight decay included), so that hints are the only difference from grpo

Every run starts from the same model with the same steps, prompts, answers, lengths, learning
rate and seed (so the same prompts in the same order). The base model and every trained model
are then evaluated on the first --problems rows of eval.files with 8 answers each: avg@8 and
pass@k for k = 1, 2, 4, 8, sampled with the same seed, so before and after are paired. Every
figure is also given per problem type (a row's data_source) and for two groups of the bundled
types: those the start model solves often and those it almost never solves (HARD_TYPES).

Two regimes (REGIMES), one switch: `mixed` trains and evaluates on the bundled mix as
configured; `hard` trains only on the types the start model almost never solves and evaluates
on their held-out rows, where GRPO's groups are nearly all unsolved: the papers' regime.

Writes to --out: one folder a run (its metrics.jsonl, samples.jsonl, last checkpoint and
result.json), results.json (every figure, per seed and as mean / std / min / max over seeds),
results.md (the tables), three PNGs: curves.png (training curves, seeds as a shaded band),
mechanism.png (groups with no reward spread, gradient norm, share guided or rescued, per step)
and passk.png (pass@k before and after, avg@8 per seed), and report.html, one page of it all
with a few groups of every method side by side (report.py).

Resumable: a run whose result.json exists is kept if it was made with the same resolved config
as this command would use; if not, the command stops and names the keys that differ (or, with
--rerun-stale, trains it again). An unfinished run is started again from scratch (runs save
only their last checkpoint). Rerunning the same command finishes the job.

Across working sessions (the hard regime is hours of CPU): with --commit, each finished run's
weights are deleted once it is evaluated and its small outputs (result.json, metrics.jsonl,
samples.jsonl; base-seedN.json for the start model) are committed to git at once, so a later
session's same command continues where the last stopped. --report-only trains nothing: it
rebuilds the tables and plots from the finished runs there are (the seeds that are complete).
"""

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import ampo
import ghpo
import infra
import plot
import report

sys.path.insert(0, str(Path(__file__).resolve().parent / "data"))
from make_data import HARD_TYPES, MIX  # noqa: E402  (the bundled types, data/README.md)

METHODS = ("grpo", "grpo-noent", "ampo", "ghpo")
BASELINES = ("grpo", "grpo-noent")  # every other method's gains are also paired against these
PASS_K = [1, 2, 4, 8]
KEYS = ["avg@8"] + [f"pass@{k}" for k in PASS_K]
# The bundled problem types in two groups, by how often the start model solves them
# (data/make_data.py: measured with data/measure.py on training rows, data/README.md).
TYPE_GROUPS = {"easy types": [g.__name__ for g, _ in MIX if g.__name__ not in HARD_TYPES],
               "hard types": list(HARD_TYPES)}
# A regime is a set of overrides applied before the command line's (which still win), its
# number of evaluated problems, its methods and its output folder. The hard budget: a step there
# costs GRPO ~39 s, AMPO ~33 s and GHPO ~70 s on a 2-core CPU (its three hint stages resample
# nearly every group), an evaluation ~2.5 s a problem. At 8 steps no method moved past the
# start model (docs/compare-hard-8steps); a 32-step probe lifted AMPO by ~7-11 points, so 32 is
# the budget: a seed (4 runs, 5 evaluations of 48 problems) is ~1.8 h and 5 seeds ~9 h, run over
# several sessions with --commit (64 steps would be ~18 h; docs/results.md has the choice).
REGIMES = {
    "mixed": {"overrides": [], "problems": 48, "methods": ("grpo", "ampo", "ghpo"),
              "out": "runs/compare"},
    "hard": {"overrides": ["--data.train_file=data/train_hard.jsonl",
                           "--eval.files=[data/test_hard.jsonl]",
                           "--train.max_steps=32"],
             "problems": 48, "methods": METHODS, "out": "docs/compare-hard"},
}


def method_config(method: str, config: str, overrides: list[str], seed: int, folder: Path,
                  problems: int):
    """The config of one run: the file and overrides, then what the comparison fixes."""
    base = infra.load_config(config, overrides, ampo.Config, ("ghpo",))
    if method == "ghpo":
        cfg = infra.load_config(config, overrides, ghpo.Config, ("ampo",))
        # The official GHPO loss differs from AMPO's (group_mean, std-scaled advantages, no
        # entropy bonus or weight decay); here every train key is AMPO's, as grpo's is.
        cfg.train = dataclasses.replace(base.train)
    else:
        cfg = base
        if method.startswith("grpo"):
            cfg.ampo.trigger = "never"
        if method == "grpo-noent":
            cfg.train.entropy_coeff = 0.0
    cfg.train.seed = seed
    cfg.log.output_dir = str(folder)
    cfg.log.save_every, cfg.log.keep_last = 0, 1
    cfg.eval.every = 0  # evaluated after training, as the base model is (below)
    cfg.eval.num_samples, cfg.eval.pass_k, cfg.eval.max_problems = 8, PASS_K, problems
    cfg.eval.best_metric = "none"
    return cfg


def evaluate(cfg, model_path: str) -> dict:
    """avg@8 and pass@k of a model on eval.files[0], seeded by train.seed: over the problems
    and per problem type (the rows' data_source)."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=model_path))
    result = infra.evaluate_files(cfg, ampo.check_config, ampo.evaluate)[0]
    return {"problems": result["problems"], **{k: result[k] for k in KEYS},
            "by_type": {s: {k: b[k] for k in ["problems"] + KEYS}
                        for s, b in result["by_source"].items()}}


def type_groups(by_type: dict) -> dict:
    """Each TYPE_GROUPS group's scores, pooled over its problems (a mean over problems, as the
    file's own figure is); groups with no problem in the file are left out.

    >>> r = type_groups({"add1": {"problems": 3, "avg@8": 0.5}, "chain": {"problems": 1,
    ...                  "avg@8": 0.0}, "sub": {"problems": 3, "avg@8": 0.2}})
    >>> r["easy types"], {k: round(v, 4) for k, v in r["hard types"].items()}
    ({'problems': 3, 'avg@8': 0.5}, {'problems': 4, 'avg@8': 0.15})
    """
    out = {}
    for name, types in TYPE_GROUPS.items():
        parts = [by_type[t] for t in types if t in by_type]
        n = sum(p["problems"] for p in parts)
        if n:
            keys = [k for k in parts[0] if k != "problems"]
            out[name] = {"problems": n, **{k: sum(p[k] * p["problems"] for p in parts) / n
                                           for k in keys}}
    return out


def summarise_run(metrics: list[dict]) -> dict:
    """Training figures of one run from its metrics.jsonl: means over steps and halves."""
    half = len(metrics) // 2

    def mean(key, rows=metrics):
        vals = [plot.value(m, key) for m in rows if plot.value(m, key) is not None]
        return sum(vals) / len(vals) if vals else None

    out = {"reward": mean("reward"), "accuracy": mean("accuracy"),
           "accuracy_last_half": mean("accuracy", metrics[half:]),
           "entropy": mean("entropy"), "completion_len": mean("completion_len"),
           # the mechanism: groups that give no gradient, the gradient, guidance's share
           "frac_reward_zero_std": mean("frac_reward_zero_std"), "grad_norm": mean("grad_norm")}
    if any("guided_frac" in m or "rescued_frac" in m for m in metrics):
        out["guided_or_rescued"] = mean("guided_or_rescued")
    if any("guided_frac" in m for m in metrics):
        out["guided_first_half"] = mean("guided_frac", metrics[:half])
        out["guided_last_half"] = mean("guided_frac", metrics[half:])
    if any("hard_frac" in m for m in metrics):
        # Of the groups that entered hint stage i (still hard), the share it rescued. A stage
        # that never ran (no hard group left) adds nothing.
        stages = max(len(m["rescued_frac"]) for m in metrics)
        tried = [sum(m["hard_frac"][i] for m in metrics if len(m["rescued_frac"]) > i)
                 for i in range(stages)]
        rescued = [sum(m["rescued_frac"][i] for m in metrics if len(m["rescued_frac"]) > i)
                   for i in range(stages)]
        out["rescued_per_stage"] = [r / t if t else 0.0 for r, t in zip(rescued, tried)]
        out["hard_first_half"] = mean("hard_frac0", [dict(m, hard_frac0=m["hard_frac"][0])
                                                     for m in metrics[:half]])
        out["hard_last_half"] = mean("hard_frac0", [dict(m, hard_frac0=m["hard_frac"][0])
                                                    for m in metrics[half:]])
    return out


def spread(values: list[float]) -> dict:
    """mean, sample std (0 for one seed), min and max of one figure over seeds.

    >>> spread([0.1, 0.3])
    {'mean': 0.2, 'std': 0.1414, 'min': 0.1, 'max': 0.3, 'n': 2}
    """
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(statistics.fmean(values), 4), "std": round(std, 4),
            "min": min(values), "max": max(values), "n": len(values)}


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts (a resolved config each).

    >>> config_diff({"train": {"lr": 1, "seed": 2}, "log": {}}, {"train": {"lr": 3, "seed": 2}})
    ['log', 'train.lr']
    """
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += config_diff(x, y, f"{prefix}{k}.")
        elif x != y or (k in a) != (k in b):
            out.append(prefix + k)
    return out


# Keys that change no result: a tracker (results made before log.report_to existed lack it),
# train.shared_prompt (the same log-probs and gradients, computed with fewer FLOPs; equal to
# float rounding, tests/test_shared_prompt.py) and model.gradient_checkpointing (the same
# numbers recomputed instead of kept: memory, not results).
NO_RESULT_KEYS = {"log.report_to", "train.shared_prompt", "model.gradient_checkpointing"}


def reuse(path: Path, cfg, rerun_stale: bool) -> dict | None:
    """A finished result made with this very config, or None (run it). A result made with
    another config stops the comparison, naming the keys, unless rerun_stale."""
    if not path.exists():
        return None
    done = json.loads(path.read_text())
    diff = config_diff(done.get("config", {}), json.loads(json.dumps(dataclasses.asdict(cfg))))
    diff = [k for k in diff if k not in NO_RESULT_KEYS]
    if not diff:
        return done
    if rerun_stale:
        return None
    raise infra.InputError(f"{path} was made with another config ({', '.join(diff)} differ); "
                           "use another --out, or --rerun-stale to run it again")


def commit(paths: list[Path], message: str) -> bool:
    """git-commit exactly these files (nothing else staged goes in), so a later session finds
    them; False, with a warning, where git refuses (the run's files stay on disk)."""
    names = [str(p) for p in paths if p.exists()]
    for attempt in range(5):
        git = subprocess.run(["git", "add", "-f", "--", *names], capture_output=True, text=True)
        if not git.returncode and not subprocess.run(  # staged nothing new: already committed
                ["git", "diff", "--cached", "--quiet", "--", *names]).returncode:
            return True
        if not git.returncode:
            git = subprocess.run(["git", "commit", "-q", "-m", message, "--", *names],
                                 capture_output=True, text=True)
            if not git.returncode:
                return True
        if "index.lock" not in git.stderr:  # only another git command's lock is worth a wait
            break
        time.sleep(2 ** attempt)
    print(f"warning: could not commit {', '.join(names)} ({git.stderr.strip()}): commit them "
          "by hand", file=sys.stderr)
    return False


def run_one(method, seed, args, overrides, out: Path) -> dict | None:
    """Train (unless done) and evaluate one method at one seed; result.json makes it resumable.
    With --report-only, the finished result or None; with --commit, the weights are deleted
    once evaluated and the run's small outputs committed."""
    folder = out / f"{method}-seed{seed}"
    cfg = method_config(method, args.config, overrides, seed, folder, args.problems)
    done = reuse(folder / "result.json", cfg, args.rerun_stale)
    if done or args.report_only:
        return done
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished or stale run: start it again
    tick = time.perf_counter()
    (ghpo.train if method == "ghpo" else ampo.train)(cfg)
    train_s = time.perf_counter() - tick
    gc.collect()
    ckpt = infra.checkpoint_dirs(folder)[-1]
    tick = time.perf_counter()
    result = {"method": method, "seed": seed, "machine": cpu_name(), "train_s": round(train_s, 1),
              "eval": evaluate(cfg, str(ckpt)), "eval_s": round(time.perf_counter() - tick, 1),
              "train": summarise_run(plot.read_metrics(str(folder))),
              "config": dataclasses.asdict(cfg)}
    infra.write_json_atomically(folder / "result.json", result)
    gc.collect()
    if args.commit:
        for c in infra.checkpoint_dirs(folder):
            shutil.rmtree(c)  # evaluated: the result no longer needs the weights
        commit([folder / n for n in ("result.json", "metrics.jsonl", "samples.jsonl")],
               f"{out}: {method} seed {seed} (avg@8 {result['eval']['avg@8']:.3f})")
    return result


def base_eval(seed, args, overrides, out: Path) -> dict | None:
    path = out / f"base-seed{seed}.json"
    cfg = method_config("grpo", args.config, overrides, seed, out / "base", args.problems)
    done = reuse(path, cfg, args.rerun_stale)
    if done or args.report_only:
        return done
    tick = time.perf_counter()
    result = {"seed": seed, "eval": evaluate(cfg, cfg.model.name_or_path),
              "eval_s": round(time.perf_counter() - tick, 1), "config": dataclasses.asdict(cfg)}
    infra.write_json_atomically(path, result)
    if args.commit:
        commit([path], f"{out}: the start model, seed {seed}")
    return result


def held_out(ev: dict) -> dict:
    """Every held-out figure of one evaluation, flat: over the problems, per type group and
    per type ("hard types avg@8", "type add3 pass@8")."""
    out = {k: ev[k] for k in KEYS}
    for name, g in type_groups(ev["by_type"]).items():
        out.update({f"{name} {k}": g[k] for k in KEYS})
    for t, b in sorted(ev["by_type"].items()):
        out.update({f"type {t} {k}": b[k] for k in KEYS})
    return out


def paired(values: list[float]) -> dict:
    """A gain paired by seed: its spread, and on how many seeds it is above and below 0.

    >>> paired([0.1, -0.05, 0.2])["above"], paired([0.1, -0.05, 0.2])["below"]
    (2, 1)
    """
    return {**spread(values), "above": sum(v > 0 for v in values),
            "below": sum(v < 0 for v in values)}


def summarise(base: list[dict], runs: list[dict]) -> dict:
    """Mean and spread over seeds of every held-out score, its gain over the base model and
    over each of BASELINES (all paired by seed), and the training figures."""
    before = {b["seed"]: held_out(b["eval"]) for b in base}
    out = {"base": {k: spread([v[k] for v in before.values()]) for k in before[base[0]["seed"]]}}
    baselines = {m: {r["seed"]: held_out(r["eval"]) for r in runs if r["method"] == m}
                 for m in BASELINES}
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        after = {r["seed"]: held_out(r["eval"]) for r in rs}
        names = list(after[rs[0]["seed"]])
        s = {k: spread([a[k] for a in after.values()]) for k in names}
        s.update({f"gain {k}": paired([a[k] - before[seed][k] for seed, a in after.items()])
                  for k in names})
        for b, scores in baselines.items():
            if method != b and scores and set(after) <= set(scores):
                s.update({f"vs {b} {k}": paired([a[k] - scores[seed][k]
                                                 for seed, a in after.items()]) for k in names})
        for k, v in rs[0]["train"].items():
            if isinstance(v, float):
                s[f"train {k}"] = spread([r["train"][k] for r in rs])
            elif isinstance(v, list):
                s[f"train {k}"] = [spread([r["train"][k][i] for r in rs]) for i in range(len(v))]
        s["train_s"] = spread([r["train_s"] for r in rs])
        out[method] = s
    return out


def pct(s: dict, sign: str = "") -> str:
    """'39.3 ± 5.0' from a spread of a share."""
    return f"{100 * s['mean']:{sign}.1f} ± {100 * s['std']:.1f}"


def gain_cell(s: dict) -> str:
    """'+2.2 ± 1.4 (3/3)' from a paired gain: mean ± std, then on how many seeds it is above 0;
    a '~' marks a gain within its spread (|mean| <= std)."""
    mark = "~" if abs(s["mean"]) <= s["std"] else ""
    return f"{mark}{pct(s, '+')} ({s['above']}/{s['n']})"


def table(summary: dict) -> str:
    """results.md: held-out scores (mean ± std, range over seeds), gains paired by seed, the
    mechanism, avg@8 per type group and per type, and the paired gains there."""
    rows = [m for m in ("base",) + METHODS if m in summary]
    rng = lambda s: f"{pct(s)} ({100 * s['min']:.1f}–{100 * s['max']:.1f})"  # noqa: E731
    lines = ["| method | " + " | ".join(KEYS) + " |", "|" + " --- |" * (len(KEYS) + 1)]
    lines += [f"| {m} | " + " | ".join(rng(summary[m][k]) for k in KEYS) + " |" for m in rows]
    cell = lambda s, k: gain_cell(s[k]) if k in s else ""  # noqa: E731
    share = lambda s, k: pct(s[k]) if k in s else ""  # noqa: E731
    num = lambda s, k, d: f"{s[k]['mean']:.{d}f} ± {s[k]['std']:.{d}f}" if k in s else ""  # noqa
    vs = [f"vs {b} {k}" for b in BASELINES if b in summary for k in ("avg@8", "pass@8")]
    lines += ["", "| method | gain avg@8 | gain pass@8 | " + " | ".join(vs) + " | "
              "zero-spread groups | grad norm | entropy | guided / rescued | train min |",
              "|" + " --- |" * (9 + len(vs))]
    for m in rows[1:]:
        s = summary[m]
        lines.append(f"| {m} | {cell(s, 'gain avg@8')} | {cell(s, 'gain pass@8')} | "
                     + "".join(f"{cell(s, k)} | " for k in vs)
                     + f"{share(s, 'train frac_reward_zero_std')} | "
                     f"{num(s, 'train grad_norm', 3)} | {num(s, 'train entropy', 2)} | "
                     f"{share(s, 'train guided_or_rescued')} | "
                     f"{s['train_s']['mean'] / 60:.1f} |")
    groups = [g for g in TYPE_GROUPS if f"{g} avg@8" in summary["base"]]
    types = sorted(k.split()[1] for k in summary["base"] if k.startswith("type ")
                   and k.endswith(" avg@8"))
    cols = [f"{g} avg@8" for g in groups] + [f"type {t} avg@8" for t in types]
    head = " | ".join(c.removeprefix("type ").removesuffix(" avg@8") for c in cols)
    lines += ["", f"| method | {head} |", "|" + " --- |" * (len(cols) + 1)]
    lines += [f"| {m} | " + " | ".join(pct(summary[m][c]) for c in cols) + " |" for m in rows]
    pairs = [(m, b) for m in rows[1:] for b in BASELINES if f"vs {b} avg@8" in summary[m]]
    if pairs:
        lines += ["", f"| avg@8 gain, paired | {head} |", "|" + " --- |" * (len(cols) + 1)]
        lines += [f"| {m} vs {b} | " + " | ".join(gain_cell(summary[m][f"vs {b} {c}"])
                                                 for c in cols) + " |" for m, b in pairs]
    lines += ["", "Gains are paired by seed, mean ± std over seeds, then (n/N) the seeds on "
              "which the gain is above 0; ~ marks a gain within its spread (|mean| <= std)."]
    return "\n".join(lines) + "\n"


def plot_passk(base: list[dict], runs: list[dict], out: str):
    """pass@k against k: the base model and each method after training, mean and seed range."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.6))
    groups = {"base": base, **{m: [r for r in runs if r["method"] == m] for m in METHODS}}
    for label, rs in groups.items():
        if not rs:
            continue
        vals = [[r["eval"][f"pass@{k}"] for r in rs] for k in PASS_K]
        ax.plot(PASS_K, [sum(v) / len(v) for v in vals], marker="o", label=label,
                color=plot.COLORS[label])
        ax.fill_between(PASS_K, [min(v) for v in vals], [max(v) for v in vals],
                        color=plot.COLORS[label], alpha=0.2)
        # side by side: equal scores stay visible
        shift = 0.08 * (list(groups).index(label) - (len(groups) - 1) / 2)
        bx.plot([r["seed"] + shift for r in rs], [r["eval"]["avg@8"] for r in rs], marker="o",
                linestyle="none", label=label, color=plot.COLORS[label])
    ax.set(xscale="log", xlabel="k", title="held-out pass@k")
    ax.set_xticks(PASS_K, [str(k) for k in PASS_K])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    seeds = sorted({r["seed"] for r in base})
    bx.set_xticks(seeds, [str(s) for s in seeds])
    bx.set(xlabel="seed", title="held-out avg@8 per seed")
    for a in (ax, bx):
        a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def cpu_name() -> str:
    """The CPU model, as lscpu names it (timings and bf16 kernels differ between machines)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.processor() or platform.machine()}, " \
           f"{os.cpu_count()} CPUs"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 1..N")
    ap.add_argument("--regime", default="mixed", choices=sorted(REGIMES))
    ap.add_argument("--out", default=None, help="default: the regime's (runs/compare for mixed, "
                                                "docs/compare-hard for hard)")
    ap.add_argument("--problems", type=int, default=None,
                    help="held-out problems evaluated (default: the regime's)")
    ap.add_argument("--methods", default=None, help="comma-separated (default: the regime's)")
    ap.add_argument("--rerun-stale", action="store_true",
                    help="train again a finished run whose config differs (default: stop)")
    ap.add_argument("--commit", action="store_true",
                    help="delete each run's weights once evaluated and git-commit its small "
                         "outputs, then the tables and plots")
    ap.add_argument("--report-only", action="store_true",
                    help="train nothing: tables and plots of the seeds whose runs are all done")
    args, overrides = ap.parse_known_args(argv)
    regime = REGIMES[args.regime]
    methods = args.methods.split(",") if args.methods else list(regime["methods"])
    if set(methods) - set(METHODS):
        raise SystemExit(f"error: --methods: each one of {','.join(METHODS)}, got {args.methods}")
    overrides = regime["overrides"] + overrides  # the command line's come last and win
    args.problems = args.problems or regime["problems"]
    out = Path(args.out or regime["out"])
    out.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    base, runs = [], []
    try:
        for seed in range(1, args.seeds + 1):
            b = base_eval(seed, args, overrides, out)
            rs = [b and run_one(method, seed, args, overrides, out) for method in methods]
            if b is None or None in rs:  # --report-only: a seed counts once all its runs are done
                print(f"seed {seed}: {sum(r is not None for r in rs)} of {len(rs)} runs and "
                      f"{'the' if b else 'no'} start model done: left out", flush=True)
                continue
            base.append(b)
            runs += rs
            for r in rs:
                print(f"{r['method']} seed {seed}: " + ", ".join(
                    f"{k} {r['eval'][k]:.3f}" for k in KEYS), flush=True)
    except infra.InputError as e:
        sys.exit(f"error: {e}")
    if not base:
        sys.exit(f"error: {out}: no seed has all its runs done yet")
    summary = summarise(base, runs)
    record = {"command": " ".join(["python compare.py"] + (argv or sys.argv[1:])),
              "regime": args.regime, "overrides": overrides, "methods": methods,
              "seeds": [b["seed"] for b in base], "machine": f"{cpu_name()}, {platform.platform()}",
              "wall_s_this_call": round(time.perf_counter() - tick, 1),
              "budget": dataclasses.asdict(method_config("grpo", args.config, overrides, 1, out,
                                                         args.problems).train),
              "type_groups": TYPE_GROUPS, "summary": summary, "base": base,
              "runs": [{k: v for k, v in r.items() if k != "config"} for r in runs]}
    infra.write_json_atomically(out / "results.json", record)
    (out / "results.md").write_text(table(summary))
    groups = {m: [plot.read_metrics(str(out / f"{m}-seed{r['seed']}")) for r in runs
                  if r["method"] == m] for m in methods}
    plot.plot_groups(groups, str(out / "curves.png"))
    plot.plot_groups(groups, str(out / "mechanism.png"), plot.MECHANISM)
    plot_passk(base, runs, str(out / "passk.png"))
    (out / "report.html").write_text(report.compare_page(out))
    print(table(summary))
    names = ["results.json", "results.md", "curves.png", "mechanism.png", "passk.png",
             "report.html"]
    print(f"wrote {out}/" + ", ".join(names))
    if args.commit:
        commit([out / n for n in names], f"{out}: tables and plots, seeds "
                                         f"{','.join(str(b['seed']) for b in base)}")
    return record


if __name__ == "__main__":
    main()
