"""The suite's own configuration (tests/conftest.py)."""

import torch


def test_whole_suite_spreads_over_the_cores_only_when_asked_for_nothing(monkeypatch):
    """tests/conftest.py: `pytest` with no test paths and no -n, on a machine without CUDA,
    gets one xdist worker per core ($LEWM_FAST_TEST_WORKERS overrides); named paths, an
    explicit -n, an xdist worker or CUDA leave the options alone."""
    import types

    import conftest

    def run(source="TESTPATHS", n=None, worker=False, cuda=False, env=None, cores=2):
        option = types.SimpleNamespace(numprocesses=n, dist="no")
        config = types.SimpleNamespace(
            option=option,
            args_source=types.SimpleNamespace(name=source),
            pluginmanager=types.SimpleNamespace(hasplugin=lambda name: True),
            getoption=lambda name, default=None: getattr(option, name, default),
        )
        if worker:
            config.workerinput = {}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(conftest, "_cores", lambda: cores)
        if env is None:
            monkeypatch.delenv(conftest.WORKERS_ENV, raising=False)
        else:
            monkeypatch.setenv(conftest.WORKERS_ENV, env)
        conftest.pytest_cmdline_main(config)
        return option.numprocesses, option.dist

    assert run() == (2, "load")
    assert run(cores=1) == (None, "no")
    assert run(env="4") == (4, "load")
    assert run(env="0") == (None, "no")
    for kwargs in ({"source": "ARGS"}, {"n": 0}, {"worker": True}, {"cuda": True}):
        assert run(**kwargs) == (kwargs.get("n"), "no"), kwargs
