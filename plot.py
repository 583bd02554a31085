"""Draw the training curves of one or more runs to a PNG.

    python plot.py runs/ampo                                   # -> runs/ampo/curves.png
    python plot.py runs/ampo runs/grpo --labels AMPO,GRPO --out curves.png
    python plot.py runs/ampo-seed1 runs/ampo-seed2 --labels AMPO,AMPO   # one label: mean + spread
    python plot.py runs/ampo runs/grpo --labels AMPO,GRPO --mechanism   # zero-std groups, gnorm

Reads each run's metrics.jsonl (one JSON object a step, infra.log_step) and draws one panel per
metric that some run has: training reward, accuracy of the policy's own answers, entropy,
response length, the share of groups guided (AMPO) and the share rescued at each hint stage
(GHPO). With --mechanism it draws instead what explains a comparison: the share of groups whose
rewards are all equal (no advantage, so no gradient), the gradient norm, and the share of
groups that guidance changed. Runs that share a label are seeds of one method: their mean is
the line and their min-max spread the shaded band. Steps are noisy (a few prompts each), so the
bold line is a moving average over --smooth steps and the raw mean is drawn faint behind it.
A method keeps one colour in every plot the project makes (COLORS).
"""

import argparse
import json
import os

PANELS = [("reward", "training reward"), ("accuracy", "accuracy, own answers"),
          ("entropy", "token entropy"), ("completion_len", "response length (tokens)"),
          ("guided_frac", "share of groups guided (AMPO)"),
          ("rescued_frac", "share rescued per hint stage (GHPO)")]
# The picture behind a comparison: GRPO learns nothing from a group whose rewards are all
# equal (TRL's frac_reward_zero_std); guidance exists to turn those groups into gradient.
MECHANISM = [("frac_reward_zero_std", "share of groups with zero reward spread"),
             ("grad_norm", "gradient norm (before clipping)"),
             ("guided_or_rescued", "share guided (AMPO) / rescued by a hint (GHPO)")]
# Figures computed from a step's record rather than read from it.
DERIVED = {"guided_or_rescued": lambda m: (m["guided_frac"] if "guided_frac" in m else
                                           sum(m["rescued_frac"]) if "rescued_frac" in m
                                           else None)}
COLORS = {"base": "tab:gray", "grpo": "tab:blue", "grpo-noent": "tab:purple", "ampo": "tab:orange",
          "ghpo": "tab:green"}


def read_metrics(path: str) -> list[dict]:
    """The steps of a run: `path` is its folder or its metrics.jsonl."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def value(m: dict, key: str, index: int | None = None):
    """One step's figure: a logged key, a DERIVED one, or one entry of a per-stage list."""
    v = DERIVED[key](m) if key in DERIVED else m.get(key)
    return v[index] if index is not None and v is not None else v


def curves(runs: list[list[dict]], key: str, index: int | None = None):
    """(steps, mean, low, high) of `key` over runs, at the steps every run has; `index` picks
    one entry of a per-stage list (rescued_frac).

    >>> a = [{"step": 1, "reward": 0.0}, {"step": 2, "reward": 1.0}]
    >>> b = [{"step": 1, "reward": 1.0}, {"step": 2, "reward": 1.0}, {"step": 3, "reward": 0.5}]
    >>> curves([a, b], "reward")
    ([1, 2], [0.5, 1.0], [0.0, 1.0], [1.0, 1.0])
    """
    per_run = [{m["step"]: value(m, key, index) for m in run if value(m, key) is not None}
               for run in runs]
    steps = sorted(set.intersection(*(set(r) for r in per_run))) if per_run else []
    rows = [[r[s] for r in per_run] for s in steps]
    return (steps, [sum(v) / len(v) for v in rows], [min(v) for v in rows],
            [max(v) for v in rows])


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of each value and the window - 1 before it (fewer at the start): a trailing
    average, so a step's point never uses later steps.

    >>> moving_average([0.0, 1.0, 2.0, 3.0], 2)
    [0.0, 0.5, 1.5, 2.5]
    """
    out = []
    for i in range(len(values)):
        part = values[max(0, i - window + 1):i + 1]
        out.append(sum(part) / len(part))
    return out


def color(label: str):
    """A method's colour (COLORS), or None for matplotlib's next one."""
    return COLORS.get(label.lower())


def plot_groups(groups: dict, out, panels=PANELS, smooth: int = 5) -> list[str]:
    """One PNG of every panel some run has, to `out` (a path, or a file such as report.py's
    BytesIO); groups maps a label to its runs (seeds). Returns the keys drawn."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for rs in groups.values() for run in rs]
    keys = [(k, t) for k, t in panels if any(value(m, k) is not None for run in runs for m in run)]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, (key, title) in zip(axes.flat, keys):
        for label, rs in groups.items():
            rs = [r for r in rs if any(value(m, key) is not None for m in r)]
            if not rs:
                continue
            first = next(value(m, key) for m in rs[0] if value(m, key) is not None)
            stages = len(first) if isinstance(first, list) else 0
            for i in range(stages) if stages else [None]:
                steps, mean, low, high = curves(rs, key, i)
                name = label if i is None else f"{label}, stage {i + 1}"
                style = "-" if i is None else ["-", "--", ":", "-."][i % 4]
                line, = ax.plot(steps, moving_average(mean, smooth), label=name,
                                color=color(label), linestyle=style, linewidth=1.8)
                ax.plot(steps, mean, color=line.get_color(), linestyle=style, linewidth=0.8,
                        alpha=0.3)
                if len(rs) > 1:
                    ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.12)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # whole steps
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [k for k, _ in keys]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="run folders or metrics.jsonl files")
    ap.add_argument("--labels", help="comma-separated, one per run (default: the folder names)")
    ap.add_argument("--out", help="PNG path (default: curves.png in the first run's folder)")
    ap.add_argument("--mechanism", action="store_true",
                    help="zero-spread groups, gradient norm, guided share instead of the curves")
    ap.add_argument("--smooth", type=int, default=5, help="moving-average window, in steps")
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [
        os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(r)))
        for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"error: {len(labels)} labels for {len(args.runs)} runs")
    if args.smooth < 1:
        raise SystemExit(f"error: --smooth must be at least 1, got {args.smooth}")
    groups = {}
    for label, path in zip(labels, args.runs):
        groups.setdefault(label, []).append(read_metrics(path))
    first = args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(args.runs[0])
    name = "mechanism.png" if args.mechanism else "curves.png"
    out = args.out or os.path.join(first, name)
    drawn = plot_groups(groups, out, MECHANISM if args.mechanism else PANELS, args.smooth)
    print(f"{out}: {', '.join(drawn)}")


if __name__ == "__main__":
    main()
