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


def test_readme_planning_example_runs():
    """The planning example, with fewer candidates and iterations so it runs fast on a CPU."""
    code = next(c for c in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "CEMSolver" in c)
    assert "CEMSolver(model, action_dim=10)" in code
    code = code.replace("action_dim=10)", "action_dim=10, num_samples=8, n_steps=2, topk=2)")
    code = code.replace("torch.randn(4, 1, 3, 224, 224)", "torch.randn(4, 1, 3, 28, 28)")
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert namespace["actions"].shape == (4, 5, 10)
    assert namespace["plan"]["costs"].shape == (4,)


def test_readme_evaluation_example_runs(tmp_path, monkeypatch):
    """The evaluation example on a small saved model, a small dataset and a tiny planner."""
    from helpers import model_pair, small_config

    import lewm_fast

    code = next(c for c in re.findall(r"```python\n(.*?)```", README.read_text(), re.S) if "evaluate(" in c)
    assert 'evaluate(model, data, out="eval.json")' in code
    monkeypatch.chdir(tmp_path)
    lewm_fast.save_pretrained(model_pair(small_config())[0], "checkpoints/lewm")
    code = code.replace('device="cuda"', 'device="cpu"').replace("episodes=10_000", "episodes=12")
    code = code.replace(
        "evaluate(model, data, ",
        "evaluate(model, data, episodes=3, num_samples=8, n_steps=1, topk=2, progress=False, ",
    )
    namespace = {}
    exec(compile(code, str(README), "exec"), namespace)
    assert len(namespace["result"]["per_episode"]["success"]) == 3
    assert (tmp_path / "eval.json").is_file()
