"""``curvprune.outputs`` (atomic writes, output folders) and ``curvprune.plots`` (the figures)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from curvprune.errors import UsageError
from curvprune.outputs import atomic_write, output_dir, write_json
from curvprune.plots import plot_demo_accuracy, plot_sparsity

PNG = b"\x89PNG\r\n\x1a\n"


def test_atomic_write_replaces_the_file_with_the_usual_mode(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    atomic_write(path, lambda tmp: open(tmp, "w").write("new"))
    assert path.read_text() == "new"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")

    def fail(tmp: str) -> None:
        open(tmp, "w").write("half")
        raise KeyboardInterrupt  # an interrupted run

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_write_json_round_trips(tmp_path):
    data = {"a": [1, 2.5, None], "b": {"c": "d"}}
    write_json(tmp_path / "r.json", data)
    assert json.loads((tmp_path / "r.json").read_text()) == data


def test_output_dir_creates_or_refuses_in_one_line(tmp_path):
    assert output_dir(tmp_path / "x" / "y") == tmp_path / "x" / "y"
    assert (tmp_path / "x" / "y").is_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="cannot write to output folder"):
        output_dir(tmp_path / "file" / "sub")


def test_plots_write_png_files(tmp_path):
    layers = {"0.weight": SimpleNamespace(sparsity=0.5), "2.weight": SimpleNamespace(sparsity=0.9)}
    plot_sparsity(SimpleNamespace(layers=layers, overall_sparsity=0.7), tmp_path / "s.png")
    report = {"data": "synthetic", "dense_accuracy": 0.8,
              "accuracy": {0.5: {"curvature": 0.7, "control": 0.1, "magnitude": 0.6}}}
    plot_demo_accuracy(report, tmp_path / "d.png")
    for name in ("s.png", "d.png"):
        assert (tmp_path / name).read_bytes()[:8] == PNG
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "s.png"]
