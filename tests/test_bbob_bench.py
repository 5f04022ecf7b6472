"""The COCO BBOB harness (benchmarks/bbob.py) on tiny settings: budgets strictly enforced, fractions in
[0, 1], L-BFGS-B solving the sphere, COCO's f_opt re-implemented exactly, the JSON's structure."""

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("cocoex")
pytest.importorskip("cma")
pytest.importorskip("scipy")

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # appended: benchmarks/mujoco.py must not shadow the mujoco package
import bbob


@pytest.fixture(scope="module")
def tiny():
    return bbob.run_benchmark("bbob", dims=[2], instances=[1], functions=[1, 2], budget_factor=20,
                              solvers=["scipy", "cma"], jobs=1, observer=False)


def test_budget_strictly_enforced(tiny):
    runs = tiny["runs"]
    assert len(runs) == 4
    for r in runs:
        assert r["budget"] == 40
        assert 0 < r["nfev"] <= r["budget"]
        assert r["failure"] is None
    cma_runs = [r for r in runs if r["solver"] == "cma"]
    assert all(r["nfev"] == r["budget"] for r in cma_runs)  # IPOP restarts use it all, and no more


def test_fractions_and_sphere(tiny):
    rows = tiny["rows"]
    assert {r["budget_factor"] for r in rows} == {10, 20}
    assert {r["group"] for r in rows} == {"separable", "all"}
    for r in rows:
        for s in ("scipy", "cma"):
            assert 0.0 <= r[s] <= 1.0
    sphere = next(r for r in tiny["runs"] if r["solver"] == "scipy" and r["function"] == 1)
    assert sphere["hits"][-1] is not None and sphere["hits"][-1] <= 40  # f - f_opt <= 1e-8 within budget
    assert sphere["best_delta"] <= 1e-8


def test_json_structure(tiny, tmp_path):
    data = json.loads(json.dumps({k: v for k, v in tiny.items() if k != "runs"}))
    assert set(data) >= {"config", "rows", "time_per_eval", "failures", "targets", "noisy_suite"}
    row = data["rows"][0]
    assert set(row) == {"suite", "dim", "budget_factor", "group", "scipy", "cma"}
    assert set(data["time_per_eval"]["bbob"]) == {"scipy", "cma"}
    assert data["time_per_eval"]["bbob"]["scipy"]["2"] > 0
    assert data["failures"]["bbob"]["cma"] == {"count": 0, "runs": 2, "first": None}
    assert data["targets"]["note"]  # no zoblackbox in this run
    bbob.write_markdown({**tiny, "command": "test"}, tmp_path / "t.md")
    assert "| separable |" in (tmp_path / "t.md").read_text()


def test_budget_wrapper_raises_past_budget():
    class P:
        def __call__(self, x):
            return float(sum(x))

    f = bbob._Counted(P(), 3)
    for _ in range(3):
        f([1.0, 2.0])
    with pytest.raises(bbob._BudgetSpent):
        f([1.0, 2.0])
    assert f.n == 3
    assert not issubclass(bbob._BudgetSpent, Exception)  # solvers' `except Exception` cannot swallow it


def test_fopt_matches_coco(tmp_path, monkeypatch):
    """The re-implemented f_opt against the Fopt the COCO observer writes (bbob and bbob-noisy)."""
    import cocoex
    import numpy as np

    monkeypatch.chdir(tmp_path)
    cocoex.log_level("warning")
    obs = cocoex.Observer("bbob", "result_folder: fopt algorithm_name: t")
    for suite, findex, fid in (("bbob", 4, 4), ("bbob", 18, 18), ("bbob", 24, 24), ("bbob-noisy", 7, 107)):
        coco_suite = cocoex.Suite(suite, "instances: 9", f"dimensions: 2 function_indices: {findex}")
        problem = coco_suite[0]  # the suite must outlive its problem
        problem.observe_with(obs)
        problem(np.zeros(2))
        problem.free()
        coco_suite.free()
    del obs
    logged = bbob.parse_observer(tmp_path / "exdata" / "fopt")
    assert len(logged) == 4
    for (fid, _dim, inst), block in logged.items():
        assert block["fopt"] == pytest.approx(bbob.fopt(fid, inst), abs=1e-9)


def test_first_hits():
    import numpy as np

    best = np.array([1e3, 50.0, 50.0, 1e-3, 5e-9])
    hits = bbob.first_hits(best)
    assert hits[0] == 2  # 1e2 reached at the 2nd evaluation
    assert hits[bbob.TARGET_EXPONENTS.index(-3.0)] == 4
    assert hits[-1] == 5
    assert bbob.first_hits(np.array([1.0]))[-1] is None
