"""experiments/bench/kernel_bar_draws.py, the tool that places the kernel tests' bars (issue 27): one real draw
through the interpreter, the JSON it keeps, and the table's verdict on a bar that a draw exceeds."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments" / "bench"))
from kernel_bar_draws import main, table  # noqa: E402


def test_a_draw_is_the_tests_own_check_and_accumulates(tmp_path, capsys):
    out = tmp_path / "draws.json"
    assert main(["--seeds", "1", "--tests", "bwd", "--dtypes", "float16", "--workers", "1", "--out", str(out)]) == 0
    draws = json.loads(out.read_text())
    errors = draws["bwd"]["128x64d128-contiguous"]["float16"]
    # seed 1 of case 1 is the test's own draw: every error sits under the test's bar (it passes there)
    assert set(errors) == {"o", "dq", "dk", "dv"} and all(0 < e["1"] < 2.2 for e in errors.values())
    main(["--seeds", "1", "--tests", "bwd", "--dtypes", "float16", "--workers", "1", "--out", str(out)])
    assert "0 draws to run (2 already in" in capsys.readouterr().out       # kept, not run again


def test_the_table_names_a_bar_that_a_draw_exceeds():
    draws = {"jvp": {"c": {"bfloat16": {"o": {"0": 1.0, "1": 4.0}, "o_t": {"0": 3.7}}}}}
    rows = {line.split("|")[2].strip(): line for line in table(draws).splitlines()[2:]}
    assert "TOO LOW" in rows["o"]                 # 4.0 > the bf16 o bar (3.8)
    assert "under 1.5 × worst" in rows["o_t"]     # the bar 5.4 < 1.5 × 3.7
