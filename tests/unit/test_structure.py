"""The package's shape, as docs/architecture.md states it: layers, no import cycles, small files.

Imports are read with ``ast`` from every module of maskpro_ds (function-level imports included), so
the checks hold for what the code could import, not only for what one test run happened to load.
"""

from __future__ import annotations

import ast
import re
import typing
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "maskpro_ds"

# Lowest first. A module may import its own wing and any lower layer; wings on one layer are peers
# and never import each other. The same list is in docs/architecture.md ("Layers").
LAYERS: list[tuple[str, ...]] = [
    ("masks",),
    ("formats",),
    ("config",),
    ("models", "data", "distributed"),
    ("train", "priors", "eval", "export"),
    ("demo",),
    ("cli",),
]
RANK = {wing: i for i, layer in enumerate(LAYERS) for wing in layer}
MAX_LINES = 450
MAX_ROOT_MODULES = 6


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def wing(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    """maskpro_ds modules ``path`` imports (``from pkg import mod`` resolves to the module when it is one)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "maskpro_ds"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "maskpro_ds":
            assert node.level == 0, f"{path}: relative import"
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
    return out


GRAPH = {name: {m for m in imports_of(path) if m != name} for name, path in MODULES.items()}


def test_every_import_names_a_module_that_exists():
    missing = {(src, dst) for src, dsts in GRAPH.items() for dst in dsts if dst not in MODULES}
    assert not missing, missing


def test_every_wing_has_a_layer():
    assert {wing(m) for m in MODULES} - {"__init__"} <= set(RANK), "add the new wing to LAYERS (and the doc)"


def test_no_module_imports_a_higher_layer_or_a_peer_wing():
    bad = []
    for src, dsts in GRAPH.items():
        for dst in dsts:
            a, b = wing(src), wing(dst)
            if a == b or b == "__init__":
                continue
            if a == "__init__" or RANK[b] > RANK[a] or (RANK[b] == RANK[a]):
                bad.append(f"{src} -> {dst}")
    assert not bad, "imports against the layer order:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [])
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_masks_is_pure_math():
    for name, path in MODULES.items():
        if wing(name) != "masks":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.startswith(("deepspeed", "torch.distributed"))], name


def test_at_most_six_modules_at_the_package_root():
    root = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(root) <= MAX_ROOT_MODULES, root


def test_every_file_is_at_most_450_lines():
    tracked = [p for pattern in ("*.py", "*.md", "*.sh", "*.sbatch", "*.yaml", "*.toml", "Makefile")
               for p in REPO.rglob(pattern)]
    skip = (".venv", ".cache", "runs", ".git", "build", ".pytest_cache")
    long = {str(p.relative_to(REPO)): n for p in tracked
            if not set(p.relative_to(REPO).parts) & set(skip) and (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_code_cites_only_documents_in_the_repository():
    # a document named in prose (not a quoted file name a test writes)
    cited = re.compile(r"(?<![\w/.\"'])((?:docs/)?[\w-]+\.md)\b(?![\"'])")
    bad = []
    for path in [*PACKAGE.rglob("*.py"), *REPO.glob("launchers/**/*.py"), *REPO.glob("tools/*.py"),
                 *REPO.glob("bench/*.py"), *REPO.glob("tests/**/*.py")]:
        text = path.read_text()
        if "shared/" in text and re.search(r"\.\./shared|/shared/\w+\.md", text):
            bad.append(f"{path}: cites a document outside the repository")
        for doc in cited.findall(text):
            target = REPO / doc if doc.startswith("docs/") or doc == "README.md" else REPO / "docs" / doc
            if not target.is_file():
                bad.append(f"{path.relative_to(REPO)}: {doc}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_every_module_says_what_it_owns():
    missing = [name for name, path in MODULES.items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, missing


def test_estimator_registry_and_config_name_the_same_estimators():
    from maskpro_ds.config import EstimatorName
    from maskpro_ds.train.estimators import ESTIMATORS

    assert set(ESTIMATORS) == set(typing.get_args(EstimatorName))
