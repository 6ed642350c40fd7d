"""docs/architecture.md's layering rule: imports only point down the layers.

Every import in the package, top-level or inside a function, is checked; the known
exceptions are listed here and in docs/architecture.md, so a new upward import fails.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {
    "lewm_fast": "lewm_fast",
    "lewm_fast.kernels": "kernels",
    "lewm_fast.csrc": "csrc",
    "lewm_fast.bench": "bench",
}

# Low to high; a module may import its own layer and the layers before it.
LAYERS = (
    (
        "helpers",
        ("lewm_fast._checks", "lewm_fast._io", "lewm_fast.backend", "lewm_fast.sysinfo", "lewm_fast.testing"),
    ),
    ("reference", ("lewm_fast.reference",)),
    ("kernels/csrc", ("lewm_fast.kernels", "lewm_fast.csrc", "lewm_fast._csrc")),
    (
        "model",
        ("lewm_fast.model", "lewm_fast.sigreg", "lewm_fast.adaln", "lewm_fast.config", "lewm_fast.checkpoint"),
    ),
    ("data/envs", ("lewm_fast.data", "lewm_fast.envs")),
    ("train/plan", ("lewm_fast.train", "lewm_fast.plan")),
    ("probe/report", ("lewm_fast.probe", "lewm_fast.report")),
    ("pipeline/CLI", ("lewm_fast.pipeline", "lewm_fast.cli", "lewm_fast")),
    ("bench", ("lewm_fast.bench",)),
)

# (importer, imported): upward imports that are known and listed in docs/architecture.md.
KNOWN_UPWARD = {
    ("lewm_fast.cli", "lewm_fast.bench.__main__.main"),  # `lewm-fast bench` runs the benchmark runner
    ("lewm_fast.plan.evaluation", "lewm_fast.__version__"),  # the version, from the package root
    ("lewm_fast.report", "lewm_fast.__version__"),
}


def _layer(module: str) -> int:
    matches = [
        (len(prefix), i)
        for i, (_, prefixes) in enumerate(LAYERS)
        for prefix in prefixes
        if module == prefix or module.startswith(prefix + ".")
    ]
    return max(matches)[1]


def _modules():
    for package, folder in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join((package, *parts[:-1]) if is_package else (package, *parts))
            yield name, is_package, path


def _imports(name: str, is_package: bool, path: Path):
    """Fully qualified names each import statement of the module brings in."""
    here = name.split(".") if is_package else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                # `from pkg import name` imports pkg.name when it is a module, else a name in pkg
                yield f"{base}.{alias.name}"


def _upward_imports():
    found = set()
    for name, is_package, path in _modules():
        for target in _imports(name, is_package, path):
            if target == "bench" or target.startswith("bench."):
                target = "lewm_fast." + target
            if target.startswith("lewm_fast.") and _layer(target) > _layer(name):
                found.add((name, target))
    return found


def test_imports_only_point_down_the_layers():
    assert _upward_imports() == KNOWN_UPWARD


def test_the_library_imports_bench_only_for_the_bench_subcommand():
    importers = {a for a, b in _upward_imports() if b.startswith("lewm_fast.bench")}
    assert importers == {"lewm_fast.cli"}


def test_the_architecture_doc_lists_every_environment_variable():
    """Every variable the code reads (os.environ / getenv, and ${VAR:-default} in the CI
    scripts) appears in docs/architecture.md's table."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    table = set(re.findall(r"^\| `([A-Z_][A-Z0-9_]*)`", doc, re.M))
    read = set()
    files = [*ROOT.glob("lewm_fast/**/*.py"), *ROOT.glob("kernels/*.py"), *ROOT.glob("bench/*.py")]
    for path in [*files, ROOT / "tests" / "conftest.py"]:
        text = path.read_text()
        read |= set(re.findall(r"environ(?:\.get)?[\(\[]\"([A-Z_][A-Z0-9_]*)\"", text))
        read |= set(re.findall(r"getenv\(\"([A-Z_][A-Z0-9_]*)\"", text))
        read |= set(re.findall(r"^[A-Z_]+_(?:ENV|VAR)\s*=\s*\"([A-Z_][A-Z0-9_]*)\"", text, re.M))
    for script in (ROOT / ".ci").iterdir():
        read |= set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*):-", script.read_text()))
    assert read and read <= table, sorted(read - table)
