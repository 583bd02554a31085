"""The house rules a reader relies on: ampo.py stays a one-sitting read (at most 1,100 lines,
train() at most 70, at least a third of it prose), and no module imports one that imports it
back (a leaf such as trackers.py never imports the plumbing that calls it)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ["ampo", "ghpo", "infra", "trackers", "verify", "sampler", "vllm_engine", "compare",
           "plot", "report"]


def tree(name):
    with open(os.path.join(ROOT, f"{name}.py")) as f:
        return ast.parse(f.read())


def prose_share(source: str) -> float:
    """(comment lines + docstring lines) / non-blank lines."""
    t = ast.parse(source)
    lines = source.splitlines()
    comments = sum(1 for line in lines if line.strip().startswith("#"))
    docs = sum(n.body[0].end_lineno - n.body[0].lineno + 1 for n in ast.walk(t)
               if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(n))
    return (comments + docs) / sum(1 for line in lines if line.strip())


def test_prose_share_counts_comments_and_docstrings():
    assert prose_share('"""Doc."""\n\n# why\nx = 1\n\n\ndef f():\n    """A\n    b."""\n') == 4 / 6


def test_ampo_py_is_a_one_sitting_read():
    with open(os.path.join(ROOT, "ampo.py")) as f:
        source = f.read()
    assert len(source.splitlines()) <= 1100
    train = next(n for n in ast.parse(source).body
                 if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert train.end_lineno - train.lineno + 1 <= 70
    assert prose_share(source) >= 1 / 3


def imports(name) -> set:
    """The project modules `name` imports anywhere: at the top or inside a function."""
    out = set()
    for node in ast.walk(tree(name)):
        if isinstance(node, ast.Import):
            out |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module.split(".")[0])
    return out & set(MODULES)


def test_no_module_imports_one_that_imports_it_back():
    graph = {m: imports(m) for m in MODULES}
    assert "infra" in graph["ampo"] and "trackers" in graph["infra"]  # the graph is read

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    cycles = sorted(m for m in MODULES if m in reach(m))
    assert not cycles, {m: sorted(graph[m]) for m in cycles}
