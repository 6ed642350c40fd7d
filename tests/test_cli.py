"""The lewm-fast command line."""

import pytest

from lewm_fast import cli


def test_demo_prints_paper_parameter_count(capsys):
    assert cli.main(["demo", "--device", "cpu", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "18,034,478 parameters" in out
    for key in ("pred_loss", "sigreg_loss", "loss"):
        assert key in out


def test_info_runs(capsys):
    assert cli.main(["info"]) == 0
    assert "torch" in capsys.readouterr().out


def test_bad_arguments_exit_with_message(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--batch", "0"])
    assert "--batch must be at least 1" in capsys.readouterr().err
