"""The layout a newcomer walks: imports point down only, the train script is only Algorithm 1, short signatures."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FILES = {p.stem: ast.parse(p.read_text()) for p in sorted(ROOT.glob("*.py"))}
TRAIN_SCRIPTS = {"train_image", "train_video"}


def project_imports(tree) -> set[str]:
    """The project's own modules a file imports, at the top or inside a function."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names & set(FILES)


GRAPH = {name: project_imports(tree) for name, tree in FILES.items()}


def test_no_file_imports_a_file_that_imports_it_back():
    def cycle_from(start):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in GRAPH[node]:
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None
    cycles = [c for c in map(cycle_from, GRAPH) if c]
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_only_bench_and_train_video_import_a_train_script():
    importers = {name for name, deps in GRAPH.items() if deps & TRAIN_SCRIPTS}
    assert importers <= {"bench", "train_video"}, importers
    assert "train_video" not in set().union(*(GRAPH[n] for n in GRAPH if n != "bench"))
    assert GRAPH["evaluate"].isdisjoint(TRAIN_SCRIPTS) and GRAPH["figures"].isdisjoint(TRAIN_SCRIPTS)


def test_the_math_files_depend_on_torch_and_math_alone():
    for name in ("sde", "grpo"):
        imported = set()
        for node in ast.walk(FILES[name]):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module.split(".")[0])
        assert imported <= {"torch", "math"}, (name, imported)


def test_no_public_function_takes_more_than_six_positional_parameters():
    wide = [f"{name}.{node.name} ({len(node.args.posonlyargs) + len(node.args.args)})"
            for name, tree in FILES.items() for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_")
            and len(node.args.posonlyargs) + len(node.args.args) > 6]
    assert not wide, wide


def test_train_image_holds_only_what_it_uses_itself():
    """Every function and class train_image.py defines is used inside train_image.py: nothing in it exists
    only for other files (those live in sampling.py, evaluate.py, ...). And it stays short."""
    tree = FILES["train_image"]
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))} - {"main"}
    used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert defined <= used, f"defined in train_image.py, used only elsewhere: {sorted(defined - used)}"
    source = (ROOT / "train_image.py").read_text().splitlines()
    assert sum(1 for line in source if line.strip()) < 400
