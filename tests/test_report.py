"""report.py: the page of a run, checked as a person reads it. Tiny AMPO and GHPO runs write
real samples.jsonl files; their pages must hold every logged group's answers, verdicts and
advantages, AMPO's teachers and comprehension scores, GHPO's hints; a page rendered by headless
Chromium must show them (the DOM it built) and not be blank (its screenshot). An older
samples.jsonl (the first answer of each group alone) still gives a page.

Chromium is no Python package: its test installs Debian's `chromium` when it is missing (as
root, with apt-get) and is skipped, saying why, when that is not possible.
"""

import base64
import html
import json
import os
import shutil
import subprocess

import pytest

import ampo
import ghpo
import report
from test_ampo import tiny_config
from test_ghpo import tiny_ghpo_config


@pytest.fixture(scope="module")
def ampo_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ampo")
    cfg = tiny_config(tiny_model_dir, tmp, max_completion_length=16)  # samples every step
    ampo.train(cfg)
    return tmp / "run"


@pytest.fixture(scope="module")
def ghpo_run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ghpo")
    ghpo.train(tiny_ghpo_config(tiny_model_dir, tmp))
    return tmp / "run"


def groups(run):
    return [json.loads(line) for line in open(run / "samples.jsonl")]


def test_samples_hold_whole_groups_with_advantages_and_teacher_scores(ampo_run):
    recs = groups(ampo_run)
    assert [(r["step"], r["group"]) for r in recs] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for r in recs:
        assert len(r["answers"]) == 4 and r["completion"] == r["answers"][0]["text"]
        # the tiny model is always wrong: 2 of 4 slots are teachers', A = 1 - 0.5 and 0 - 0.5
        teachers = [a for a in r["answers"] if a["source"] != "policy"]
        assert sorted(a["source"] for a in teachers) == ["long", "short"]
        assert all(a["reward"] == 1.0 and a["advantage"] == 0.5 for a in teachers)
        assert all(a["advantage"] == -0.5 for a in r["answers"] if a["source"] == "policy")
        # every candidate that survived loading (the wrong teacher did not), with its score
        cands = r["guidance"]["candidates"]
        assert [c[0] for c in cands] == ["short", "long"] and all(0 < c[1] < 1 for c in cands)


def test_the_run_page_shows_every_group_its_teachers_and_scores(ampo_run):
    out = report.main([str(ampo_run)])
    page = open(out, newline="").read()  # the answers' own "\r" kept
    assert out == ampo_run / "report.html" and "AMPO, 2 steps" in page
    for r in groups(ampo_run):
        assert html.escape(r["problem"]) in page
        for a in r["answers"]:
            assert f"<pre>{html.escape(a['text'])}</pre>" in page
        for source, score in r["guidance"]["candidates"]:
            assert f"<td>{source}</td><td>{score:.3f}</td>" in page
    assert page.count("teacher short</td>") == 4 and page.count("&#10007; wrong") == 8
    assert page.count("<td class=\"num\">+0.500</td>") == 8
    (img,) = [p.split('"')[0] for p in page.split('src="data:image/png;base64,')[1:]]
    assert base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n"  # plot.py's curves, inlined
    assert "<script" not in page  # nothing to run: a file any browser opens


def test_the_ghpo_page_shows_each_hint_stage(ghpo_run):
    page = report.main([str(ghpo_run), "--steps", "2", "--out", str(ghpo_run / "p.html")]).read_text()
    recs = [r for r in groups(ghpo_run) if r["step"] == 2]
    assert "<h2 id=\"step-1\">" not in page and len(recs) == 2
    for r in recs:
        stages = r["guidance"]["stages"]
        assert [s["ratio"] for s in stages] == [0.25, 0.5, 0.75]  # never rescued: all three
        for n, s in enumerate(stages, 1):
            assert (f"<tr><td>{n}</td><td>{s['ratio']:g}</td><td>{s['correct']} of 4</td>"
                    f"<td><pre>{html.escape(s['hint'])}</pre></td></tr>") in page
        assert all(a["source"] == "hint-0.75" for a in r["answers"])
    assert page.count("policy (hint-0.75)") == 8


def test_an_older_samples_file_gives_one_answer_a_group(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 5, "reward": 0.25, "accuracy": 0.0,
                                                   "guided_frac": 1.0}) + "\n")
    (run / "samples.jsonl").write_text(json.dumps({
        "step": 5, "problem": "Compute 798 + 26.", "source": "policy",
        "completion": "The result is <still> 798.", "reward": 0.0}) + "\n")
    page = report.main([str(run)]).read_text()
    assert "Compute 798 + 26." in page and "The result is &lt;still&gt; 798." in page
    assert "An older samples.jsonl" in page and "&#10007; wrong" in page


def test_bad_steps_and_folders_are_errors_that_name_them(ampo_run, tmp_path):
    with pytest.raises(SystemExit, match=r"--steps: .*samples.jsonl has no step 7 \(it has "
                                         r"\[1, 2\]\)"):
        report.main([str(ampo_run), "--steps", "1,7"])
    with pytest.raises(SystemExit, match=r"--steps: comma-separated step numbers, got 'x'"):
        report.main([str(ampo_run), "--steps", "x"])
    with pytest.raises(SystemExit, match=r"no metrics.jsonl \(is it a run's folder\?\)"):
        report.main([str(tmp_path)])
    with pytest.raises(SystemExit, match=r"no results.json \(is it compare.py's folder\?\)"):
        report.main([str(ampo_run), "--compare"])


@pytest.fixture(scope="module")
def chromium():
    """The path of a Chromium binary, apt-installed when missing (as root)."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("no chromium, and no apt-get as root to install it (Debian: apt-get "
                    "install -y chromium)")
    done = subprocess.run("apt-get install -y chromium || (apt-get update && apt-get install "
                          "-y chromium)", shell=True, capture_output=True, text=True)
    found = shutil.which("chromium")
    if not found:
        pytest.skip(f"apt-get install -y chromium failed (exit {done.returncode}): "
                    f"{done.stderr.strip()[-300:]}")
    return found


def test_the_page_in_a_browser_shows_the_groups_and_is_not_blank(ampo_run, tmp_path, chromium):
    from PIL import Image

    page = report.main([str(ampo_run), "--out", str(tmp_path / "page.html")])
    url = f"file://{page}"
    flags = ["--headless", "--no-sandbox", "--disable-gpu"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout
    # what the browser built: every group's problem and teachers' answers, every verdict (the
    # tiny model's own answers are random bytes, which the HTML parser normalises: \r, NUL)
    for r in groups(ampo_run):
        assert html.escape(r["problem"], quote=False) in dom
        assert all(html.escape(a["text"], quote=False) in dom for a in r["answers"]
                   if a["source"] != "policy")
    assert dom.count("teacher short") == 4 and dom.count("teacher long") == 4
    assert dom.count('<tr class="wrong">') == 8 and dom.count('<tr class="teacher">') == 8
    shot = tmp_path / "page.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,2000", url],
                   capture_output=True, timeout=120)
    im = Image.open(shot).convert("RGB")
    colours = dict((c, n) for n, c in im.getcolors(1 << 24))
    pixels = im.size[0] * im.size[1]
    assert im.size == (1200, 2000) and len(colours) > 200  # curves, text, tables: not blank
    assert colours.get((255, 255, 255), 0) < 0.95 * pixels
    # the verdicts are painted: wrong answers' red cells, teachers' orange rows
    assert colours.get((246, 198, 198), 0) > 1000 and colours.get((253, 231, 196), 0) > 1000
