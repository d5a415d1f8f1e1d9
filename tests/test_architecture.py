"""The shape the README promises: stages talk only through files, small functions, no machine paths."""
import ast
import functools
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "pipeline"
# Modules with a main() that read and write the file contracts of the chain; `submit` alone may chain them.
STAGES = {"pipeline.folds", "pipeline.train", "pipeline.predict", "pipeline.ensemble", "pipeline.submission",
          "pipeline.leaderboard", "pipeline.bundle", "pipeline.infer", "pipeline.pseudo"}
CHAINER = "pipeline.submit"
MAX_FUNCTION_LINES = 120


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def parsed(path: Path) -> ast.Module:
    """``path``'s syntax tree, parsed once for all the tests that read it (the package's sources: 0.4 s a pass)."""
    return ast.parse(path.read_text(encoding="utf-8"))


def imported_modules(path: Path) -> set[str]:
    """Every pipeline module ``path`` imports, at the top or lazily inside a function."""
    found = set()
    for node in ast.walk(parsed(path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from pipeline import train`
    return {m for m in found if m.startswith("pipeline")}


def sources() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_stage_exists_with_a_main():
    for stage in STAGES | {CHAINER}:
        path = REPO / (stage.replace(".", "/") + ".py")
        assert path.is_file(), stage
        tree = ast.parse(path.read_text(encoding="utf-8"))
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), f"{stage} has no main()"


def test_no_stage_imports_another_stage():
    arrows = []
    for path in sources():
        name = module_name(path)
        if name == CHAINER:
            continue
        for target in imported_modules(path) & STAGES:
            if target != name:
                arrows.append(f"{name} -> {target}")
    assert arrows == [], "only pipeline.submit may import stages: " + ", ".join(arrows)


def test_the_chainer_is_imported_by_no_module():
    importers = [module_name(p) for p in sources() if CHAINER in imported_modules(p)]
    assert importers == []


def test_no_function_is_longer_than_the_limit():
    long = []
    for path in sources():
        for node in ast.walk(parsed(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


@pytest.mark.parametrize("folder", ["pipeline", "configs", "benchmarks", "tests", "README.md", "Makefile"])
def test_no_absolute_machine_path_is_committed(folder):
    # a home or checkout path (/home/…, /root/…, /work/…, /Users/…, C:\…) only works on the machine that wrote it
    pattern = re.compile(r"(?<![\w.])(/home/\w|/root/|/work/|/Users/\w|/tmp/\w+/\w|[A-Z]:\\\\\w)")
    target = REPO / folder
    files = [target] if target.is_file() else [p for p in target.rglob("*") if p.suffix in (".py", ".md", ".yaml", ".yml", ".toml")]
    hits = []
    for path in files:
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if pattern.search(line) and path.name != "test_architecture.py":
                hits.append(f"{path.relative_to(REPO)}:{i}: {line.strip()[:100]}")
    assert hits == []
