"""Gymnasium policies: zoblackbox vs nevergrad (NGOpt) vs pycma (CMA-ES) at equal episode budgets.

Four tasks, each with a success threshold judged on **100 held-out episodes** (env seeds
``EVAL_SEED .. EVAL_SEED + 99``, never used for training or for choosing hyperparameters):

=========================  =========  ===========================  ===========  =============  ===========
task                       threshold  policy                       parameters   budget (eps.)  check every
=========================  =========  ===========================  ===========  =============  ===========
CartPole-v1                >= 475     linear, argmax of 2 outputs  8            1,000          batch
Acrobot-v1                 >= -100    linear, argmax of 3 outputs  18           2,000          16 episodes
MountainCarContinuous-v0   >= 90      linear, clipped              2            2,000          batch
Pendulum-v1                >= -200    MLP 3-16-1 tanh, tanh-scaled 81           20,000         200 episodes
=========================  =========  ===========================  ===========  =============  ===========

``--budget Pendulum-v1=10000`` halves the longest runs (the peers' unsolved Pendulum runs).

Every solver optimizes the same oracle: ``GymPolicyOracle(task, policy, episodes=1, seed=run seed,
obs_norm="running", max_episodes=budget)`` -- one training episode per query, all queries of a
batch on the same env seed (common random numbers), the same seed sequence for every solver of a
run seed. Solvers:

* ``zoblackbox``: ``minimize(oracle, x0, estimator=RandomEstimator(mu=nu, q=N, antithetic=True,
  top_b=b, fitness_shaping="std"), optimizer="sgd", lr=2 * nu * alpha)`` -- ARS V2-t (Mania et
  al. 2018) expressed with the library's estimator; N, b, alpha, nu per task (``ZO``).
* ``cma``: pycma ``CMAEvolutionStrategy(x0, sigma0)``, default population, each generation one
  oracle batch; the candidate is the distribution mean.
* ``nevergrad``: ``NGOpt`` (``num_workers=16``, budget in queries), asked and told 16 candidates
  per oracle batch; the candidate is its recommendation. NGOpt's own choice is recorded
  (``sub_optim``: CMA at these dimensions, MetaModel at d = 2; nevergrad 1.0.12's MetaModel needs
  a one-line numpy-2 compatibility shim, ``patch_nevergrad``).

All start from the same x0 (zeros for linear policies, the MLP's seeded initialization). Step sizes
(``ZO``, ``PEER_SIGMA``) were chosen with ``--tune`` (grids in ``TUNE_GRID``): run seeds from 100
and held-out seeds ``TUNE_EVAL_SEED ..`` that the benchmark never uses.

After a batch (an ARS iteration, a CMA generation, an NGOpt batch; on Acrobot and Pendulum the
first batch to end at or past each multiple of ``check_every`` episodes, the same rule for every
solver) the solver's candidate is checked on the held-out episodes, 5 at a time, stopping as soon as
the mean of 100 can no longer reach the threshold (each episode's return is at most
``max_return``), so the check is exact. Check episodes are counted apart (``eval_episodes``);
*episodes to threshold* are training episodes. Medians count an unsolved seed as +inf (null when the
median seed is unsolved).

Run:  python benchmarks/gym_policy.py            (5 seeds x 4 tasks x 3 solvers, 2 worker processes, ~18 min)
      python benchmarks/gym_policy.py --quick    (CartPole and MountainCarContinuous, 2 seeds, 12-45 s)
      python benchmarks/gym_policy.py --tune --seeds 100,101,102   (the grids on tuning seeds)
Writes benchmarks/results/gym_policy.json and gym_policy.png (``--quick``: gym_policy_quick.*;
``--out-dir``/``--name`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _common import RESULTS, machine_info, new_figure, warn_if_busy

from zoblackbox import RandomEstimator, minimize
from zoblackbox.adapters.gym import GymPolicyOracle, LinearPolicy, MLPPolicy

SOLVERS = ("zoblackbox", "nevergrad", "cma")
EVAL_SEED = 10_000_000  # held-out episodes of the benchmark
TUNE_EVAL_SEED = 20_000_000  # held-out episodes used by --tune only
TUNE_SEEDS = [100, 101, 102]
EVAL_EPISODES = 100
CHECK_CHUNK = 5

# check_every: the held-out check runs after the first batch that ends at or past the next
# multiple of this many training episodes (1: after every batch)
TASKS = {
    "CartPole-v1": {"threshold": 475.0, "max_return": 500.0, "policy": "linear", "budget": 1000,
                    "check_every": 1},
    "Acrobot-v1": {"threshold": -100.0, "max_return": 0.0, "policy": "linear", "budget": 2000,
                   "check_every": 16},
    "MountainCarContinuous-v0": {"threshold": 90.0, "max_return": 100.0, "policy": "linear", "budget": 2000,
                                 "check_every": 1},
    "Pendulum-v1": {"threshold": -200.0, "max_return": 0.0, "policy": "mlp16", "budget": 20000,
                    "check_every": 200},
}
# the step-size grids of --tune: three settings per solver and task
TUNE_GRID = {
    "zoblackbox": {
        # argmax of a linear policy from x0 = 0 is invariant to a common scale of alpha and nu:
        # only (N, b) and the ratio nu / alpha matter
        "CartPole-v1": [{"N": n, "b": b, "alpha": 0.02, "nu": 0.02 * r}
                        for n, b in ((1, 1), (2, 1), (4, 2), (8, 4)) for r in (0.5, 1, 2)],
        "Acrobot-v1": [{"N": n, "b": b, "alpha": 0.02, "nu": 0.02 * r}
                       for n, b in ((2, 1), (4, 2), (8, 4), (8, 2)) for r in (0.5, 1, 2)],
        "MountainCarContinuous-v0": [{"N": n, "b": b, "alpha": a, "nu": a}
                                     for n, b in ((1, 1), (2, 1), (2, 2), (4, 2)) for a in (0.02, 0.1, 0.5)],
        "Pendulum-v1": [{"N": 8, "b": 2, "alpha": a, "nu": nu} for a, nu in ((0.1, 0.5), (0.2, 0.5), (0.4, 1.0))],
    },
    "cma": {task: [0.1, 0.3, 1.0] for task in TASKS},
    "nevergrad": {task: [0.1, 0.3, 1.0] for task in TASKS},
}
# chosen by --tune (lowest median episodes to threshold on the tuning seeds, unsolved = +inf; ties:
# the higher median held-out return on the tuning held-out episodes). Tuning runs: 5 seeds for
# zoblackbox on CartPole/Acrobot/MountainCarContinuous (12 settings), 3 seeds otherwise; Pendulum
# with a 6,000-episode cap.
ZO = {
    "CartPole-v1": {"N": 4, "b": 2, "alpha": 0.02, "nu": 0.02},
    "Acrobot-v1": {"N": 4, "b": 2, "alpha": 0.02, "nu": 0.04},
    "MountainCarContinuous-v0": {"N": 1, "b": 1, "alpha": 0.5, "nu": 0.5},
    "Pendulum-v1": {"N": 8, "b": 2, "alpha": 0.2, "nu": 0.5},
}
# initial step size of the peers (CMA sigma0, NGOpt's Array mutation sigma)
# (on CartPole, Acrobot and MountainCarContinuous all three values gave the same episodes on every
# tuning seed: argmax policies from x0 = 0 are scale-invariant)
PEER_SIGMA = {
    "CartPole-v1": {"cma": 0.3, "nevergrad": 0.3},
    "Acrobot-v1": {"cma": 0.3, "nevergrad": 0.3},
    "MountainCarContinuous-v0": {"cma": 0.3, "nevergrad": 0.3},
    "Pendulum-v1": {"cma": 1.0, "nevergrad": 0.3},
}
QUICK_TASKS = ["CartPole-v1", "MountainCarContinuous-v0"]
NG_WORKERS = 16  # NGOpt's num_workers: it is asked and told 16 candidates per oracle batch


# --------------------------------------------------------------------------- the oracle
def make_policy(name: str):
    if name == "linear":
        return LinearPolicy()
    if name.startswith("mlp"):
        return MLPPolicy((int(name[3:]),))
    raise ValueError(f"unknown policy {name!r}")


def make_oracle(env_id: str, seed: int, budget: int) -> GymPolicyOracle:
    task = TASKS[env_id]
    return GymPolicyOracle(env_id, make_policy(task["policy"]), episodes=1, seed=seed, obs_norm="running",
                           max_episodes=budget)


class Checker:
    """The held-out success check, exact with early rejection; counts its episodes."""

    def __init__(self, oracle: GymPolicyOracle, task: dict, eval_seed: int):
        self.oracle, self.threshold, self.max_return = oracle, task["threshold"], task["max_return"]
        self.every, self.eval_seed = task["check_every"], eval_seed
        self.checks = 0
        self.last_mean = None  # held-out mean of the last check that ran all its episodes
        self.next_check = 0
        self.last_x = None

    def __call__(self, x) -> bool:
        if self.oracle.episodes < self.next_check:
            return False
        self.next_check = (self.oracle.episodes // self.every + 1) * self.every
        x = np.asarray(x, dtype=np.float64)
        if self.last_x is not None and np.array_equal(x, self.last_x) and self.oracle.obs_norm != "running":
            return False
        self.last_x = x.copy()
        self.checks += 1
        total = 0.0
        for start in range(0, EVAL_EPISODES, CHECK_CHUNK):
            ev = self.oracle.evaluate_policy(x, episodes=CHECK_CHUNK, seed=self.eval_seed + start)
            total += float(ev.returns.sum())
            left = EVAL_EPISODES - start - CHECK_CHUNK
            if total + left * self.max_return < self.threshold * EVAL_EPISODES:
                return False
        self.last_mean = total / EVAL_EPISODES
        return self.last_mean >= self.threshold


def final_mean(oracle: GymPolicyOracle, x, eval_seed: int) -> float:
    return oracle.evaluate_policy(np.asarray(x, dtype=np.float64), episodes=EVAL_EPISODES, seed=eval_seed).mean


# --------------------------------------------------------------------------- solvers
def run_zoblackbox(env_id, seed, budget, eval_seed, hp) -> dict:
    oracle = make_oracle(env_id, seed, budget)
    task = TASKS[env_id]
    check = Checker(oracle, task, eval_seed)
    x0 = oracle.actor.init_params(seed)
    est = RandomEstimator(mu=hp["nu"], q=hp["N"], antithetic=True, top_b=hp["b"], fitness_shaping="std",
                          seed=seed)
    hit = {}

    def callback(r):
        if check(r.x):
            hit.update(episodes=oracle.episodes, env_steps=oracle.env_steps, x=r.x)
            return True
        return False

    res = minimize(oracle, x0, estimator=est, optimizer="sgd", lr=2 * hp["nu"] * hp["alpha"],
                   budget=budget, callback=callback)
    return outcome(oracle, check, hit, res.x, eval_seed)


def run_cma(env_id, seed, budget, eval_seed, sigma) -> dict:
    import cma

    oracle = make_oracle(env_id, seed, budget)
    task = TASKS[env_id]
    check = Checker(oracle, task, eval_seed)
    x0 = oracle.actor.init_params(seed)
    es = cma.CMAEvolutionStrategy(x0, sigma, {"seed": seed + 1, "verbose": -9})
    hit = {}
    while oracle.episodes + es.popsize * oracle.k <= budget:
        X = es.ask()
        losses = oracle.evaluate(np.asarray(X)).numpy()
        es.tell(X, losses.tolist())
        if check(es.mean):
            hit.update(episodes=oracle.episodes, env_steps=oracle.env_steps, x=np.array(es.mean))
            break
    out = outcome(oracle, check, hit, es.mean, eval_seed)
    out["popsize"] = es.popsize
    return out


def patch_nevergrad() -> None:
    """nevergrad 1.0.12's MetaModel (NGOpt's choice at small d) calls ``float()`` on a length-1 array,
    an error since numpy 2.x; give that module a ``float`` that accepts it (no other change)."""
    import builtins

    from nevergrad.optimization import metamodel

    if not hasattr(metamodel, "float"):
        metamodel.float = lambda v: builtins.float(np.asarray(v).reshape(-1)[0])


def ngopt_batches(opt, oracle, workers: int, budget: int, check) -> tuple[dict, np.ndarray]:
    """Ask and tell NGOpt ``workers`` candidates per oracle batch until the episode budget or
    ``check(recommendation)`` is reached; returns (the hit: episodes, env_steps, x; the final
    recommendation). Shared with benchmarks/mujoco.py."""
    hit: dict = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while oracle.episodes + workers * oracle.k <= budget:
            cands = [opt.ask() for _ in range(workers)]
            losses = oracle.evaluate(np.stack([c.value for c in cands])).numpy()
            for c, v in zip(cands, losses):
                opt.tell(c, float(v))
            rec = opt.provide_recommendation().value
            if check(rec):
                hit.update(episodes=oracle.episodes, env_steps=oracle.env_steps, x=np.array(rec))
                break
        rec = opt.provide_recommendation().value
    return hit, np.array(rec)


def run_nevergrad(env_id, seed, budget, eval_seed, sigma, workers) -> dict:
    import nevergrad as ng

    patch_nevergrad()
    oracle = make_oracle(env_id, seed, budget)
    task = TASKS[env_id]
    check = Checker(oracle, task, eval_seed)
    x0 = oracle.actor.init_params(seed)
    param = ng.p.Array(init=x0).set_mutation(sigma=sigma)
    param.random_state = np.random.RandomState(seed + 2)
    opt = ng.optimizers.NGOpt(parametrization=param, budget=budget // oracle.k, num_workers=workers)
    hit, rec = ngopt_batches(opt, oracle, workers, budget, check)
    out = outcome(oracle, check, hit, rec, eval_seed)
    out["sub_optim"] = str(opt._info().get("sub-optim"))
    return out


def outcome(oracle, check: Checker, hit: dict, x_final, eval_seed: int) -> dict:
    solved = bool(hit)
    x = hit["x"] if solved else np.asarray(x_final, dtype=np.float64)
    return {
        "solved": solved,
        "episodes_to_threshold": hit.get("episodes"),
        "env_steps_to_threshold": hit.get("env_steps"),
        "episodes_used": oracle.episodes,
        "env_steps_used": oracle.env_steps,
        "checks": check.checks,
        "eval_episodes": oracle.eval_episodes,
        # held-out mean over the 100 episodes: of the solving candidate at its check (with the
        # observation statistics of that moment), else of the final candidate at the end
        "heldout_mean_return": check.last_mean if solved else final_mean(oracle, x, eval_seed),
    }


def run_job(job: dict) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    env_id, solver, seed, budget, eval_seed = job["task"], job["solver"], job["seed"], job["budget"], job["eval_seed"]
    if solver == "zoblackbox":
        out = run_zoblackbox(env_id, seed, budget, eval_seed, job["hp"])
    elif solver == "cma":
        out = run_cma(env_id, seed, budget, eval_seed, job["hp"])
    else:
        out = run_nevergrad(env_id, seed, budget, eval_seed, job["hp"], NG_WORKERS)
    out.update({"task": env_id, "solver": solver, "seed": seed, "budget": budget, "hp": job["hp"],
                "wall_s": time.perf_counter() - t0})
    return out


def run_jobs(jobs: list[dict], n_jobs: int, label: str = "") -> list[dict]:
    # longest first (by budget x episode length), so that the pool finishes together
    order = sorted(range(len(jobs)), key=lambda i: -jobs[i]["budget"] * (200 if "Pendulum" in jobs[i]["task"] else 1))
    results: list[dict | None] = [None] * len(jobs)
    t0 = time.perf_counter()
    ctx = mp.get_context("fork")
    with ctx.Pool(n_jobs, maxtasksperchild=1) as pool:
        futures = {i: pool.apply_async(run_job, (jobs[i],)) for i in order}
        for done, i in enumerate(order, 1):
            r = futures[i].get()
            results[i] = r
            eps = r["episodes_to_threshold"]
            print(f"{label}[{done}/{len(jobs)} {time.perf_counter() - t0:6.0f}s] {r['task']:<25} {r['solver']:<10} "
                  f"seed {r['seed']:<4} hp {r['hp']}: "
                  + (f"solved in {eps} episodes" if r["solved"] else f"not solved in {r['episodes_used']}")
                  + f" (held-out {r['heldout_mean_return']:.1f}, {r['wall_s']:.0f} s)", flush=True)
    return results


# --------------------------------------------------------------------------- summary
def summarize(runs: list[dict]) -> dict:
    """Per task and solver: solved seeds, medians (unsolved seeds count as +inf; null when the
    median is unsolved) and spread."""
    tasks: dict = {}
    for r in runs:
        tasks.setdefault(r["task"], {}).setdefault(r["solver"], []).append(r)
    out = {}
    for env_id, by_solver in tasks.items():
        out[env_id] = {}
        for solver, rs in by_solver.items():
            rs = sorted(rs, key=lambda r: r["seed"])
            eps = [r["episodes_to_threshold"] if r["solved"] else math.inf for r in rs]
            steps = [r["env_steps_to_threshold"] if r["solved"] else math.inf for r in rs]
            med_e, med_s = statistics.median(eps), statistics.median(steps)
            solved_e = [e for e in eps if math.isfinite(e)]
            out[env_id][solver] = {
                "solved_seeds": sum(r["solved"] for r in rs),
                "seeds": len(rs),
                "median_episodes_to_threshold": med_e if math.isfinite(med_e) else None,
                "median_env_steps": med_s if math.isfinite(med_s) else None,
                "episodes_to_threshold": [None if not math.isfinite(e) else e for e in eps],
                "env_steps_to_threshold": [None if not math.isfinite(s) else s for s in steps],
                "min_episodes": min(solved_e) if solved_e else None,
                "max_episodes": max(solved_e) if solved_e else None,
                "median_heldout_return": statistics.median(r["heldout_mean_return"] for r in rs),
                "median_eval_episodes": statistics.median(r["eval_episodes"] for r in rs),
                "median_wall_s": statistics.median(r["wall_s"] for r in rs),
                "budget": rs[0]["budget"],
                "hp": rs[0]["hp"],
                **({"sub_optim": sorted({r["sub_optim"] for r in rs})} if "sub_optim" in rs[0] else {}),
            }
    return out


TARGET_MEDIAN = {"CartPole-v1": 100, "Acrobot-v1": 500, "MountainCarContinuous-v0": 500, "Pendulum-v1": 20000}


def targets(summary: dict) -> dict:
    def med(env_id, solver):
        v = summary[env_id].get(solver, {}).get("median_episodes_to_threshold")
        return math.inf if v is None else v

    per_task, wins = {}, 0
    for env_id, by_solver in summary.items():
        zo = by_solver.get("zoblackbox")
        if zo is None:
            continue
        beats = all(med(env_id, "zoblackbox") < med(env_id, p) for p in ("nevergrad", "cma") if p in by_solver)
        wins += beats
        per_task[env_id] = {
            "solved_4_of_5": zo["solved_seeds"] >= math.ceil(0.8 * zo["seeds"]),
            "median_within_target": med(env_id, "zoblackbox") <= TARGET_MEDIAN[env_id],
            "target_median_episodes": TARGET_MEDIAN[env_id],
            "fewer_episodes_than_nevergrad_and_cma": beats,
        }
    return {"per_task": per_task, "tasks_won_vs_peers": wins,
            "won_at_least_3_of_4": wins >= 3 if len(per_task) == 4 else None,
            "all_met": (len(per_task) == 4 and wins >= 3
                        and all(t["solved_4_of_5"] and t["median_within_target"] for t in per_task.values()))}


def plot(result: dict, name: str, out_dir: Path) -> Path:
    summary = result["tasks"]
    envs = list(summary)
    fig, axes = new_figure(ncols=len(envs), width=3.6, height=3.6)
    axes = np.atleast_1d(axes)
    colors = {"zoblackbox": "#4c72b0", "nevergrad": "#55a868", "cma": "#c44e52"}
    for ax, env_id in zip(axes, envs):
        for j, solver in enumerate(SOLVERS):
            s = summary[env_id].get(solver)
            if s is None:
                continue
            ys = [e if e is not None else s["budget"] for e in s["episodes_to_threshold"]]
            solved = [e is not None for e in s["episodes_to_threshold"]]
            xs = j + np.linspace(-0.15, 0.15, len(ys))
            ax.scatter(xs[solved], np.array(ys)[solved], color=colors[solver], s=18)
            ax.scatter(xs[~np.array(solved)], np.array(ys)[~np.array(solved)], color=colors[solver], marker="x", s=24)
            if s["median_episodes_to_threshold"] is not None:
                ax.hlines(s["median_episodes_to_threshold"], j - 0.3, j + 0.3, color=colors[solver])
        ax.axhline(summary[env_id]["zoblackbox"]["budget"] if "zoblackbox" in summary[env_id] else 0,
                   color="#999999", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xticks(range(len(SOLVERS)), SOLVERS, fontsize=8)
        ax.set_title(env_id, fontsize=9)
        ax.set_ylabel("training episodes to threshold" if ax is axes[0] else "")
    fig.suptitle("episodes to threshold (dots; x = unsolved at the budget, dotted line), median bars", fontsize=9)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


# --------------------------------------------------------------------------- main
def parse_list(text: str, cast=int):
    return [cast(v) for v in text.split(",") if v.strip()]


def tune(args) -> dict:
    """The step-size grid on tuning seeds and tuning held-out episodes; picks the lowest median."""
    jobs = []
    for env_id in args.tasks:
        budget = args.budget.get(env_id, TASKS[env_id]["budget"])
        for solver in args.solvers:
            for hp in TUNE_GRID[solver][env_id]:
                for seed in args.seeds:
                    jobs.append({"task": env_id, "solver": solver, "seed": seed, "budget": budget,
                                 "eval_seed": TUNE_EVAL_SEED, "hp": hp})
    runs = run_jobs(jobs, args.jobs, "tune ")
    table = {}
    for r in runs:
        key = (r["task"], r["solver"], json.dumps(r["hp"], sort_keys=True))
        table.setdefault(key, []).append((r["episodes_to_threshold"] if r["solved"] else math.inf,
                                          r["heldout_mean_return"]))
    best = {}
    for (env_id, solver, hp), rs in table.items():
        m = statistics.median(e for e, _ in rs)
        ret = statistics.median(h for _, h in rs)
        print(f"tune {env_id:<25} {solver:<10} {hp}: median {m}, {[e for e, _ in rs]}, held-out {ret:.1f}")
        if (env_id, solver) not in best or (m, -ret) < best[(env_id, solver)][:2]:
            best[(env_id, solver)] = (m, -ret, json.loads(hp))
    return {"runs": runs, "best": {f"{e}/{s}": {"median": m, "hp": hp} for (e, s), (m, _, hp) in best.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CartPole and MountainCarContinuous, seeds 0,1 (~1 min)")
    ap.add_argument("--tasks", type=lambda t: parse_list(t, str), default=None, help="comma-separated env ids")
    ap.add_argument("--solvers", type=lambda t: parse_list(t, str), default=list(SOLVERS))
    ap.add_argument("--seeds", type=parse_list, default=None, help="run seeds (default 0,1,2,3,4)")
    ap.add_argument("--budget", action="append", default=[], metavar="ENV=EPISODES",
                    help="override a task's episode budget (repeatable)")
    ap.add_argument("--jobs", type=int, default=2, help="worker processes (default 2; 1 torch thread each)")
    ap.add_argument("--tune", action="store_true", help="run the step-size grid on the tuning seeds")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--name", default=None, help="file name stem (default gym_policy; gym_policy_quick with --quick)")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = ap.parse_args(argv)
    args.name = args.name or ("gym_policy_quick" if args.quick else "gym_policy")
    if args.plot_only:
        result = json.loads((args.out_dir / f"{args.name}.json").read_text())
        print(f"wrote {plot(result, args.name, args.out_dir)}")
        return result
    args.tasks = args.tasks or (QUICK_TASKS if args.quick else list(TASKS))
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; known {list(TASKS)}")
    bad = [s for s in args.solvers if s not in SOLVERS]
    if bad:
        raise SystemExit(f"--solvers: unknown {bad}; known {list(SOLVERS)}")
    budgets = {}
    for item in args.budget:
        env_id, _, n = item.partition("=")
        if env_id not in TASKS or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--budget: expected ENV=EPISODES with a known env id, got {item!r}")
        budgets[env_id] = int(n)
    args.budget = budgets
    if args.seeds is None:
        args.seeds = TUNE_SEEDS if args.tune else ([0, 1] if args.quick else [0, 1, 2, 3, 4])
    if args.tune and set(args.seeds) & {0, 1, 2, 3, 4}:
        raise SystemExit("--tune must not use the benchmark's run seeds 0-4")
    if args.jobs < 1:
        raise SystemExit("--jobs must be >= 1")
    torch.set_num_threads(1)
    warn_if_busy()
    t0 = time.perf_counter()
    if args.tune:
        out = tune(args)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        path = args.out_dir / f"{args.name}_tune.json"
        path.write_text(json.dumps({**out, "machine": machine_info(), "runtime_s": time.perf_counter() - t0},
                                   indent=2) + "\n")
        print(f"wrote {path}")
        return out

    jobs = []
    for env_id in args.tasks:
        budget = args.budget.get(env_id, TASKS[env_id]["budget"])
        for solver in args.solvers:
            hp = ZO[env_id] if solver == "zoblackbox" else PEER_SIGMA[env_id][solver]
            for seed in args.seeds:
                jobs.append({"task": env_id, "solver": solver, "seed": seed, "budget": budget,
                             "eval_seed": EVAL_SEED, "hp": hp})
    runs = run_jobs(jobs, args.jobs)
    runtime = time.perf_counter() - t0
    summary = summarize(runs)
    result = {
        "benchmark": "gym_policy",
        "command": " ".join(["python benchmarks/gym_policy.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "tasks": summary,
        "targets": targets(summary),
        "setup": {
            "tasks": {e: TASKS[e] for e in args.tasks},
            "zoblackbox": {"estimator": "RandomEstimator(mu=nu, q=N, antithetic=True, top_b=b, "
                                        "fitness_shaping='std') + SGD lr = 2 nu alpha (ARS V2-t)", "hp": ZO},
            "cma": "pycma CMAEvolutionStrategy(x0, sigma0), default popsize, candidate = mean",
            "nevergrad": "NGOpt(Array(init=x0).set_mutation(sigma), budget, num_workers=2N), candidate = "
                         "recommendation",
            "peer_sigma": PEER_SIGMA,
            "episodes_per_query": 1, "obs_norm": "running",
            "eval": {"episodes": EVAL_EPISODES, "seeds": f"{EVAL_SEED}..{EVAL_SEED + EVAL_EPISODES - 1}",
                     "check": "after every batch, exact early rejection, check episodes not counted as training"},
            "median_rule": "unsolved seeds count as +inf; null when the median seed is unsolved",
            "seeds": args.seeds,
        },
        "runs": runs,
        "runtime_s": runtime,
        "jobs": args.jobs,
        "machine": machine_info(),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    png = plot(result, args.name, args.out_dir)
    print_table(summary)
    print(f"targets: {json.dumps(result['targets'], indent=1)}")
    print(f"total {runtime:.0f} s ({args.jobs} jobs, load {os.getloadavg()[0]:.1f}); wrote {path} and {png}")
    return result


def print_table(summary: dict) -> None:
    print(f"{'task':<25} {'solver':<10} {'solved':>6} {'median eps':>10} {'range':>13} {'median steps':>12}")
    for env_id, by_solver in summary.items():
        for solver in SOLVERS:
            s = by_solver.get(solver)
            if s is None:
                continue
            rng = f"{s['min_episodes']}-{s['max_episodes']}" if s["min_episodes"] is not None else "-"
            print(f"{env_id:<25} {solver:<10} {s['solved_seeds']}/{s['seeds']:<4} "
                  f"{s['median_episodes_to_threshold']!s:>10} {rng:>13} {s['median_env_steps']!s:>12}")


if __name__ == "__main__":
    main()
