"""experiments/bench/fashion_results.py end to end at tiny size (table 2 of docs/RESULTS.md), and the fixes it needed.

    .venv/bin/python -m pytest tests/test_fashion_results.py -q        (~40 s on a 2-core CPU)

Items are random images (no Fashion-MNIST or scikit-learn needed); the numbers mean nothing, the shape of the
output does: every method's table has every row and column, and every picture is written.
"""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import rcm_core.eval.evaluate as E
from rcm_core.config import load_config
from rcm_core.data.latents import read_manifest
from rcm_core.data import moving_fashion


def _script():
    spec = importlib.util.spec_from_file_location("fashion_results", REPO / "experiments/bench/fashion_results.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod                    # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _random_items(split: str = "train"):
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 10
    images = (rng.random((200, 28, 28)) * 255 * (0.3 + labels[:, None, None] / 15)).astype(np.uint8)
    return images, labels.astype(np.int64), "test-random"


@pytest.fixture
def random_items(monkeypatch):
    monkeypatch.setattr(moving_fashion, "load_items", _random_items)


def test_tiny_run_has_every_row_column_and_picture(tmp_path, random_items, monkeypatch):
    fr = _script()
    seen = []
    original = E.evaluate_step_counts

    def spy(samples, reference, **kw):
        seen.append((kw["cfg"].num_resamples, reference.device))
        return original(samples, reference, **kw)
    monkeypatch.setattr(E, "evaluate_step_counts", spy)

    cfg = load_config(fr.DEFAULT_CONFIG, [*fr.TINY_OVERRIDES, "train.steps=6", "eval.num_samples=60"])
    out = tmp_path / "out"
    res = fr.run(cfg, data=str(tmp_path / "data"), out=out, device=torch.device("cpu"), classifier_steps=10,
                 teacher_seconds=1.0, student_seconds=0.5, probe_iters=2)    # the budget probes run too

    assert seen and all(n == cfg.eval.bootstrap for n, _ in seen)      # eval.bootstrap reaches the report
    assert res.train_steps >= 10 and res.teacher_steps >= 50              # set by the probes (rounded, floors)
    assert read_manifest(str(tmp_path / "data")).source["images"] == "test-random"
    teacher_row = "teacher_nfe_8"                                     # 4 Euler steps × 2 (guidance)
    assert set(res.tables) == {*fr.METHODS, "all"}
    summary_rows = [line.split()[0] for line in res.tables["all"].splitlines()[2:]]
    assert summary_rows == [f"{m}/nfe_{n}" for m in fr.METHODS for n in (1, 2, 4)] + [teacher_row]
    for name, report in res.reports.items():
        rows = report.all_rows()
        assert list(rows) == ["nfe_1", "nfe_2", "nfe_4", teacher_row]
        for row, metrics in rows.items():
            for col in fr.COLUMNS:
                if col == "paired_mse" and row == teacher_row:
                    continue                                          # the floor has no paired samples
                assert col in metrics, (name, row, col)
                assert math.isfinite(metrics[col].value), (name, row, col)
        assert rows[teacher_row]["speedup"].value == 1.0
        header = res.tables[name].splitlines()[0].split()
        assert header == ["name", *fr.COLUMNS]
        slug = name
        for step in ("nfe_1", "nfe_2", "nfe_4", "teacher_reference"):
            for ext in ("png", "gif"):
                assert (out / "samples" / slug / f"{step}.{ext}").stat().st_size > 0
        assert json.loads((out / "tables" / f"{slug}.json").read_text())["nfe_2"]["fd_feat"]
        assert not (out / "runs" / slug / "checkpoints").exists()
    assert (out / "samples" / "data.png").is_file() and (out / "teacher.pt").is_file()
    md = (out / "tables" / "table2.md").read_text()
    assert all(f"### {name}" in md for name in fr.METHODS) and "| total |" in md
    archive = fr.write_archive(out, tmp_path / "a.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "fashion_results/tables/table2.md" in names and "fashion_results/samples/rCM/nfe_4.gif" in names


def test_no_fashion_mnist_and_no_sklearn_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setattr(moving_fashion, "FASHION_DIR", tmp_path / "absent")
    monkeypatch.setitem(sys.modules, "sklearn", None)                  # `import sklearn…` raises ImportError,
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)         # also when an earlier import loaded it
    moving_fashion.load_items.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="RCM_FASHION_MNIST_DIR"):
            moving_fashion.load_items("train")
    finally:
        moving_fashion.load_items.cache_clear()
