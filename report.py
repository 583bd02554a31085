"""One self-contained HTML page of a run: its curves, and what guidance did to its groups.

    python report.py runs/ampo                         # -> runs/ampo/report.html
    python report.py runs/ghpo --steps 5,10 --out page.html
    python report.py --compare runs/compare-hard       # a comparison's page (compare.py writes it)

Open the file in any browser: no server, no JavaScript, the PNG curves inlined as base64 (drawn
by plot.py, the same figures as `python plot.py`). A run's page has the training curves, then,
for each chosen step (default: the steps samples.jsonl holds, at most MAX_STEPS of them spread
over the run), each group that samples.jsonl kept (infra.group_samples: a few a step): the
problem, its G answers with their reward, right or wrong, and advantage; for AMPO the wrong
answers that teachers replaced, by which teacher, and every candidate teacher's comprehension
score; for GHPO each hint stage that ran, its hint, and how many answers were right after it.

A comparison's page (compare.py's folder) has the results tables, its three plots, and a few
groups of the first seed at the last step every method logged, the methods side by side: the
same prompts (the same seed draws the same prompts), so one sees what each method trained on.

A samples.jsonl written before the page existed holds each group's first answer only; its
groups show that one answer (and no advantage or guidance record).
"""

import argparse
import base64
import html
import io
import json
from pathlib import Path

import plot

MAX_STEPS = 6  # steps shown by default: a page stays readable for a long run
COMPARE_GROUPS = 2  # groups a method shows side by side on a comparison's page
CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1400px; }
h1 { font-size: 1.4em; } h2 { border-bottom: 2px solid #ccc; margin-top: 1.6em; }
.group { border: 1px solid #bbb; border-radius: 6px; padding: 0.6em; margin: 0.8em 0; }
.problem { font-weight: bold; }
table { border-collapse: collapse; margin: 0.4em 0; }
table.answers { width: 100%; } table.answers td:last-child { width: 65%; }
table.answers td:not(:last-child) { white-space: nowrap; }
td, th { border: 1px solid #ccc; padding: 2px 6px; vertical-align: top; font-size: 0.9em; }
th { background: #eee; }
tr.right td.mark { background: #c8f0c8; } tr.wrong td.mark { background: #f6c6c6; }
tr.teacher td { background: #fde7c4; } tr.picked td { font-weight: bold; }
pre { white-space: pre-wrap; margin: 0; max-height: 9em; overflow: auto; font-size: 0.85em; }
.note { color: #666; font-size: 0.9em; }
.side { display: grid; gap: 0.8em; }
.side table.answers td:not(:last-child) { white-space: normal; }
.side pre { overflow-wrap: anywhere; }
img { max-width: 100%; }
"""


def read_samples(folder: Path) -> dict:
    """{step: [group records]} of a run's samples.jsonl ({} without one)."""
    path = Path(folder) / "samples.jsonl"
    steps = {}
    if path.exists():
        with open(path) as f:
            for line in f:
                if line.strip():
                    rec = json.loads(line)
                    steps.setdefault(rec["step"], []).append(rec)
    return steps


def pick_steps(steps: list[int], cap: int = MAX_STEPS) -> list[int]:
    """All the steps if there are at most `cap`, else `cap` of them spread evenly, the first
    and the last included.

    >>> pick_steps([5, 10, 15]), pick_steps(list(range(1, 11)), 4)
    ([5, 10, 15], [1, 4, 7, 10])
    """
    if len(steps) <= cap:
        return list(steps)
    return [steps[round(i * (len(steps) - 1) / (cap - 1))] for i in range(cap)]


def method_of(metrics: list[dict]) -> str:
    """AMPO (it logs guided_frac), GHPO (hard_frac) or GRPO (neither: ampo.trigger never)."""
    keys = {k for m in metrics for k in m}
    return "AMPO" if "guided_frac" in keys else "GHPO" if "hard_frac" in keys else "GRPO"


def png_src(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def curves_png(groups: dict, panels=plot.PANELS) -> bytes | None:
    """plot.py's figure of `groups` (label -> runs' metrics) as PNG bytes; None if no step."""
    if not any(run for runs in groups.values() for run in runs):
        return None
    buf = io.BytesIO()
    plot.plot_groups(groups, buf, panels)
    return buf.getvalue()


def answers_of(rec: dict) -> list[dict]:
    """A record's answers; an older record (no "answers") gives its first answer alone."""
    if "answers" in rec:
        return rec["answers"]
    return [{"text": rec["completion"], "reward": rec["reward"], "source": rec["source"]}]


def is_off_policy(source: str) -> bool:
    """An answer the policy did not sample: a teacher's (AMPO) or any put_answer source; GHPO's
    hint-<ratio> answers are the policy's own, sampled from a hinted prompt."""
    return source != "policy" and not source.startswith("hint-")


def answer_rows(answers: list[dict]) -> str:
    """The answers table: slot, who wrote it, reward, right/wrong, advantage, text."""
    rows = ["<tr><th>#</th><th>answer by</th><th>reward</th><th>verdict</th>"
            "<th>advantage</th><th>answer</th></tr>"]
    for n, a in enumerate(answers):
        right = a.get("correct", a["reward"] > 0.5)  # older files: no flag, R > 0.5 is solved
        if is_off_policy(a["source"]):
            kind, verdict, by = "teacher", "replaced a wrong answer", f"teacher {a['source']}"
        else:
            kind, verdict = ("right", "&#10003; right") if right else ("wrong", "&#10007; wrong")
            by = "policy" if a["source"] == "policy" else f"policy ({a['source']})"
        adv = f"{a['advantage']:+.3f}" if "advantage" in a else ""
        rows.append(f'<tr class="{kind}"><td>{n}</td><td>{html.escape(by)}</td>'
                    f'<td>{a["reward"]:.2f}</td><td class="mark">{verdict}</td>'
                    f'<td class="num">{adv}</td>'
                    f'<td><pre>{html.escape(a["text"])}</pre></td></tr>')
    return '<table class="answers">' + "".join(rows) + "</table>"


def guidance_html(rec: dict, answers: list[dict], method: str) -> str:
    """What guidance did to the group: AMPO's candidates and their comprehension scores (the
    picked ones bold, with the slots they took); GHPO's hint stages."""
    g, G = rec.get("guidance"), len(answers)
    if "answers" not in rec:
        return ('<p class="note">An older samples.jsonl: the first answer of the group only, '
                'no guidance record.</p>')
    if g is None:
        return {"AMPO": '<p class="note">Not guided: some answer was right.</p>',
                "GHPO": '<p class="note">No hint: some answer to the plain prompt was right.'
                        '</p>'}.get(method, "")
    if "candidates" in g:
        slots = {}
        for n, a in enumerate(answers):
            if is_off_policy(a["source"]):
                slots.setdefault(a["source"], []).append(str(n))
        rows = ["<tr><th>candidate teacher</th><th>comprehension score</th>"
                "<th>replaced slots</th></tr>"]
        for source, score in g["candidates"]:
            took = slots.pop(source, [])  # a teacher named twice: its slots go to the first
            rows.append(f'<tr class="{"picked" if took else ""}"><td>{html.escape(source)}</td>'
                        f'<td>{"—" if score is None else f"{score:.3f}"}</td>'
                        f'<td>{", ".join(took)}</td></tr>')
        k = sum(is_off_policy(a["source"]) for a in answers)
        return (f"<p>Guided (ampo.trigger): {k} wrong answers were replaced by teachers, the "
                f"best by comprehension (the student's probability of the gold answer after "
                f"reading the teacher; —: not scored):</p><table>" + "".join(rows) + "</table>")
    rows = ["<tr><th>stage</th><th>hint ratio</th><th>right answers</th><th>hint</th></tr>"]
    for n, s in enumerate(g["stages"], 1):
        rows.append(f'<tr><td>{n}</td><td>{s["ratio"]:g}</td><td>{s["correct"]} of {G}'
                    f'{" (rescued)" if s["correct"] else ""}</td>'
                    f'<td><pre>{html.escape(s["hint"])}</pre></td></tr>')
    return ("<p>Hard: no answer to the plain prompt was right, so the whole group was sampled "
            "again from the prompt plus a hint, stage after stage until some answer was right "
            "(the answers below are the last stage's):</p><table>" + "".join(rows) + "</table>")


def group_html(rec: dict, method: str) -> str:
    """One group: its problem, what guidance did, its answers."""
    answers = answers_of(rec)
    return (f'<div class="group"><p class="problem">{html.escape(rec["problem"])}</p>'
            f"{guidance_html(rec, answers, method)}{answer_rows(answers)}</div>")


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}'
            f"</title><style>{CSS}</style></head><body>{body}</body></html>\n")


def run_page(folder, steps: list[int] | None = None) -> str:
    """The HTML of one run's page (see the top)."""
    folder = Path(folder)
    metrics = plot.read_metrics(str(folder))
    method, samples = method_of(metrics), read_samples(folder)
    shown = steps if steps is not None else pick_steps(sorted(samples))
    missing = [s for s in shown if s not in samples]
    if missing:
        raise SystemExit(f"error: --steps: {folder}/samples.jsonl has no step "
                         f"{', '.join(map(str, missing))} (it has {sorted(samples)})")
    png = curves_png({method: [metrics]})
    body = [f"<h1>{html.escape(str(folder))}: {method}, {len(metrics)} steps</h1>",
            '<p class="note">Training curves (plot.py: bold a moving average, faint the raw '
            'steps), then the groups samples.jsonl kept at each shown step. Steps: '
            + " ".join(f'<a href="#step-{s}">{s}</a>' for s in shown) + "</p>"]
    if png:
        body.append(f'<h2>Curves</h2><img alt="training curves" src="{png_src(png)}">')
    for s in shown:
        body.append(f'<h2 id="step-{s}">Step {s}</h2>')
        body += [group_html(rec, method) for rec in samples[s]]
    return page(f"{folder.name}: {method}", "\n".join(body))


def markdown_tables(text: str) -> str:
    """compare.py's results.md (pipe tables, blank lines between) as HTML tables.

    >>> markdown_tables("| a | b |\\n| --- | --- |\\n| 1 | 2 |\\n")
    '<table><tr><th>a</th><th>b</th></tr><tr><td>1</td><td>2</td></tr></table>'
    """
    tables = []
    for block in text.strip().split("\n\n"):
        lines = [line.strip().strip("|").split("|") for line in block.splitlines()]
        head, rows = lines[0], lines[2:]  # lines[1] is the --- row
        cells = lambda row, tag: "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>"  # noqa: E731
                                         for c in row)
        tables.append("<table><tr>" + cells(head, "th") + "</tr>"
                      + "".join("<tr>" + cells(r, "td") + "</tr>" for r in rows) + "</table>")
    return "\n".join(tables)


def side_by_side(out: Path, methods: list[str], seed: int) -> str:
    """A few groups of each method's run at one seed, side by side: the last step that every
    method's samples.jsonl holds, the groups matched by problem (the same seed draws the same
    prompts, in the same order)."""
    samples = {m: read_samples(out / f"{m}-seed{seed}") for m in methods}
    common = set.intersection(*(set(s) for s in samples.values())) if samples else set()
    if not common:
        return '<p class="note">No step in every method\'s samples.jsonl.</p>'
    step = max(common)
    first = samples[methods[0]][step][:COMPARE_GROUPS]
    cols = f"repeat({len(methods)}, minmax(0, 1fr))"  # equal columns, however long a text
    body = [f"<h2>The same groups, each method (seed {seed}, step {step})</h2>"]
    for rec in first:
        cells = []
        for m in methods:
            same = [r for r in samples[m][step] if r["problem"] == rec["problem"]]
            cells.append(f"<div><h3>{m.upper()}</h3>" + (group_html(same[0], m.upper()) if same
                         else '<p class="note">not among this run\'s logged groups</p>')
                         + "</div>")
        body.append(f'<div class="side" style="grid-template-columns: {cols}">'
                    + "".join(cells) + "</div>")
    return "\n".join(body)


def compare_page(out) -> str:
    """The HTML of a comparison's page: compare.py's folder (results.json, results.md, its
    PNGs and one folder a run)."""
    out = Path(out)
    record = json.loads((out / "results.json").read_text())
    methods = list(dict.fromkeys(r["method"] for r in record["runs"]))  # in the order they ran
    seed = min(r["seed"] for r in record["runs"])
    body = [f"<h1>{html.escape(str(out))}: {', '.join(m.upper() for m in methods)}</h1>",
            f'<p class="note">{html.escape(record["command"])} ({record["regime"]} regime, '
            f"{len({r['seed'] for r in record['runs']})} seeds)</p>",
            "<h2>Results</h2>", markdown_tables((out / "results.md").read_text())]
    for name, title in [("curves.png", "Training curves"), ("mechanism.png", "Mechanism"),
                        ("passk.png", "Held-out pass@k")]:
        if (out / name).exists():
            body.append(f'<h2>{title}</h2><img alt="{name}" '
                        f'src="{png_src((out / name).read_bytes())}">')
    body.append(side_by_side(out, methods, seed))
    return page(f"{out.name}: comparison", "\n".join(body))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", help="a run's folder (or compare.py's, with --compare)")
    ap.add_argument("--steps", help="comma-separated steps to show (default: up to "
                                    f"{MAX_STEPS} of samples.jsonl's)")
    ap.add_argument("--compare", action="store_true", help="the folder is compare.py's --out")
    ap.add_argument("--out", help="HTML path (default: report.html in the folder)")
    args = ap.parse_args(argv)
    folder = Path(args.folder)
    for need in ("results.json",) if args.compare else ("metrics.jsonl",):
        if not (folder / need).exists():
            raise SystemExit(f"error: {folder}: no {need} (is it "
                             f"{'compare.py' if args.compare else 'a run'}'s folder?)")
    try:
        steps = [int(s) for s in args.steps.split(",")] if args.steps else None
    except ValueError:
        raise SystemExit(f"error: --steps: comma-separated step numbers, got {args.steps!r}")
    text = compare_page(folder) if args.compare else run_page(folder, steps)
    out = Path(args.out) if args.out else folder / "report.html"
    out.write_text(text)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
