"""benchmarks/pde_sil.py: the target checks on hand-made per-seed results, and its argument checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # appended: benchmarks/mujoco.py must not shadow the mujoco package
import pde_sil


def _summary(non, fo, zo, hy, zo_rows=458_000, hy_rows=33_000) -> dict:
    def ms(v):
        return {"mean": sum(v) / len(v), "std": 0.0, "per_seed": v}

    return {"mae": {"SRC": ms([0.2] * len(non)), "NON": ms(non), "FO-SOL": ms(fo), "ZO-SOL": ms(zo),
                    "HYBRID-SOL": ms(hy)},
            "solver_calls": {"SRC": 0, "NON": 1, "FO-SOL": 10, "ZO-SOL": zo_rows, "HYBRID-SOL": hy_rows}}


def test_targets_count_seeds_and_gap_shares():
    t = pde_sil.targets(_summary(non=[0.10, 0.10, 0.10, 0.10, 0.10], fo=[0.05, 0.085, 0.079, 0.081, 0.05],
                                 zo=[0.06] * 5, hy=[0.0565] * 5))
    assert t["fo_vs_non"]["seeds_met"] == 3 and not t["fo_vs_non"]["met"]  # 0.081 > 0.8 x 0.10
    gap = 0.10 - 0.069
    assert t["zo_gap_closed"]["value"] == pytest.approx((0.10 - 0.06) / gap) and t["zo_gap_closed"]["met"]
    assert t["hybrid_gap_closed"]["met"]
    assert t["hybrid_fewer_solver_calls"]["value"] == pytest.approx(458 / 33) and t["hybrid_fewer_solver_calls"]["met"]


def test_targets_without_a_gap_say_so():
    t = pde_sil.targets(_summary(non=[0.05] * 5, fo=[0.06] * 5, zo=[0.06] * 5, hy=[0.06] * 5, hy_rows=100_000))
    assert not t["fo_vs_non"]["met"] and t["fo_vs_non"]["seeds_met"] == 0
    for key in ("zo_gap_closed", "hybrid_gap_closed"):
        assert t[key]["value"] is None and not t[key]["met"] and "no gap" in t[key]["note"]
    assert not t["hybrid_fewer_solver_calls"]["met"]  # 4.58x < 10x


def test_unknown_scenario_is_refused(capsys):
    with pytest.raises(SystemExit):
        pde_sil.main(["--scenarios", "heat3d"])
    assert "invalid choice: 'heat3d'" in capsys.readouterr().err
