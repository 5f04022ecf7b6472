"""benchmarks/mujoco.py: the env-steps comparison, the check interval and the JSON summary (small runs)."""

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.append(str(BENCH))  # appended: benchmarks/mujoco.py must not shadow the mujoco package
_spec = importlib.util.spec_from_file_location("zoblackbox_mujoco_bench", BENCH / "mujoco.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def test_the_mujoco_package_is_not_shadowed():
    import mujoco

    assert hasattr(mujoco, "MjModel") and not mujoco.__file__.startswith(str(BENCH))


def test_speed_compares_the_same_episodes():
    s = bench.speed("Swimmer-v5", episodes=2, rounds=1)
    assert s["env_steps_per_round"] == 2000  # two full Swimmer episodes in each loop
    assert s["library_steps_per_s"] > 0 and s["plain_steps_per_s"] > 0
    assert s["ratio"] == pytest.approx(s["library_steps_per_s"] / s["plain_steps_per_s"])


def test_a_run_checks_at_the_papers_interval_and_counts_training_episodes_only(monkeypatch):
    make = bench.make_oracle
    monkeypatch.setattr(bench, "make_oracle", lambda *a: _short(make(*a)))
    monkeypatch.setattr(bench, "CONFIRM_EPISODES", 2)
    monkeypatch.setitem(bench.TASKS, "Swimmer-v5", {**bench.TASKS["Swimmer-v5"], "threshold": -math.inf})
    r = bench.run_job({"task": "Swimmer-v5", "solver": "zoblackbox", "seed": 0, "budget": 100})
    # 2 episodes per iteration: the first check follows the 10th iteration (20 episodes, as in ARS);
    # minimize's final evaluation of the result (one episode) comes after the check
    assert r["solved"] and r["episodes_to_threshold"] == 20 and r["episodes_used"] in (20, 21)
    assert r["eval_episodes"] == bench.CHECK_EPISODES + 2
    assert len(r["curve"]) == 1 and r["curve"][0][0] == 20


def _short(oracle):
    """The same oracle with 20-step episodes (a small, fast run)."""
    from zoblackbox.adapters.gym import GymPolicyOracle, LinearPolicy

    return GymPolicyOracle(oracle.env_id, LinearPolicy(), episodes=1, seed=oracle.seed, obs_norm="running",
                           reward_shift=oracle.reward_shift, max_episodes=oracle.max_episodes, max_episode_steps=20)


def _run(task, solver, seed, eps):
    return {"task": task, "solver": solver, "seed": seed, "budget": 5920, "solved": eps is not None,
            "episodes_to_threshold": eps, "episodes_used": eps or 5905, "env_steps_used": 1, "eval_episodes": 10,
            "curve": [[160, 100.0, 50.0]], "best_heldout_mean": 100.0, "confirm_mean_100": None, "wall_s": 1.0}


def test_summary_medians_count_unreached_seeds_as_infinite():
    runs = [_run("Hopper-v5", "zoblackbox", s, e) for s, e in enumerate([None, 1600, 4640, 1800, None])]
    runs += [_run("Hopper-v5", "cma", s, None) for s in range(3)]
    summary = bench.summarize(runs, {t: v["budget"] for t, v in bench.TASKS.items()})
    h = summary["Hopper-v5"]
    assert h["episodes_per_seed"] == [None, 1600, 4640, 1800, None]
    assert h["median"] == 4640 and h["paper_episodes"] == 1973 and h["threshold"] == 3120.0
    assert h["reached_within_3x_paper"] == 3
    assert h["peers"] == {"cma": [None, None, None]} and h["peer_detail"]["cma"]["median"] is None
    t = bench.targets(summary)["Hopper-v5"]
    assert t == {"median_le_paper": False, "at_least_4_of_5_within_3x": False, "budget_covers_3x": True}
    runs[0] = _run("Hopper-v5", "zoblackbox", 0, 1700)
    t = bench.targets(bench.summarize(runs, {t: v["budget"] for t, v in bench.TASKS.items()}))["Hopper-v5"]
    assert t["median_le_paper"] and t["at_least_4_of_5_within_3x"]
    assert np.isfinite(summary["Hopper-v5"]["budget_vs_paper"])
