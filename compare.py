"""GRPO vs AMPO vs GHPO: the same start, the same budget, several seeds, one table and plots.

    HF_HUB_OFFLINE=1 python compare.py --config config.yaml --seeds 3 [--out runs/compare]
        [--problems 48] [--section.key=value ...]

For each seed, and each method in turn:

  grpo   ampo.py with ampo.trigger=never (no teachers: plain GRPO with AMPO's loss)
  ampo   ampo.py as configured (teachers replace rollouts in groups that all failed)
  ghpo   ghpo.py as configured, with AMPO's whole train: block (loss, advantages, entropy bonus,
         weight decay included), so that hints are the only difference from grpo

Every run starts from the same model with the same steps, prompts, answers, lengths, learning
rate and seed (so the same prompts in the same order). The base model and every trained model
are then evaluated on the first --problems rows of eval.files with 8 answers each: avg@8 and
pass@k for k = 1, 2, 4, 8, sampled with the same seed, so before and after are paired.

Writes to --out: one folder a run (its metrics.jsonl, samples.jsonl, last checkpoint and
result.json), results.json (every figure, per seed and as mean / std / min / max over seeds),
results.md (the table) and three PNGs: curves.png (training curves, seeds as a shaded band),
passk.png (pass@k before and after) and eval.png (held-out avg@8 per seed).

Resumable: a run whose result.json exists is kept; an unfinished run is started again from
scratch (runs save only their last checkpoint). Rerunning the same command finishes the job.
"""

import argparse
import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import ampo
import ghpo
import infra
import plot

METHODS = ("grpo", "ampo", "ghpo")
PASS_K = [1, 2, 4, 8]


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
        if method == "grpo":
            cfg.ampo.trigger = "never"
    cfg.train.seed = seed
    cfg.log.output_dir = str(folder)
    cfg.log.save_every, cfg.log.keep_last = 0, 1
    cfg.eval.every = 0  # evaluated after training, as the base model is (below)
    cfg.eval.num_samples, cfg.eval.pass_k, cfg.eval.max_problems = 8, PASS_K, problems
    cfg.eval.best_metric = "none"
    return cfg


def evaluate(cfg, model_path: str) -> dict:
    """avg@8 and pass@k of a model on eval.files[0], seeded by train.seed."""
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name_or_path=model_path))
    result = ampo.evaluate_files(cfg)[0]
    keys = ["avg@8"] + [f"pass@{k}" for k in PASS_K]
    return {"problems": result["problems"], **{k: result[k] for k in keys}}


def summarise_run(metrics: list[dict]) -> dict:
    """Training figures of one run from its metrics.jsonl: means over steps and halves."""
    half = len(metrics) // 2

    def mean(key, rows=metrics):
        vals = [m[key] for m in rows if key in m]
        return sum(vals) / len(vals) if vals else None

    out = {"reward": mean("reward"), "accuracy": mean("accuracy"),
           "accuracy_last_half": mean("accuracy", metrics[half:]),
           "entropy": mean("entropy"), "completion_len": mean("completion_len")}
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


def run_one(method, seed, args, overrides, out: Path) -> dict:
    """Train (unless done) and evaluate one method at one seed; result.json makes it resumable."""
    folder = out / f"{method}-seed{seed}"
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    if folder.exists():
        shutil.rmtree(folder)  # an unfinished run: start it again
    cfg = method_config(method, args.config, overrides, seed, folder, args.problems)
    tick = time.perf_counter()
    (ghpo.train if method == "ghpo" else ampo.train)(cfg)
    train_s = time.perf_counter() - tick
    gc.collect()
    ckpt = infra.checkpoint_dirs(folder)[-1]
    tick = time.perf_counter()
    result = {"method": method, "seed": seed, "train_s": round(train_s, 1),
              "eval": evaluate(cfg, str(ckpt)), "eval_s": round(time.perf_counter() - tick, 1),
              "train": summarise_run(plot.read_metrics(str(folder)))}
    infra.write_json_atomically(done, result)
    gc.collect()
    return result


def base_eval(seed, args, overrides, out: Path) -> dict:
    path = out / f"base-seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    cfg = method_config("grpo", args.config, overrides, seed, out / "base", args.problems)
    tick = time.perf_counter()
    result = {"seed": seed, "eval": evaluate(cfg, cfg.model.name_or_path),
              "eval_s": round(time.perf_counter() - tick, 1)}
    infra.write_json_atomically(path, result)
    return result


def summarise(base: list[dict], runs: list[dict]) -> dict:
    """Mean and spread over seeds of every held-out score, its gain over the base model (paired
    by seed), and the training figures."""
    keys = ["avg@8"] + [f"pass@{k}" for k in PASS_K]
    before = {r["seed"]: r["eval"] for r in base}
    out = {"base": {k: spread([b["eval"][k] for b in base]) for k in keys}}
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        s = {k: spread([r["eval"][k] for r in rs]) for k in keys}
        s.update({f"gain {k}": spread([r["eval"][k] - before[r["seed"]][k] for r in rs])
                  for k in keys})
        for k, v in rs[0]["train"].items():
            if isinstance(v, float):
                s[f"train {k}"] = spread([r["train"][k] for r in rs])
            elif isinstance(v, list):
                s[f"train {k}"] = [spread([r["train"][k][i] for r in rs]) for i in range(len(v))]
        s["train_s"] = spread([r["train_s"] for r in rs])
        out[method] = s
    return out


def table(summary: dict) -> str:
    """results.md: method x held-out score, mean ± std over seeds, and the training figures."""
    keys = ["avg@8"] + [f"pass@{k}" for k in PASS_K]
    pct = lambda s: f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}"  # noqa: E731
    lines = ["| method | " + " | ".join(keys) + " | gain avg@8 | entropy | guided (1st → 2nd half) "
             "| rescued per hint stage | train min |",
             "|" + " --- |" * (len(keys) + 6)]
    for method in ("base",) + METHODS:
        s = summary.get(method)
        if s is None:
            continue
        cells = [pct(s[k]) for k in keys]
        if method == "base":
            cells += ["", "", "", "", ""]
        else:
            guided = (f"{100 * s['train guided_first_half']['mean']:.0f}% → "
                      f"{100 * s['train guided_last_half']['mean']:.0f}%"
                      if "train guided_first_half" in s else "")
            rescued = (" / ".join(f"{100 * x['mean']:.0f}%" for x in s["train rescued_per_stage"])
                       if "train rescued_per_stage" in s else "")
            cells += [f"{100 * s['gain avg@8']['mean']:+.1f} ± {100 * s['gain avg@8']['std']:.1f}",
                      f"{s['train entropy']['mean']:.3f} ± {s['train entropy']['std']:.3f}",
                      guided, rescued, f"{s['train_s']['mean'] / 60:.1f}"]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
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
        line, = ax.plot(PASS_K, [sum(v) / len(v) for v in vals], marker="o", label=label)
        ax.fill_between(PASS_K, [min(v) for v in vals], [max(v) for v in vals],
                        color=line.get_color(), alpha=0.2)
        shift = 0.1 * (list(groups).index(label) - 1.5)  # side by side: equal scores stay visible
        bx.plot([r["seed"] + shift for r in rs], [r["eval"]["avg@8"] for r in rs], marker="o",
                linestyle="none", label=label, color=line.get_color())
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="config.yaml")
    ap.add_argument("--seeds", type=int, default=3, help="seeds 1..N")
    ap.add_argument("--out", default="runs/compare")
    ap.add_argument("--problems", type=int, default=48, help="held-out problems evaluated")
    ap.add_argument("--methods", default=",".join(METHODS))
    args, overrides = ap.parse_known_args(argv)
    methods = args.methods.split(",")
    if set(methods) - set(METHODS):
        raise SystemExit(f"error: --methods: each one of {','.join(METHODS)}, got {args.methods}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tick = time.perf_counter()
    base, runs = [], []
    try:
        for seed in range(1, args.seeds + 1):
            base.append(base_eval(seed, args, overrides, out))
            for method in methods:
                runs.append(run_one(method, seed, args, overrides, out))
                print(f"{method} seed {seed}: {runs[-1]['eval']}", flush=True)
    except infra.InputError as e:
        sys.exit(f"error: {e}")
    summary = summarise(base, runs)
    record = {"command": " ".join(["python compare.py"] + (argv or sys.argv[1:])),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
              "wall_s_this_call": round(time.perf_counter() - tick, 1),
              "budget": dataclasses.asdict(method_config("grpo", args.config, overrides, 1, out,
                                                         args.problems).train),
              "summary": summary, "base": base, "runs": runs}
    infra.write_json_atomically(out / "results.json", record)
    (out / "results.md").write_text(table(summary))
    groups = {m: [plot.read_metrics(str(out / f"{m}-seed{r['seed']}")) for r in runs
                  if r["method"] == m] for m in methods}
    plot.plot_groups(groups, str(out / "curves.png"))
    plot_passk(base, runs, str(out / "passk.png"))
    print(table(summary))
    print(f"wrote {out}/results.json, results.md, curves.png, passk.png")
    return record


if __name__ == "__main__":
    main()
