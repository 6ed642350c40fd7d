"""The lewm-fast command line."""

import pytest

from lewm_fast import cli


def test_demo_prints_paper_parameter_count(capsys):
    assert cli.main(["demo", "--device", "cpu", "--batch", "1"]) == 0
    out = capsys.readouterr().out
    assert "18,034,478 parameters" in out
    for key in ("pred_loss", "sigreg_loss", "loss"):
        assert key in out


def test_info_runs(capsys, monkeypatch):
    monkeypatch.setenv("LEWM_FAST_GIT_COMMIT", "0123abcd")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "(commit 0123abcd)" in out


def test_info_device_line_from_the_environment_record():
    cuda = {"device_type": "cuda", "device_name": "NVIDIA H200", "capability": "sm_90", "cuda": "12.8"}
    nvml = {"memory_total_bytes": 141 * 2**30, "driver": "570.86", "sm_clock_max_mhz": 1980}
    line = cli._device_line({**cuda, **nvml, "mem_clock_max_mhz": 3201})
    assert line == (
        "NVIDIA H200, sm_90, CUDA 12.8, 141.0 GiB, driver 570.86, max clocks SM 1980 / memory 3201 MHz"
    )
    line = cli._device_line({**cuda, "nvml": "nvidia-ml-py not installed"})
    assert line == "NVIDIA H200, sm_90, CUDA 12.8, NVML nvidia-ml-py not installed"


def test_bad_arguments_exit_with_message(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--batch", "0"])
    assert "--batch must be at least 1" in capsys.readouterr().err


def _png_pixels(path):
    import struct
    import zlib

    import numpy as np

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, size = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            size = struct.unpack(">II", body[:8])
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    w, h = size
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, 3)


def test_generate_data_and_render_frame(tmp_path, capsys):
    import numpy as np
    import torch

    from lewm_fast.data import TwoRoomDataset
    from lewm_fast.envs import render

    out = tmp_path / "ds"
    assert cli.main(["generate-data", str(out), "--episodes", "6", "--seed", "2", "--device", "cpu"]) == 0
    assert "6 episodes" in capsys.readouterr().out
    data = TwoRoomDataset.open(out)
    assert data.source["seed"] == 2 and data.source["policy"] == "expert" and not data.has_frames
    with pytest.raises(SystemExit, match="already exists"):
        cli.main(["generate-data", str(out), "--episodes", "6", "--seed", "3"])
    args = ["generate-data", str(out), "--episodes", "4", "--policy", "random", "--frames", "--force"]
    assert cli.main(args) == 0
    data = TwoRoomDataset.open(out)
    assert data.num_episodes == 4 and data.has_frames and data.source["policy"] == "random"

    png = tmp_path / "frame.png"
    assert cli.main(["render-frame", str(png), "--dataset", str(out), "--row", "3"]) == 0
    assert np.array_equal(_png_pixels(png), data.read_frames([3])[0])
    assert cli.main(["render-frame", str(png), "--xy", "40.5", "170.25"]) == 0
    want = render(torch.tensor([[40.5, 170.25]]))[0].numpy()
    assert np.array_equal(_png_pixels(png), want)
    with pytest.raises(SystemExit, match=r"\[0, 223\]"):
        cli.main(["render-frame", str(png), "--xy", "40", "400"])
    with pytest.raises(SystemExit, match="--row"):
        cli.main(["render-frame", str(png), "--dataset", str(out), "--row", str(data.num_rows)])


def test_hdf5_commands(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    from lewm_fast.data import TwoRoomDataset

    ds = tmp_path / "ds"
    cli.main(["generate-data", str(ds), "--episodes", "3", "--device", "cpu"])
    h5 = tmp_path / "ds.h5"
    assert cli.main(["export-hdf5", str(ds), str(h5), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert cli.main(["import-hdf5", str(h5), str(tmp_path / "back")]) == 0
    back = TwoRoomDataset.open(tmp_path / "back")
    assert back.num_rows == TwoRoomDataset.open(ds).num_rows
    out = capsys.readouterr().out
    transitions = back.num_rows - back.num_episodes
    assert f"dynamics: 0 of {transitions} transitions (0.00%) miss step() by more than 0.001 px" in out
    assert "16 sampled frames against the render: 0.000% of pixels differ, by at most 0 grey level(s)" in out
    with h5py.File(h5, "r+") as f:
        f["action"][1:] = f["action"][:-1]  # each row holds the previous row's action
    with pytest.raises(SystemExit, match=r"ds\.h5: column 'action' .* first bad row 1 "):
        cli.main(["import-hdf5", str(h5), str(tmp_path / "shifted")])
    assert cli.main(["import-hdf5", str(h5), str(tmp_path / "shifted"), "--allow-bad-dynamics"]) == 0
    assert ", the first at row 1;" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="already exists"):
        cli.main(["export-hdf5", str(ds), str(h5)])
    with pytest.raises(SystemExit, match="not found"):
        cli.main(["import-hdf5", str(tmp_path / "missing.h5"), str(tmp_path / "x")])
