"""docs/architecture.md's rules: imports only point down the layers, every environment
variable is in its table, and kernel ops are named ``lewm_fast::<op>`` / ``<op>_bwd``.

Every import in the package, top-level or inside a function, is checked; the known
exceptions are listed here and in docs/architecture.md, so a new upward import fails.
"""

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

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
        (
            "lewm_fast._checks",
            "lewm_fast._io",
            "lewm_fast.backend",
            "lewm_fast.stats",
            "lewm_fast.sysinfo",
            "lewm_fast.testing",
        ),
    ),
    ("reference", ("lewm_fast.reference",)),
    ("kernels/csrc", ("lewm_fast.kernels", "lewm_fast.csrc", "lewm_fast._csrc")),
    (
        "model",
        (
            "lewm_fast.model",
            "lewm_fast.encoder",
            "lewm_fast.sigreg",
            "lewm_fast.adaln",
            "lewm_fast.config",
            "lewm_fast.checkpoint",
            "lewm_fast.swm",
        ),
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


def _kernel_modules(private: bool = False) -> dict:
    """The modules of kernels/ (with ``_aot`` and ``_interpreter`` when ``private``)."""
    pytest.importorskip("triton")
    names = sorted(p.stem for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__")
    names = [n for n in names if private or not n.startswith("_")]
    return {name: importlib.import_module(f"lewm_fast.kernels.{name}") for name in names}


def test_ops_are_named_op_and_op_bwd():
    """Every ``lewm_fast::`` op is a plain snake_case name, every ``X_bwd`` has its ``X``,
    and a kernel module holds op ``lewm_fast::X`` as the Python object ``X_op``."""
    from torch._library.custom_ops import CustomOpDef

    from lewm_fast import _csrc

    modules = _kernel_modules()
    _csrc.define_ops()
    ops = {n.split("::", 1)[1] for n in torch._C._dispatch_get_all_op_names() if n.startswith("lewm_fast::")}
    assert {"sigreg", "sigreg_bwd", "adaln", "adaln_bwd", "cem_refit"} <= ops
    for op in ops:
        assert re.fullmatch(r"[a-z][a-z0-9]*(_[a-z0-9]+)*", op), op
        assert not op.endswith(("_fused", "_op", "_fwd")), f"lewm_fast::{op}: name the op, not its form"
        if op.endswith("_bwd"):
            assert op.removesuffix("_bwd") in ops, f"lewm_fast::{op} has no forward op"
    for module in modules.values():
        defs = {name: v for name, v in vars(module).items() if isinstance(v, CustomOpDef)}
        assert defs, module.__name__
        for name, op in defs.items():
            assert op._qualname == "lewm_fast::" + name.removesuffix("_op"), (module.__name__, name)


def test_no_kernel_class_only_carries_a_name():
    """No ``<Op>Function`` classes in kernels/: the torch.library op carries the autograd."""
    for module in _kernel_modules(private=True).values():
        for name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__:
                continue
            own = {k for k in vars(cls) if not (k.startswith("__") and k.endswith("__"))}
            assert not name.endswith("Function") and not own <= {"apply"}, f"{module.__name__}.{name}"
