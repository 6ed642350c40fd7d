"""The README's usage example runs as written (on the CPU)."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(tmp_path, monkeypatch):
    code = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)[0]
    code = code.replace('device="cuda"', 'device="cpu"')
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["cost"].shape == (1, 300)
    assert (tmp_path / "checkpoints" / "lewm" / "weights.pt").is_file()


def test_readme_two_room_example_runs(tmp_path, monkeypatch):
    code = next(
        c for c in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "TrainingWindows" in c
    )
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["batch"]["pixels"].shape == (8, 4, 3, 224, 224)
    assert (tmp_path / "data" / "tiny" / "meta.json").is_file()
