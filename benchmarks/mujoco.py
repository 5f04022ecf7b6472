"""MuJoCo locomotion: the ARS paper's Table 1 with the library's ARS V2-t preset, and peers.

Mania, Guy & Recht (2018), "Simple random search provides a competitive approach to reinforcement
learning" (arXiv:1803.07055v1), Table 1 reports the average number of episodes ARS V2-t needed to
reach a reward threshold on the MuJoCo locomotion tasks (3 seeds; their hyper-parameters are those
of the paper's ARS V2-t hyper-parameter table and are used here unchanged):

=============  =========  ==================  ===  ===  =====  =====  =====  =======================
task           threshold  paper ARS V2-t eps.  N    b   alpha   nu    shift  budget here (episodes)
=============  =========  ==================  ===  ===  =====  =====  =====  =======================
Swimmer-v5     325        427                 1    1    0.02   0.01   0      1,280 (3x the paper)
Hopper-v5      3120       1,973               8    4    0.01   0.025  1      5,920 (3x)
HalfCheetah-v5 3430       1,707               32   4    0.02   0.03   0      5,120 (3x)
Walker2d-v5    4390       24,000              40   30   0.03   0.025  1      4,000 (smaller, 1/6 of the paper)
Ant-v5         3580       20,800              60   20   0.015  0.025  1      2,400 (smaller, 1/9 of the paper)
=============  =========  ==================  ===  ===  =====  =====  =====  =======================

The paper's numbers are multiples of its check interval (10 iterations = 20 N episodes, averaged
over 3 seeds), which is the interval used here. The paper used gym 0.9.3's ``-v1`` tasks (MuJoCo
1.31); these are gymnasium's ``-v5`` tasks (MuJoCo 3+). Walker2d and Ant need tens of thousands of
episodes (tens of millions of env steps): at about 3-4 thousand env steps per second and core here,
their 3x budgets would take hours per seed, so they run with the smaller budgets above and report
the learning curve.

ARS (``zoblackbox``): ``minimize(oracle, zeros, **ars_v2t(N, b, alpha, nu, seed=seed))`` on
``GymPolicyOracle(task, LinearPolicy(), episodes=1, seed=seed, obs_norm="running",
reward_shift=shift, max_episodes=budget)``: a linear policy without bias on running-normalised
observations (ARS V2), training returns shifted by ``shift`` per step (the paper's survival-bonus
shift on Hopper, Walker2d and Ant), all 2N rollouts of an iteration on one env seed (CRN).

Peers (Swimmer, Hopper, HalfCheetah), on the same oracle and budget of episodes:

* ``cma``: pycma ``CMAEvolutionStrategy(zeros, 0.1)``, default population, one oracle batch per
  generation; the candidate is the distribution mean.
* ``nevergrad``: ``NGOpt(Array(init=zeros), budget=budget, num_workers=16)``, default mutation
  scale, asked and told 16 candidates per batch; the candidate is its recommendation.

sigma0 = 0.1 for CMA-ES was set a priori (weights of a linear map from unit-scale normalised
observations to actions in [-1, 1]), not tuned; NGOpt runs with its defaults.

Held-out checks: after the first batch that ends at or past each multiple of the check interval,
the candidate runs 10 held-out episodes (env seeds ``EVAL_SEED ..``, never used for training) with
the true reward (no shift) and the current observation statistics; *episodes to threshold* counts
training episodes only. A run stops at its first check whose mean reaches the threshold; the
solving policy is then confirmed on 100 other held-out episodes (reported, not used to stop).

Env steps per second: the library's rollouts (``GymPolicyOracle.evaluate`` of a batch of 48
queries, vector environment) against a plain gymnasium loop (one ``gym.make`` env, ``reset(seed)``,
``step(clip(W obs))``) on the same 48 episodes of ARS's starting policy ``W = 0`` (equal returns
checked), environments made before timing, medians of 5 interleaved rounds after a warm-up round.

Every finished run is appended to ``results/mujoco_runs.jsonl`` (one line per task, solver, seed,
budget) and the JSON keeps the runs of earlier invocations, so the benchmark can be run in parts;
``--resume`` reuses recorded runs instead of running them again (by default everything named runs);
``--fresh`` starts the JSON afresh.

Run:  python benchmarks/mujoco.py                      (everything: ~6 h on 2 cores)
      python benchmarks/mujoco.py --tasks Hopper-v5 --solvers zoblackbox
      python benchmarks/mujoco.py --quick              (Swimmer only, ~5 min)
      python benchmarks/mujoco.py --speed-only         (the env-steps-per-second table)
Writes benchmarks/results/mujoco.json and mujoco.png (``--quick``: mujoco_quick.*).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path

# this file is named like the mujoco package: run as a script, its folder comes first on sys.path and
# gymnasium's ``import mujoco`` would find this file. Import the real package first, with the folder
# moved to the end of sys.path (where _common and gym_policy are still found).
_HERE = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]
if __name__ == "__main__" or "mujoco" not in sys.modules:
    try:
        _mj = importlib.import_module("mujoco")
    except ImportError:  # GymPolicyOracle then raises MissingDependencyError naming the gym extra
        _mj = None
    if __name__ == "__main__" and _mj is not None and hasattr(_mj, "set_mju_user_warning"):
        # gymnasium's HalfCheetah XML uses an attribute MuJoCo 4 deprecates: MuJoCo would print (and
        # write to MUJOCO_LOG.TXT) one warning per environment made; say it once, pass others through
        _seen: set = set()

        def _mujoco_warning(msg: str) -> None:
            key = "settotalmass" if "settotalmass" in msg else msg
            if key not in _seen:
                _seen.add(key)
                print(f"MuJoCo warning (shown once): {msg.strip()}", file=sys.stderr)

        _mj.set_mju_user_warning(_mujoco_warning)

import numpy as np
import torch
from _common import RESULTS, machine_info, new_figure, warn_if_busy
from gym_policy import ngopt_batches, patch_nevergrad

from zoblackbox import minimize
from zoblackbox.adapters.gym import GymPolicyOracle, LinearPolicy, import_gymnasium
from zoblackbox.presets import ars_v2t

SOLVERS = ("zoblackbox", "nevergrad", "cma")
# ablation (only when named in --solvers): ARS with every rollout from its own start state, as ARS's
# workers run, instead of the oracle's common random numbers
ABLATIONS = ("ars-own-seeds",)
EVAL_SEED = 10_000_000  # the checks' held-out episodes
CONFIRM_SEED = 11_000_000  # the 100 confirmation episodes of a solving policy
CHECK_EPISODES = 10
CONFIRM_EPISODES = 100
PAPER = "Mania, Guy & Recht 2018, arXiv:1803.07055v1, Table 1 (ARS V2-t column)"
TASKS = {
    "Swimmer-v5": {"threshold": 325.0, "paper_episodes": 427, "N": 1, "b": 1, "alpha": 0.02, "nu": 0.01,
                   "shift": 0.0, "budget": 1280, "peers": True},
    "Hopper-v5": {"threshold": 3120.0, "paper_episodes": 1973, "N": 8, "b": 4, "alpha": 0.01, "nu": 0.025,
                  "shift": 1.0, "budget": 5920, "peers": True},
    "HalfCheetah-v5": {"threshold": 3430.0, "paper_episodes": 1707, "N": 32, "b": 4, "alpha": 0.02, "nu": 0.03,
                       "shift": 0.0, "budget": 5120, "peers": True},
    "Walker2d-v5": {"threshold": 4390.0, "paper_episodes": 24000, "N": 40, "b": 30, "alpha": 0.03, "nu": 0.025,
                    "shift": 1.0, "budget": 4000, "peers": False},
    "Ant-v5": {"threshold": 3580.0, "paper_episodes": 20800, "N": 60, "b": 20, "alpha": 0.015, "nu": 0.025,
               "shift": 1.0, "budget": 2400, "peers": False},
}
CMA_SIGMA0 = 0.1
NG_WORKERS = 16
QUICK = {"tasks": ["Swimmer-v5"], "seeds": [0, 1], "peer_seeds": [0], "budget": {"Swimmer-v5": 640}}


def check_every(task: dict) -> int:
    """The paper's interval: 10 ARS iterations of 2N episodes."""
    return 20 * task["N"]


def make_oracle(env_id: str, seed: int, budget: int, shift: float, common_seeds: bool = True) -> GymPolicyOracle:
    return GymPolicyOracle(env_id, LinearPolicy(), episodes=1, seed=seed, obs_norm="running",
                           reward_shift=shift, max_episodes=budget, common_seeds=common_seeds)


class Checker:
    """Held-out checks at a fixed interval of training episodes; records the learning curve."""

    def __init__(self, oracle: GymPolicyOracle, task: dict):
        self.oracle, self.threshold, self.every = oracle, task["threshold"], check_every(task)
        self.next_check = self.every
        self.curve: list[list[float]] = []  # [training episodes, held-out mean, mean length]

    def __call__(self, x) -> bool:
        if self.oracle.episodes < self.next_check:
            return False
        self.next_check = (self.oracle.episodes // self.every + 1) * self.every
        ev = self.oracle.evaluate_policy(np.asarray(x, dtype=np.float64), episodes=CHECK_EPISODES, seed=EVAL_SEED)
        self.curve.append([self.oracle.episodes, ev.mean, float(np.mean(ev.lengths))])
        return ev.mean >= self.threshold


def run_zoblackbox(env_id: str, seed: int, budget: int,
                   common_seeds: bool = True) -> tuple[GymPolicyOracle, Checker, dict, np.ndarray]:
    task = TASKS[env_id]
    oracle = make_oracle(env_id, seed, budget, task["shift"], common_seeds)
    check = Checker(oracle, task)
    hit: dict = {}

    def callback(r):
        if check(r.x):
            hit.update(episodes=oracle.episodes, env_steps=oracle.env_steps, x=np.array(r.x))
            return True
        return False

    res = minimize(oracle, np.zeros(oracle.dim), budget=budget, callback=callback,
                   **ars_v2t(task["N"], task["b"], task["alpha"], task["nu"], seed=seed))
    return oracle, check, hit, np.asarray(res.x)


def run_cma(env_id: str, seed: int, budget: int):
    import cma

    task = TASKS[env_id]
    oracle = make_oracle(env_id, seed, budget, task["shift"])
    check = Checker(oracle, task)
    es = cma.CMAEvolutionStrategy(np.zeros(oracle.dim), CMA_SIGMA0, {"seed": seed + 1, "verbose": -9})
    hit: dict = {}
    while oracle.episodes + es.popsize <= budget:
        X = es.ask()
        es.tell(X, oracle.evaluate(np.asarray(X)).numpy().tolist())
        if check(es.mean):
            hit.update(episodes=oracle.episodes, env_steps=oracle.env_steps, x=np.array(es.mean))
            break
    return oracle, check, hit, np.array(es.mean)


def run_nevergrad(env_id: str, seed: int, budget: int):
    import nevergrad as ng

    patch_nevergrad()
    task = TASKS[env_id]
    oracle = make_oracle(env_id, seed, budget, task["shift"])
    check = Checker(oracle, task)
    param = ng.p.Array(init=np.zeros(oracle.dim))
    param.random_state = np.random.RandomState(seed + 2)
    opt = ng.optimizers.NGOpt(parametrization=param, budget=budget, num_workers=NG_WORKERS)
    hit, rec = ngopt_batches(opt, oracle, NG_WORKERS, budget, check)
    return oracle, check, hit, rec, str(opt._info().get("sub-optim"))


def run_job(job: dict) -> dict:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    env_id, solver, seed, budget = job["task"], job["solver"], job["seed"], job["budget"]
    extra = {}
    if solver in ("zoblackbox", "ars-own-seeds"):
        oracle, check, hit, x = run_zoblackbox(env_id, seed, budget, common_seeds=solver == "zoblackbox")
    elif solver == "cma":
        oracle, check, hit, x = run_cma(env_id, seed, budget)
    else:
        oracle, check, hit, x, extra["sub_optim"] = run_nevergrad(env_id, seed, budget)
    solved = bool(hit)
    confirm = final = None
    if solved:  # the solving policy on 100 other held-out episodes (reported only)
        confirm = oracle.evaluate_policy(hit["x"], episodes=CONFIRM_EPISODES, seed=CONFIRM_SEED).mean
    else:  # where the run ended: the final candidate on the checks' held-out episodes
        final = oracle.evaluate_policy(x, episodes=CHECK_EPISODES, seed=EVAL_SEED).mean
    return {
        "task": env_id, "solver": solver, "seed": seed, "budget": budget,
        "solved": solved,
        "episodes_to_threshold": hit.get("episodes"),
        "env_steps_to_threshold": hit.get("env_steps"),
        "episodes_used": oracle.episodes,
        "env_steps_used": oracle.env_steps,
        "eval_episodes": oracle.eval_episodes,
        "curve": check.curve,
        "best_heldout_mean": max((c[1] for c in check.curve), default=None),
        "confirm_mean_100": confirm,
        "final_heldout_mean": final,
        "wall_s": time.perf_counter() - t0,
        "env_steps_per_s": oracle.env_steps / max(time.perf_counter() - t0, 1e-9),
        **extra,
    }


# --------------------------------------------------------------------------- the run cache
def cache_key(job: dict) -> str:
    return f"{job['task']}|{job['solver']}|{job['seed']}|{job['budget']}"


def load_cache(path: Path) -> dict:
    out = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[cache_key(r)] = r
    return out


def run_jobs(jobs: list[dict], n_jobs: int, cache_path: Path | None, resume: bool = False) -> list[dict]:
    """Run the jobs (2 processes); every finished run is appended to ``cache_path``; with ``resume``
    the runs already recorded there are reused instead of run again."""
    cached = load_cache(cache_path) if cache_path is not None and resume else {}
    results = {cache_key(j): cached[cache_key(j)] for j in jobs if cache_key(j) in cached}
    todo = [j for j in jobs if cache_key(j) not in results]
    if results:
        print(f"{len(results)} runs from the cache {cache_path}, {len(todo)} to run", flush=True)
    t0 = time.perf_counter()
    ctx = mp.get_context("fork")
    with ctx.Pool(max(1, min(n_jobs, len(todo) or 1)), maxtasksperchild=1) as pool:
        futures = [(j, pool.apply_async(run_job, (j,))) for j in todo]
        for done, (j, fut) in enumerate(futures, 1):
            r = fut.get()
            results[cache_key(j)] = r
            if cache_path is not None:
                with cache_path.open("a") as f:
                    f.write(json.dumps(r) + "\n")
            eps = r["episodes_to_threshold"]
            print(f"[{done}/{len(todo)} {time.perf_counter() - t0:6.0f}s] {r['task']:<15} {r['solver']:<10} "
                  f"seed {r['seed']}: " + (f"threshold in {eps} episodes" if r["solved"]
                                           else f"not reached in {r['episodes_used']}")
                  + f" (best held-out {r['best_heldout_mean']}, {r['wall_s']:.0f} s)", flush=True)
    return [results[cache_key(j)] for j in jobs]


# --------------------------------------------------------------------------- env steps per second
def plain_loop(env, W: np.ndarray, seeds: list[int]) -> tuple[np.ndarray, int]:
    """The reference: one gymnasium env, ``reset(seed)``, ``step(clip(W obs))`` until the episode ends."""
    low, high, dtype = env.action_space.low, env.action_space.high, env.action_space.dtype
    returns, steps = [], 0
    for s in seeds:
        obs, _ = env.reset(seed=s)
        total, done = 0.0, False
        while not done:
            obs, r, term, trunc, _ = env.step(np.clip(W @ obs, low, high).astype(dtype))
            total += float(r)
            steps += 1
            done = term or trunc
        returns.append(total)
    return np.array(returns), steps


def speed(env_id: str, episodes: int = 48, rounds: int = 5) -> dict:
    """Env steps per second: the oracle's batch rollouts vs the plain loop on the same episodes (the
    same linear policy and env seeds; equal returns checked). Environments are made before timing;
    one untimed warm-up round; medians over interleaved rounds."""
    gym = import_gymnasium()
    oracle = GymPolicyOracle(env_id, LinearPolicy(), episodes=1, seed=0)
    env = gym.make(env_id)
    W = np.zeros(oracle.dim)  # ARS's starting policy: full-length episodes on Swimmer, HalfCheetah and Ant
    X = np.repeat(W[None], episodes, axis=0)
    Wm = W.reshape(oracle.actor.act_dim, oracle.actor.obs_dim)
    lib, ref = [], []
    for rnd in range(rounds + 1):
        seeds = [oracle.episode_seeds()[0]] * episodes  # the CRN batch: every query on the batch's seed
        steps0 = oracle.env_steps
        t = time.perf_counter()
        losses = oracle.evaluate(X).numpy()
        t_lib = time.perf_counter() - t
        t = time.perf_counter()
        returns, steps = plain_loop(env, Wm, seeds)
        t_ref = time.perf_counter() - t
        if not np.allclose(-losses, returns, rtol=1e-12, atol=1e-9) or steps != oracle.env_steps - steps0:
            raise RuntimeError(f"{env_id}: the oracle's returns {-losses[:3]} differ from the plain loop's "
                               f"{returns[:3]}")
        if rnd:  # round 0 warms up (the oracle makes its environments there)
            lib.append(steps / t_lib)
            ref.append(steps / t_ref)
    oracle.close()
    env.close()
    lib_m, ref_m = statistics.median(lib), statistics.median(ref)
    return {"library_steps_per_s": lib_m, "plain_steps_per_s": ref_m, "ratio": lib_m / ref_m,
            "ratio_per_round": [a / b for a, b in zip(lib, ref)], "episodes_per_round": episodes,
            "env_steps_per_round": steps, "rounds": rounds, "per_round_library": lib, "per_round_plain": ref}


# --------------------------------------------------------------------------- summary
def _median(values: list) -> float | None:
    m = statistics.median([math.inf if v is None else v for v in values])
    return None if not math.isfinite(m) else m


def summarize(runs: list[dict], budgets: dict) -> dict:
    out = {}
    for env_id, task in TASKS.items():
        rs = [r for r in runs if r["task"] == env_id]
        if not rs:
            continue
        by = {s: sorted((r for r in rs if r["solver"] == s), key=lambda r: r["seed"]) for s in SOLVERS + ABLATIONS}
        zo = by["zoblackbox"]
        eps = [r["episodes_to_threshold"] for r in zo]
        paper = task["paper_episodes"]
        entry = {
            "threshold": task["threshold"],
            "paper_episodes": paper,
            "episodes_per_seed": eps,
            "median": _median(eps) if zo else None,
            "peers": {s: [r["episodes_to_threshold"] for r in by[s]] for s in ("nevergrad", "cma") if by[s]},
            "seeds": [r["seed"] for r in zo],
            "budget": budgets[env_id],
            "budget_vs_paper": budgets[env_id] / paper,
            "hp": {k: task[k] for k in ("N", "b", "alpha", "nu", "shift")},
            "check_every_episodes": check_every(task),
            "reached_within_3x_paper": sum(e is not None and e <= 3 * paper for e in eps),
            "best_heldout_mean": [r["best_heldout_mean"] for r in zo],
            "confirm_mean_100": [r["confirm_mean_100"] for r in zo],
            "wall_s": [r["wall_s"] for r in zo],
            "env_steps_used": [r["env_steps_used"] for r in zo],
            "peer_detail": {s: {"seeds": [r["seed"] for r in by[s]],
                                "best_heldout_mean": [r["best_heldout_mean"] for r in by[s]],
                                "median": _median([r["episodes_to_threshold"] for r in by[s]]),
                                **({"sub_optim": sorted({r.get("sub_optim") for r in by[s]})}
                                   if s == "nevergrad" else {})}
                            for s in ("nevergrad", "cma") if by[s]},
            "ablation": {s: {"seeds": [r["seed"] for r in by[s]],
                             "episodes_per_seed": [r["episodes_to_threshold"] for r in by[s]],
                             "median": _median([r["episodes_to_threshold"] for r in by[s]]),
                             "best_heldout_mean": [r["best_heldout_mean"] for r in by[s]]}
                         for s in ABLATIONS if by[s]},
        }
        out[env_id] = entry
    return out


def targets(summary: dict) -> dict:
    per = {}
    for env_id, t in summary.items():
        paper = t["paper_episodes"]
        med = t["median"]
        per[env_id] = {
            "median_le_paper": None if env_id not in ("Swimmer-v5", "Hopper-v5", "HalfCheetah-v5")
            else (med is not None and med <= paper),
            "at_least_4_of_5_within_3x": t["reached_within_3x_paper"] >= 4 and len(t["episodes_per_seed"]) >= 5,
            "budget_covers_3x": t["budget"] >= 3 * paper - check_every(TASKS[env_id]),
        }
    return per


def plot(result: dict, path: Path) -> Path:
    summary = result["tasks"]
    runs = result["runs"]
    envs = list(summary)
    fig, axes = new_figure(ncols=len(envs), width=3.6, height=3.4)
    axes = np.atleast_1d(axes)
    colors = {"zoblackbox": "#4c72b0", "nevergrad": "#55a868", "cma": "#c44e52"}
    for ax, env_id in zip(axes, envs):
        for r in runs:
            if r["task"] != env_id or not r["curve"] or r["solver"] not in colors:
                continue
            c = np.array(r["curve"])
            ax.plot(c[:, 0], c[:, 1], color=colors[r["solver"]], lw=1, alpha=0.8,
                    label=r["solver"] if r["seed"] == summary[env_id]["seeds"][0] else None)
        t = summary[env_id]
        ax.axhline(t["threshold"], color="#333333", ls="--", lw=0.8)
        ax.axvline(t["paper_episodes"], color="#999999", ls=":", lw=1)
        ax.set_title(f"{env_id} (paper: {t['paper_episodes']} eps.)", fontsize=8)
        ax.set_xlabel("training episodes", fontsize=8)
        if ax is axes[0]:
            ax.set_ylabel("held-out mean return (10 episodes)", fontsize=8)
            ax.legend(fontsize=7)
    fig.suptitle("learning curves per seed; dashed: threshold, dotted: the paper's ARS V2-t episodes", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def parse_list(text: str, cast=int):
    return [cast(v) for v in text.split(",") if v.strip()]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="Swimmer only, ARS seeds 0,1, peers seed 0, 640 episodes")
    ap.add_argument("--tasks", type=lambda t: parse_list(t, str), default=None)
    ap.add_argument("--solvers", type=lambda t: parse_list(t, str), default=list(SOLVERS))
    ap.add_argument("--seeds", type=parse_list, default=None, help="ARS run seeds (default 0-4)")
    ap.add_argument("--peer-seeds", type=parse_list, default=None, help="peer run seeds (default: --seeds)")
    ap.add_argument("--task-seeds", action="append", default=[], metavar="ENV=SEEDS",
                    help="ARS run seeds of one task, e.g. Ant-v5=0,1 (repeatable; overrides --seeds there)")
    ap.add_argument("--task-peer-seeds", action="append", default=[], metavar="ENV=SEEDS",
                    help="peer run seeds of one task (repeatable; overrides --peer-seeds there)")
    ap.add_argument("--budget", action="append", default=[], metavar="ENV=EPISODES")
    ap.add_argument("--extra", action="append", default=[], metavar="ENV:SOLVER:SEEDS",
                    help="more runs, e.g. Hopper-v5:ars-own-seeds:0,1,2 (repeatable)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--resume", action="store_true",
                    help="reuse the runs recorded in results/mujoco_runs.jsonl instead of running them again")
    ap.add_argument("--fresh", action="store_true", help="drop the runs of the previous JSON from the summary")
    ap.add_argument("--speed-only", action="store_true", help="only the env-steps-per-second comparison")
    ap.add_argument("--no-speed", action="store_true", help="skip the env-steps-per-second comparison")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    name = "mujoco_quick" if args.quick else "mujoco"
    tasks = args.tasks or (QUICK["tasks"] if args.quick else list(TASKS))
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; known {list(TASKS)}")
    bad = [s for s in args.solvers if s not in SOLVERS + ABLATIONS]
    if bad:
        raise SystemExit(f"--solvers: unknown {bad}; known {list(SOLVERS + ABLATIONS)}")
    budgets = {e: TASKS[e]["budget"] for e in TASKS}
    if args.quick:
        budgets.update(QUICK["budget"])
    for item in args.budget:
        env_id, _, n = item.partition("=")
        if env_id not in TASKS or not n.isdigit() or int(n) < 1:
            raise SystemExit(f"--budget: expected ENV=EPISODES with a known env id, got {item!r}")
        budgets[env_id] = int(n)
    seeds = args.seeds or (QUICK["seeds"] if args.quick else [0, 1, 2, 3, 4])
    peer_seeds = args.peer_seeds or (QUICK["peer_seeds"] if args.quick else seeds)

    def per_task(items: list[str], flag: str) -> dict:
        out = {}
        for item in items:
            env_id, _, text = item.partition("=")
            try:
                out[env_id] = parse_list(text)
            except ValueError:
                out[env_id] = []
            if env_id not in TASKS or not out[env_id]:
                raise SystemExit(f"{flag}: expected ENV=SEEDS with a known env id, got {item!r}")
        return out

    task_seeds = per_task(args.task_seeds, "--task-seeds")
    task_peer_seeds = per_task(args.task_peer_seeds, "--task-peer-seeds")
    torch.set_num_threads(1)
    warn_if_busy()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{name}.json"
    previous = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    t0 = time.perf_counter()
    speeds = dict(previous.get("speed", {}))
    if not args.no_speed:
        for env_id in tasks:
            speeds[env_id] = speed(env_id)
            s = speeds[env_id]
            print(f"{env_id:<15} env steps/s: library {s['library_steps_per_s']:.0f}, plain loop "
                  f"{s['plain_steps_per_s']:.0f} ({s['ratio']:.2f}x)", flush=True)
    runs = previous.get("runs", []) if args.speed_only else []
    if not args.speed_only:
        jobs = []
        for env_id in tasks:
            for solver in args.solvers:
                if solver in ("nevergrad", "cma") and not TASKS[env_id]["peers"]:
                    continue
                run_seeds = (task_seeds.get(env_id, seeds) if solver in ("zoblackbox", "ars-own-seeds")
                             else task_peer_seeds.get(env_id, peer_seeds))
                for seed in run_seeds:
                    jobs.append({"task": env_id, "solver": solver, "seed": seed, "budget": budgets[env_id]})
        for item in args.extra:
            env_id, solver, text = (item.split(":") + ["", ""])[:3]
            try:
                extra_seeds = parse_list(text)
            except ValueError:
                extra_seeds = []
            if env_id not in TASKS or solver not in SOLVERS + ABLATIONS or not extra_seeds:
                raise SystemExit(f"--extra: expected ENV:SOLVER:SEEDS with a known env id and solver, got {item!r}")
            jobs += [{"task": env_id, "solver": solver, "seed": sd, "budget": budgets[env_id]} for sd in extra_seeds
                     if not any(j["task"] == env_id and j["solver"] == solver and j["seed"] == sd for j in jobs)]
        # longest first (seconds per episode, roughly: Ant's steps are slow, Hopper's episodes short;
        # peers tend to use their whole budget), so that the pool's processes finish together
        per_episode = {"Swimmer-v5": 0.15, "Hopper-v5": 0.08, "HalfCheetah-v5": 0.14, "Walker2d-v5": 0.12,
                       "Ant-v5": 0.5}
        jobs.sort(key=lambda j: -j["budget"] * per_episode[j["task"]] * (1.5 if j["solver"] in ("nevergrad", "cma") else 1))
        new = run_jobs(jobs, args.jobs, args.out_dir / f"{name}_runs.jsonl", resume=args.resume)
        keys = {cache_key(r) for r in new}
        runs = [r for r in previous.get("runs", []) if cache_key(r) not in keys] + new
    summary = summarize(runs, budgets)
    result = {
        "benchmark": "mujoco",
        "command": " ".join(["python benchmarks/mujoco.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "paper": PAPER,
        "tasks": summary,
        "targets": targets(summary),
        "speed": speeds,
        "setup": {
            "tasks": {e: TASKS[e] for e in TASKS},
            "budgets": budgets,
            "zoblackbox": "minimize(oracle, zeros, **ars_v2t(N, b, alpha, nu, seed=seed)); GymPolicyOracle(task, "
                          "LinearPolicy(), episodes=1, seed=seed, obs_norm='running', reward_shift=shift, "
                          "max_episodes=budget)",
            "cma": f"pycma CMAEvolutionStrategy(zeros, {CMA_SIGMA0}), default popsize, candidate = mean",
            "nevergrad": f"NGOpt(Array(init=zeros), budget, num_workers={NG_WORKERS}) with default mutation, "
                         "candidate = recommendation",
            "checks": f"{CHECK_EPISODES} held-out episodes (env seeds {EVAL_SEED}..), true reward, every 20 N "
                      "training episodes (10 ARS iterations); not counted as training",
            "confirm": f"{CONFIRM_EPISODES} other held-out episodes (env seeds {CONFIRM_SEED}..) of a solving policy",
            "median_rule": "unsolved seeds count as +inf; null when the median seed is unsolved",
            "ablation": "ars-own-seeds: the zoblackbox recipe with GymPolicyOracle(common_seeds=False), every "
                        "rollout from its own start state as in ARS's workers (tasks[...].ablation)",
        },
        "runs": runs,
        "runtime_s_this_invocation": time.perf_counter() - t0,
        "jobs": args.jobs,
        "machine": machine_info(),
    }
    path.write_text(json.dumps(result, indent=2) + "\n")
    png = plot(result, args.out_dir / f"{name}.png") if summary else None
    print_table(summary)
    print(f"targets: {json.dumps(result['targets'])}")
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return result


def print_table(summary: dict) -> None:
    print(f"{'task':<15} {'paper':>6} {'median':>7} {'per seed':<40} peers")
    for env_id, t in summary.items():
        print(f"{env_id:<15} {t['paper_episodes']:>6} {t['median']!s:>7} {t['episodes_per_seed']!s:<40} "
              f"{t['peers']}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    main()
