"""Draw the training curves of one or more runs to a PNG.

    python plot.py runs/ampo                                   # -> runs/ampo/curves.png
    python plot.py runs/ampo runs/grpo --labels AMPO,GRPO --out curves.png
    python plot.py runs/ampo-seed1 runs/ampo-seed2 --labels AMPO,AMPO   # one label: mean + spread

Reads each run's metrics.jsonl (one JSON object a step, infra.log_step) and draws one panel per
metric that some run has: training reward, accuracy of the policy's own answers, entropy,
response length, the share of groups guided (AMPO) and the share rescued at each hint stage
(GHPO). Runs that share a label are seeds of one method: their mean is the line and their
min-max spread the shaded band.
"""

import argparse
import json
import os

PANELS = [("reward", "training reward"), ("accuracy", "accuracy, own answers"),
          ("entropy", "token entropy"), ("completion_len", "response length (tokens)"),
          ("guided_frac", "share of groups guided (AMPO)"),
          ("rescued_frac", "share rescued per hint stage (GHPO)")]


def read_metrics(path: str) -> list[dict]:
    """The steps of a run: `path` is its folder or its metrics.jsonl."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def curves(runs: list[list[dict]], key: str, index: int | None = None):
    """(steps, mean, low, high) of `key` over runs, at the steps every run has; `index` picks
    one entry of a per-stage list (rescued_frac).

    >>> a = [{"step": 1, "reward": 0.0}, {"step": 2, "reward": 1.0}]
    >>> b = [{"step": 1, "reward": 1.0}, {"step": 2, "reward": 1.0}, {"step": 3, "reward": 0.5}]
    >>> curves([a, b], "reward")
    ([1, 2], [0.5, 1.0], [0.0, 1.0], [1.0, 1.0])
    """
    def value(m):
        v = m[key]
        return v[index] if index is not None else v

    per_run = [{m["step"]: value(m) for m in run if key in m} for run in runs]
    steps = sorted(set.intersection(*(set(r) for r in per_run))) if per_run else []
    rows = [[r[s] for r in per_run] for s in steps]
    return (steps, [sum(v) / len(v) for v in rows], [min(v) for v in rows],
            [max(v) for v in rows])


def plot_groups(groups: dict, out: str) -> list[str]:
    """One PNG of every panel some run has; groups maps a label to its runs (seeds).
    Returns the keys drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [run for rs in groups.values() for run in rs]
    keys = [(k, t) for k, t in PANELS if any(k in m for run in runs for m in run)]
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, (key, title) in zip(axes.flat, keys):
        for label, rs in groups.items():
            rs = [r for r in rs if any(key in m for m in r)]
            if not rs:
                continue
            stages = len(next(m[key] for m in rs[0] if key in m)) if key == "rescued_frac" else 0
            for i in range(stages) if stages else [None]:
                steps, mean, low, high = curves(rs, key, i)
                name = label if i is None else f"{label}, stage {i + 1}"
                line, = ax.plot(steps, mean, label=name)
                if len(rs) > 1:
                    ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
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
    args = ap.parse_args(argv)
    labels = args.labels.split(",") if args.labels else [
        os.path.basename(os.path.normpath(r if os.path.isdir(r) else os.path.dirname(r)))
        for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit(f"error: {len(labels)} labels for {len(args.runs)} runs")
    groups = {}
    for label, path in zip(labels, args.runs):
        groups.setdefault(label, []).append(read_metrics(path))
    first = args.runs[0] if os.path.isdir(args.runs[0]) else os.path.dirname(args.runs[0])
    out = args.out or os.path.join(first, "curves.png")
    drawn = plot_groups(groups, out)
    print(f"{out}: {', '.join(drawn)}")


if __name__ == "__main__":
    main()
