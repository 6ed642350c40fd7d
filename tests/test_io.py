"""Atomic writes (lewm_fast._io): strict JSON with non-finite numbers as null, file and folder
swaps that leave no temporaries and the old content intact on failure, overwrite rules."""

import json
import math
import os

import numpy as np
import pytest

from lewm_fast._io import (
    atomic_file,
    atomic_folder,
    atomic_path,
    json_safe,
    remove_stale,
    write_json_atomic,
    write_npz_atomic,
    write_text_atomic,
)


class Boom(Exception):
    pass


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


# ------------------------------------------------------------------ JSON


def test_json_non_finite_numbers_are_written_as_null(tmp_path):
    obj = {"nan": math.nan, "inf": math.inf, "ninf": -math.inf, "ok": 1.5, "n": 3, "flag": True}
    obj["nested"] = [math.nan, (2.0, math.inf), {"deep": -math.inf}]
    path = write_json_atomic(tmp_path / "sub" / "out.json", obj)
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and "Infinity" not in text and text.endswith("}\n")
    assert json.loads(text) == {
        "nan": None,
        "inf": None,
        "ninf": None,
        "ok": 1.5,
        "n": 3,
        "flag": True,
        "nested": [None, [2.0, None], {"deep": None}],
    }
    assert text == json.dumps(json.loads(text), indent=2) + "\n"  # indented, as before
    assert _names(path.parent) == ["out.json"]


def test_json_safe_keeps_finite_values_and_numpy_floats():
    assert json_safe({"a": [1, 2.5, "x", None]}) == {"a": [1, 2.5, "x", None]}
    assert json_safe(np.float64("nan")) is None  # a float subclass
    assert json_safe(np.float64(0.25)) == 0.25


def test_json_that_cannot_be_written_leaves_the_old_file(tmp_path):
    path = write_json_atomic(tmp_path / "out.json", {"v": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"v": object()})
    assert json.loads(path.read_text()) == {"v": 1}
    assert _names(tmp_path) == ["out.json"]


def test_npz_round_trip_and_refused_objects(tmp_path):
    arrays = {"xy": np.arange(12, dtype=np.float32).reshape(2, 3, 2), "tag": np.array("a b"), "n": 3}
    path = write_npz_atomic(tmp_path / "sub" / "e.npz", arrays)
    assert path == tmp_path / "sub" / "e.npz" and _names(path.parent) == ["e.npz"]  # no ".npz" appended
    with np.load(path, allow_pickle=False) as data:
        assert sorted(data.files) == ["n", "tag", "xy"]
        np.testing.assert_array_equal(data["xy"], arrays["xy"])
        assert str(data["tag"]) == "a b" and int(data["n"]) == 3
    with pytest.raises(TypeError, match="'bad' holds Python objects"):
        write_npz_atomic(path, {"bad": np.array([{"a": 1}], dtype=object)})
    with np.load(path, allow_pickle=False) as data:  # the old file is untouched
        assert sorted(data.files) == ["n", "tag", "xy"]
    assert _names(path.parent) == ["e.npz"]


# ------------------------------------------------------------------ files


def test_atomic_file_replaces_on_success_and_keeps_old_on_error(tmp_path):
    path = write_text_atomic(tmp_path / "f.txt", "old")
    with pytest.raises(Boom):
        with atomic_file(path, "w") as f:
            f.write("half")
            raise Boom
    assert path.read_text() == "old" and _names(tmp_path) == ["f.txt"]
    with atomic_file(path) as f:
        np.save(f, np.arange(3))
    assert np.array_equal(np.load(path), np.arange(3)) and _names(tmp_path) == ["f.txt"]
    with pytest.raises(ValueError, match="mode"):
        with atomic_file(path, "a"):
            pass


def test_atomic_path_yields_a_hidden_sibling(tmp_path):
    with atomic_path(tmp_path / "x.h5") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".x.h5.tmp-")
        tmp.write_bytes(b"data")
    assert (tmp_path / "x.h5").read_bytes() == b"data" and _names(tmp_path) == ["x.h5"]


# ------------------------------------------------------------------ folders


def test_atomic_folder_writes_and_swaps_in(tmp_path):
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        assert tmp.is_dir() and tmp.parent == tmp_path and tmp.name.startswith(".out.tmp-")
        write_text_atomic(tmp / "a.txt", "a")
        write_text_atomic(tmp / "sub" / "b.txt", "b")
        assert not target.exists()  # nothing visible before the block ends
    assert (target / "a.txt").read_text() == "a" and (target / "sub" / "b.txt").read_text() == "b"
    assert _names(tmp_path) == ["out"]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "replace"])
def test_atomic_folder_body_raising_leaves_no_temporary_and_old_content(tmp_path, existing):
    target = tmp_path / "out"
    if existing:
        with atomic_folder(target) as tmp:
            write_text_atomic(tmp / "keep.txt", "old")
    with pytest.raises(Boom):
        with atomic_folder(target, overwrite=True) as tmp:
            write_text_atomic(tmp / "keep.txt", "new")
            raise Boom
    if existing:
        assert _names(tmp_path) == ["out"] and (target / "keep.txt").read_text() == "old"
        assert _names(target) == ["keep.txt"]
    else:
        assert _names(tmp_path) == []


def test_atomic_folder_overwrite_rules(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        atomic_folder(target)
    assert _names(tmp_path) == ["out"]  # refused before any temporary was made

    with atomic_folder(target, overwrite=True) as tmp:
        write_text_atomic(tmp / "new.txt", "new")
    assert _names(target) == ["new.txt"] and _names(tmp_path) == ["out"]  # old one gone, no .old-

    (tmp_path / "file").write_text("a file")
    with pytest.raises(FileExistsError, match="not a folder"):
        atomic_folder(tmp_path / "file", overwrite=True)
    assert (tmp_path / "file").read_text() == "a file"


def test_atomic_folder_refuses_a_target_that_appeared_meanwhile(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_folder(target) as tmp:
            write_text_atomic(tmp / "mine.txt", "mine")
            target.mkdir()
            (target / "theirs.txt").write_text("theirs")
    assert _names(target) == ["theirs.txt"] and _names(tmp_path) == ["out"]


def test_failed_swap_moves_the_old_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "out"
    with atomic_folder(target) as tmp:
        write_text_atomic(tmp / "keep.txt", "old")
    real_replace = os.replace

    def fail_second_rename(src, dst):
        if ".tmp-" in os.fspath(src) and os.fspath(dst) == os.fspath(target):
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second_rename)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_folder(target, overwrite=True) as tmp:
            write_text_atomic(tmp / "keep.txt", "new")
    monkeypatch.undo()
    assert (target / "keep.txt").read_text() == "old" and _names(tmp_path) == ["out"]


def test_remove_stale_clears_only_hidden_temporaries(tmp_path):
    for name in (".a.tmp-1234abcd", ".a.old-1234abcd", ".tmp-step_000000002-1234abcd"):
        (tmp_path / name).mkdir()
    (tmp_path / ".latest.tmp-99").write_text("x")
    for name in ("step_000000001", "latest", ".hidden", "a.tmp-1"):
        (tmp_path / name).write_text("keep")
    remove_stale(tmp_path)
    assert _names(tmp_path) == [".hidden", "a.tmp-1", "latest", "step_000000001"]
