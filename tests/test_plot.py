"""plot.py: metrics.jsonl files -> one PNG, seeds as a mean line and a shaded spread."""

import json

import plot


def write_run(folder, rows):
    folder.mkdir()
    with open(folder / "metrics.jsonl", "w") as f:
        for step, row in enumerate(rows, 1):
            f.write(json.dumps({"step": step, **row}) + "\n")
    return str(folder)


def test_plot_draws_the_panels_the_runs_have(tmp_path, capsys):
    ampo_runs = [write_run(tmp_path / f"ampo-{s}", [
        {"reward": 0.1 * s + 0.1 * i, "accuracy": 0.05 * i, "entropy": 0.7, "completion_len": 60,
         "guided_frac": 1.0 - 0.2 * i} for i in range(4)]) for s in (1, 2)]
    ghpo_run = write_run(tmp_path / "ghpo-1", [
        {"reward": 0.0, "accuracy": 0.0, "entropy": 0.6, "completion_len": 70,
         "rescued_frac": [0.0, 0.5, 0.0]} for _ in range(4)])
    out = tmp_path / "curves.png"
    plot.main([*ampo_runs, ghpo_run, "--labels", "AMPO,AMPO,GHPO", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    printed = capsys.readouterr().out
    for key in ("reward", "accuracy", "entropy", "completion_len", "guided_frac", "rescued_frac"):
        assert key in printed
    # the two AMPO seeds: mean and spread at each step, by hand
    runs = [plot.read_metrics(r) for r in ampo_runs]
    steps, mean, low, high = plot.curves(runs, "reward")
    assert steps == [1, 2, 3, 4]
    assert [round(x, 6) for x in mean] == [0.15, 0.25, 0.35, 0.45]
    assert [round(x, 6) for x in low] == [0.1, 0.2, 0.3, 0.4]
    assert [round(x, 6) for x in high] == [0.2, 0.3, 0.4, 0.5]
    assert plot.curves([plot.read_metrics(ghpo_run)], "rescued_frac", 1)[1] == [0.5] * 4


def test_plot_without_labels_names_runs_by_folder(tmp_path, capsys):
    run = write_run(tmp_path / "grpo", [{"reward": 0.0, "accuracy": 0.0}])
    plot.main([run])
    assert (tmp_path / "grpo" / "curves.png").exists()
    assert "reward, accuracy" in capsys.readouterr().out


def test_mechanism_panels_smoothing_and_one_colour_per_method(tmp_path, capsys, monkeypatch):
    grpo = write_run(tmp_path / "grpo", [{"frac_reward_zero_std": 1.0, "grad_norm": 0.0}] * 3)
    ampo = write_run(tmp_path / "ampo", [{"frac_reward_zero_std": 0.0, "grad_norm": 0.3,
                                          "guided_frac": 1.0}] * 3)
    ghpo = write_run(tmp_path / "ghpo", [{"frac_reward_zero_std": 0.5, "grad_norm": 0.5,
                                          "rescued_frac": [0.0, 0.5, 0.25]}] * 3)
    import matplotlib.axes
    colours = {}
    real_plot = matplotlib.axes.Axes.plot

    def spy(self, *args, label=None, color=None, **kw):
        if label:
            colours.setdefault(label, set()).add(color)
        return real_plot(self, *args, label=label, color=color, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    out = tmp_path / "mechanism.png"
    plot.main([grpo, ampo, ghpo, "--labels", "GRPO,AMPO,GHPO", "--mechanism", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "frac_reward_zero_std, grad_norm, guided_or_rescued" in capsys.readouterr().out
    # the same colour for a method in every panel, and the project's colour for each
    assert colours == {"GRPO": {"tab:blue"}, "AMPO": {"tab:orange"}, "GHPO": {"tab:green"}}
    # GHPO's share rescued by some hint stage is the sum over stages
    runs = [plot.read_metrics(ghpo)]
    assert plot.curves(runs, "guided_or_rescued")[1] == [0.75] * 3
    assert plot.curves([plot.read_metrics(grpo)], "guided_or_rescued")[0] == []  # no guidance
    assert plot.moving_average([1.0, 0.0, 1.0, 0.0], 3) == [1.0, 0.5, 2 / 3, 1 / 3]
