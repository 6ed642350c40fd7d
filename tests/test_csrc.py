"""The csrc build machinery: JIT build and cache, one warning and the torch path on failure."""

import fnmatch
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

from lewm_fast import _csrc
from lewm_fast import backend as backend_mod
from lewm_fast.plan import cem_refit, cem_refit_torch

ROOT = Path(__file__).resolve().parents[1]


def _inputs():
    return torch.randn(2, 9, 3, 2), torch.randn(2, 9), torch.zeros(2, 3, 2), torch.ones(2, 3, 2)


def test_cpu_extension_builds_and_registers_the_op():
    assert _csrc.unavailable_reason("cem_refit_cpu", torch.device("cpu")) is None
    out = torch.ops.lewm_fast.cem_refit(*_inputs(), 3)
    assert [tuple(t.shape) for t in out] == [(2, 3, 2), (2, 3, 2), (2,), (2,)]
    assert out[3].dtype == torch.int32


def test_sources_come_from_the_package():
    assert _csrc.source_dir() == (ROOT / "csrc").resolve()
    for ext in _csrc.EXTENSIONS.values():
        for name in (ext.binding, *ext.sources, *ext.headers):
            assert (_csrc.source_dir() / name).is_file(), name


def test_extension_of_the_wrong_device_kind():
    assert "CUDA tensors" in _csrc.unavailable_reason("cem_refit_cuda", torch.device("cpu"))
    with pytest.raises(ValueError, match="unknown csrc extension"):
        _csrc.unavailable_reason("nope", torch.device("cpu"))


def test_cache_key_follows_sources_and_arch(tmp_path, monkeypatch):
    copy = tmp_path / "csrc"
    shutil.copytree(_csrc.source_dir(), copy)
    monkeypatch.setattr(_csrc, "source_dir", lambda: copy)
    base = _csrc._key("cem_refit_cuda", "sm_90")
    assert _csrc._key("cem_refit_cuda", "sm_90") == base
    assert _csrc._key("cem_refit_cuda", "sm_80") != base
    header = copy / "cem_refit.h"
    header.write_text(header.read_text() + "\n// changed\n")
    assert _csrc._key("cem_refit_cuda", "sm_90") != base


def test_cache_dir_override(tmp_path, monkeypatch):
    monkeypatch.setenv("LEWM_FAST_CACHE_DIR", str(tmp_path / "c"))
    assert _csrc.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("LEWM_FAST_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _csrc.cache_dir() == tmp_path / "xdg" / "lewm_fast"


@pytest.fixture
def broken_sources(tmp_path, monkeypatch):
    """A csrc folder whose CPU extension does not compile, and a fresh build cache."""
    copy = tmp_path / "csrc"
    shutil.copytree(_csrc.source_dir(), copy)
    (copy / "cem_refit_cpu.cpp").write_text('#error "deliberately broken"\n')
    monkeypatch.setattr(_csrc, "source_dir", lambda: copy)
    monkeypatch.setenv("LEWM_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(backend_mod.ENV_VAR, raising=False)
    _csrc._build.cache_clear()
    yield
    _csrc._build.cache_clear()


def test_build_failure_warns_once_and_falls_back(broken_sources):
    args = _inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with pytest.raises(backend_mod.BackendUnavailableError, match="building it failed"):
                cem_refit(*args, 3, backend="cuda")
        out = cem_refit(*args, 3)  # auto: the torch path
    built = [w for w in caught if "cem_refit_cpu" in str(w.message)]
    assert len(built) == 1 and "using the PyTorch path" in str(built[0].message)
    want = cem_refit_torch(*args, 3)
    assert torch.equal(out.mean, want.mean) and torch.equal(out.std, want.std)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib")
def test_sources_ship_in_the_wheel():
    """pyproject maps lewm_fast.csrc to csrc/ and its package data covers every source."""
    import tomllib

    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "lewm_fast.csrc" in config["packages"] and "lewm_fast.plan" in config["packages"]
    assert config["package-dir"]["lewm_fast.csrc"] == "csrc"
    patterns = config["package-data"]["lewm_fast.csrc"]
    for ext in _csrc.EXTENSIONS.values():
        for name in (ext.binding, *ext.sources, *ext.headers):
            assert any(fnmatch.fnmatch(name, p) for p in patterns), name


@pytest.mark.parametrize("arch", [80, 86, 89, 90])
def test_cuda_kernel_builds_without_spills_and_fits_shared_memory(arch, tmp_path):
    """nvcc builds the CUDA kernel (it needs no torch headers) for each target; cuobjdump
    shows no stack or local memory, and its static shared memory plus the largest dynamic
    part the Python side allows (S + topk items) fits the 48 KiB a block gets by default."""
    import re
    import subprocess

    from lewm_fast.kernels import _aot
    from lewm_fast.plan.refit import CUDA_MAX_SHARED_ITEMS

    nvcc, cuobjdump = shutil.which("nvcc"), _aot.cuobjdump()
    if nvcc is None or cuobjdump is None:
        pytest.skip("needs nvcc and the cuobjdump shipped with Triton")
    obj = tmp_path / f"cem_refit_sm{arch}.o"
    gencode = f"arch=compute_{arch},code=sm_{arch}"
    build = subprocess.run(
        [nvcc, "-c", "-O3", "-std=c++17", "-gencode", gencode, str(_csrc.source_dir() / "cem_refit_cuda.cu"),
         "-o", str(obj)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if build.returncode != 0 and "Unsupported gpu architecture" in build.stderr:
        pytest.skip(f"this nvcc does not target sm_{arch}")
    assert build.returncode == 0, build.stderr[-3000:]
    usage = subprocess.run([cuobjdump, "-res-usage", str(obj)], capture_output=True, text=True, check=True)
    rows = re.findall(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage.stdout)
    assert len(rows) == 1, usage.stdout
    reg, stack, shared, local = map(int, rows[0])
    assert stack == 0 and local == 0, usage.stdout
    assert shared + 4 * CUDA_MAX_SHARED_ITEMS <= 48 * 1024, (shared, CUDA_MAX_SHARED_ITEMS)
