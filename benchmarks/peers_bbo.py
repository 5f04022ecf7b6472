"""zoblackbox against nevergrad, pycma and scipy on test functions and on the digits CNN loss.

**Part 1 -- test functions** at d = 10, 100, 1000 (``--dims``), every method given the same number
of evaluations (``--evals-per-dim`` x d, default 100 d, capped at ``--max-evals``, default 20,000:
at d = 1000 NGOpt alone spends ~300 s per 100k-evaluation run here) of the same black box,
5 seeds (``--seeds``; 2 at d = 1000, ``--seeds-large``), started from the
same point, judged by the *noise-free* function value at the point it returns, divided by the
value at the start (``rel``: 1 = no progress, 0 = solved):

* ``quadratic``: ``0.5 (x - 1)^T A (x - 1)``, ``A = Q diag(l) Q^T``, eigenvalues log-spaced in
  [1, 100], ``Q`` a seeded random rotation; start 0.
* ``rosenbrock``: ``sum 100 (x_{i+1} - x_i^2)^2 + (1 - x_i)^2``; start 0.
* ``ellipsoid``: the same form with eigenvalues ``10^(6 i / (d - 1))`` (condition number 1e6) and
  its own rotation (non-separable, like BBOB's f10; unrotated, Powell's coordinate line searches
  solve it exactly); start 0.
* ``noisy_sphere``: ``||x - 1||^2 + 0.1 N(0, 1)`` per evaluation (the reported value is the
  noise-free ``||x - 1||^2``); start 0.

Methods (defaults of each library unless stated; nothing tuned per function):

* ``zoblackbox``: the library's recommended setting for the kind of target (``ZO_BEST``): for the
  smooth functions ``minimize(estimator=CoordinateEstimator(mu=1e-6), optimizer="lbfgs")`` --
  forward-difference CGE gradients with zoblackbox's L-BFGS (line searches on function values
  only, the gradient estimated at accepted points only); for the noisy one
  ``CoordinateEstimator(mu=5 * noise_sd, scheme="central")`` with the same L-BFGS told the noise
  (``optimizer_kwargs={"noise": noise_sd}``: noise-relaxed line searches, iterate averaging at the
  noise floor; central differences are exact on quadratics and a step well above the noise keeps
  the estimate's noise small);
* ``zo-adam``: ``minimize(..., estimator="auto", optimizer="adam", lr=0.05)``, the library's
  default estimator choice;
* ``ngopt``: nevergrad ``NGOpt`` (``num_workers=1``, its recommendation);
* ``cma``: pycma ``CMAEvolutionStrategy(x0, 0.5)`` (full covariance up to d = 100, ``CMA_diagonal``
  at d = 1000 where the full one is too slow), the distribution mean;
* ``powell``, ``nelder-mead``: ``scipy.optimize.minimize`` with ``maxfev`` = the budget;
* ``lbfgsb-fd``: scipy ``L-BFGS-B`` with its finite-difference gradient (``maxfun`` = budget).

Every black box counts its evaluations and refuses the one past the budget (raising inside the
peer, whose best point so far is then used), so no method gets more than the budget.

**Part 2 -- the digits CNN** (1,722 parameters, the full-batch loss on 512 training images, the
problem of ``cge_vs_rge.py``'s equal-budget view), for init seeds 0-2 (``--cnn-seeds``): nevergrad
NGOpt with 30,000 queries; zoblackbox CGE + Adam (``FeatureReuseScheduler``) with the same 30,000
queries; and zoblackbox's recipe ``CNN_RECIPE`` of ``zoblackbox.recipes`` (sparse CGE at 75% sparsity +
AdamW + cosine, 300 steps, chosen on validation images, see ``--tune-cnn``), whose queries are cheap enough that it
finishes in a fraction of NGOpt's wall time: the equal-wall-time comparison is "more accurate in
less time". Test accuracy on the 360 test images, median over seeds.

Run:  python benchmarks/peers_bbo.py              (see the JSON's wall_s; about 30 min on 2 shared cores)
      python benchmarks/peers_bbo.py --quick      (d = 10 and 100, 1 seed, no CNN: ~3 min)
      python benchmarks/peers_bbo.py --tune-cnn   (the CNN recipe's validation selection: ~8 min)
Writes benchmarks/results/peers_bbo.json (``runs``: every method; ``rows``: one row per problem with
``zoblackbox``, ``nevergrad``, ``cma`` and ``scipy`` (its best method), ``final_loss`` = the median
``f(x_final) / f(x0)``) and peers_bbo.png. Needs ``pip install -e '.[bench]'``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import _common
import numpy as np
import torch
from _common import machine_info, new_figure, save_figure, set_threads, warn_if_busy, write_json

from zoblackbox import CoordinateEstimator, FunctionOracle, minimize
from zoblackbox.cli import positive_int
from zoblackbox.recipes import CNN_BUDGET_SPARSITY, CNN_RECIPE

FUNCTIONS = ("quadratic", "rosenbrock", "ellipsoid", "noisy_sphere")
METHODS = ("zoblackbox", "zo-adam", "ngopt", "cma", "powell", "nelder-mead", "lbfgsb-fd")
NOISE = 0.1


class Budget(Exception):
    """Raised by a black box asked for one evaluation past its budget."""


class Problem:
    """A test function, its start point and a counting, budgeted numpy/torch black box."""

    def __init__(self, name: str, d: int, seed: int):
        self.name, self.d, self.seed = name, d, seed
        self.x0 = np.zeros(d)
        if name in ("quadratic", "ellipsoid"):
            rng = np.random.default_rng((1000 if name == "quadratic" else 2000) + d)
            q, _ = np.linalg.qr(rng.standard_normal((d, d)))
            eig = np.logspace(0, 2, d) if name == "quadratic" else 10.0 ** (6 * np.arange(d) / max(d - 1, 1))
            self.A = torch.from_numpy((q * eig) @ q.T)
        self.noise = np.random.default_rng(seed)

    def clean(self, X: torch.Tensor) -> torch.Tensor:
        """Noise-free values of the rows of ``X`` (float64)."""
        X = X.to(torch.float64)
        if self.name in ("quadratic", "ellipsoid"):
            Z = X - 1
            return 0.5 * ((Z @ self.A) * Z).sum(1)
        if self.name == "rosenbrock":
            return (100 * (X[:, 1:] - X[:, :-1] ** 2) ** 2 + (1 - X[:, :-1]) ** 2).sum(1)
        return ((X - 1) ** 2).sum(1)

    def noisy(self, X: torch.Tensor) -> torch.Tensor:
        out = self.clean(X)
        if self.name == "noisy_sphere":
            out = out + NOISE * torch.from_numpy(self.noise.standard_normal(out.shape[0]))
        return out

    def value(self, x) -> float:
        return float(self.clean(torch.as_tensor(np.asarray(x, dtype=np.float64))[None])[0])


class Counted:
    """A numpy black box for the peers: counts, refuses past the budget, remembers the best point."""

    def __init__(self, problem: Problem, budget: int):
        self.p, self.budget, self.n = problem, budget, 0
        self.best_x, self.best_f = problem.x0.copy(), math.inf

    def __call__(self, x) -> float:
        if self.n >= self.budget:
            raise Budget
        self.n += 1
        x = np.asarray(x, dtype=np.float64)
        f = float(self.p.noisy(torch.from_numpy(x)[None])[0])
        if f < self.best_f:
            self.best_x, self.best_f = x.copy(), f
        return f


ZO_BEST = {  # zoblackbox's recommended setting per kind of target (docs/simulators.md)
    "smooth": {"estimator": "CoordinateEstimator(mu=1e-6)", "optimizer": "lbfgs"},
    "noisy": {"estimator": "CoordinateEstimator(mu=5 * noise_sd, scheme='central')", "optimizer": "lbfgs",
              "optimizer_kwargs": {"noise": "noise_sd"}},
}


def run_zo(problem: Problem, budget: int, method: str) -> tuple[np.ndarray, int]:
    oracle = FunctionOracle(problem.noisy, problem.d, vectorized=True, dtype=torch.float64, budget=budget)
    if method == "zoblackbox":
        if problem.name == "noisy_sphere":  # central differences are exact on quadratics; mu >> noise
            res = minimize(oracle, problem.x0, estimator=CoordinateEstimator(mu=5 * NOISE, scheme="central"),
                           optimizer="lbfgs", budget=budget, optimizer_kwargs={"noise": NOISE})
        else:
            res = minimize(oracle, problem.x0, estimator=CoordinateEstimator(mu=1e-6), optimizer="lbfgs",
                           budget=budget)
    else:
        res = minimize(oracle, problem.x0, estimator="auto", optimizer="adam", lr=0.05, budget=budget)
    return np.asarray(res.x), oracle.nfev


def run_peer(problem: Problem, budget: int, method: str) -> tuple[np.ndarray, int]:
    f = Counted(problem, budget)
    x = None
    try:
        if method == "ngopt":
            import nevergrad as ng

            param = ng.p.Array(init=problem.x0.copy())
            param.random_state = np.random.RandomState(problem.seed)
            opt = ng.optimizers.NGOpt(parametrization=param, budget=budget, num_workers=1)
            for _ in range(budget):
                cand = opt.ask()
                opt.tell(cand, f(cand.value))
            x = opt.provide_recommendation().value
        elif method == "cma":
            import cma

            opts = {"seed": problem.seed + 1, "verbose": -9, "maxfevals": budget}
            if problem.d > 100:
                opts["CMA_diagonal"] = True
            es = cma.CMAEvolutionStrategy(problem.x0, 0.5, opts)
            while f.n + es.popsize <= budget and not es.stop():
                pop = es.ask()
                es.tell(pop, [f(p) for p in pop])
            x = es.result.xfavorite
        else:
            from scipy.optimize import minimize as sp_minimize

            if method == "lbfgsb-fd":
                res = sp_minimize(f, problem.x0, method="L-BFGS-B", options={"maxfun": budget, "maxiter": budget})
            else:
                name = {"powell": "Powell", "nelder-mead": "Nelder-Mead"}[method]
                res = sp_minimize(f, problem.x0, method=name, options={"maxfev": budget, "maxiter": budget})
            x = res.x
    except Budget:
        x = None
    if x is None:  # stopped by the budget inside the peer: its best evaluated point
        x = f.best_x
    return np.asarray(x, dtype=np.float64), f.n


def run_functions(args) -> list[dict]:
    rows = []
    for d in args.dims:
        budget = min(args.evals_per_dim * d, args.max_evals)
        seeds = args.seeds if d < 1000 else min(args.seeds, args.seeds_large)
        for name in FUNCTIONS:
            for method in args.methods:
                rels, walls, used = [], [], []
                for seed in range(seeds):
                    problem = Problem(name, d, seed)
                    f0 = problem.value(problem.x0)
                    t0 = time.perf_counter()
                    runner = run_zo if method.startswith("zo") else run_peer
                    x, n = runner(problem, budget, method)
                    walls.append(time.perf_counter() - t0)
                    rels.append(problem.value(x) / f0)
                    used.append(n)
                    if max(used) > budget:
                        raise RuntimeError(f"{method} used {max(used)} > {budget} evaluations")
                row = {"function": name, "d": d, "method": method, "budget": budget,
                       "rel_median": statistics.median(rels), "rel_min": min(rels), "rel_max": max(rels),
                       "seeds": len(rels), "rel_per_seed": rels, "wall_s_median": statistics.median(walls), "evals_used": used}
                rows.append(row)
                print(f"d={d:<5} {name:<13} {method:<12} rel {row['rel_median']:.3e} "
                      f"[{row['rel_min']:.2e}, {row['rel_max']:.2e}]  {row['wall_s_median']:6.2f} s  "
                      f"evals {max(used)}/{budget}", flush=True)
    return rows


SOLVERS = {"zoblackbox": ("zoblackbox",), "nevergrad": ("ngopt",), "cma": ("cma",),
           "scipy": ("powell", "nelder-mead", "lbfgsb-fd")}


def solver_rows(runs: list[dict]) -> list[dict]:
    """One row per problem: ``{"problem", "dim", "budget", SOLVER: {"final_loss", "wall_s", "method"}}``.

    ``final_loss`` is the median noise-free ``f(x_final) / f(x0)``; ``scipy`` is its best method on
    that problem (named in ``method``). ``runs`` has every method separately.
    """
    out = []
    for d in sorted({r["d"] for r in runs}):
        for name in FUNCTIONS:
            cell = {r["method"]: r for r in runs if r["d"] == d and r["function"] == name}
            if not cell:
                continue
            row = {"problem": name, "dim": d, "budget": next(iter(cell.values()))["budget"]}
            for solver, methods in SOLVERS.items():
                have = [cell[m] for m in methods if m in cell]
                if have:
                    best = min(have, key=lambda r: r["rel_median"])
                    row[solver] = {"final_loss": best["rel_median"], "wall_s": best["wall_s_median"],
                                   "method": best["method"]}
            out.append(row)
    return out


def winners(rows: list[dict]) -> dict:
    out = {}
    for d in sorted({r["d"] for r in rows}):
        for name in FUNCTIONS:
            cell = [r for r in rows if r["d"] == d and r["function"] == name]
            if not cell:
                continue
            best = min(r["rel_median"] for r in cell)
            zo = min(r["rel_median"] for r in cell if r["method"].startswith("zo"))
            peers = [r["rel_median"] for r in cell if not r["method"].startswith("zo")]
            out[f"{name}@{d}"] = {
                "best_method": min(cell, key=lambda r: r["rel_median"])["method"],
                "best_rel": best, "best_zoblackbox_rel": zo, "best_peer_rel": min(peers) if peers else None,
                # "best of all": within 1% (relative) of the best peer, or better
                "zoblackbox_best": bool(peers) and zo <= min(peers) * 1.01 + 1e-300}
    return out


# CNN_RECIPE (the run compared with NGOpt in wall time) and CNN_BUDGET_SPARSITY (the sparsity of the run
# held to NGOpt's 30,000 queries) live in zoblackbox.recipes, with how they were chosen; imported above, so
# they stay attributes of this module. --tune-cnn reruns their selection over these candidates:
CNN_CANDIDATES = [{"sparsity": 0.75, "steps": 300}, {"sparsity": 0.5, "steps": 300},
                  {"sparsity": 0.75, "steps": 600}, {"sparsity": 0.0, "steps": 300}]
CNN_BUDGET_CANDIDATES = [0.9, 0.95, 0.98]


def _cnn_steps(problem, sparsity: float, budget: int) -> int:
    """Steps of sparse CGE at ``sparsity`` that fit ``budget`` queries."""
    from zoblackbox.sparsity import CoordinateSampler, uniform_ratios

    per_step = CoordinateSampler(problem.layout, uniform_ratios(problem.layout, sparsity), biases="layer").n_active + 1
    return budget // per_step


def run_cge_recipe(problem, recipe: dict = CNN_RECIPE, budget: int | None = None) -> dict:
    """``recipe`` as a driver of the ask/tell engine: CGE through the ``FeatureReuseScheduler`` on
    the coordinates a ``CoordinateSampler`` draws (uniform ratios), AdamW with a cosine schedule
    (torch's ``CosineAnnealingLR`` closed form, ``WarmupCosine(steps)``). ``budget`` caps the
    queries (exact)."""
    import cge_vs_rge as cvr
    import torch.nn.functional as F

    from zoblackbox import AskTell
    from zoblackbox.schedule import FeatureReuseScheduler
    from zoblackbox.schedules import WarmupCosine
    from zoblackbox.sparsity import CoordinateSampler, uniform_ratios
    from zoblackbox.torch_module import ModuleOracle

    model = cvr.make_model(cvr.EB_CHANNELS, cvr.EB_HIDDEN, problem.seed)
    t0 = time.perf_counter()
    oracle = ModuleOracle(model, F.cross_entropy, batch=(problem.x_batch, problem.y_batch))
    sampler = None
    if recipe["sparsity"] > 0:
        sampler = CoordinateSampler(oracle.layout, uniform_ratios(oracle.layout, recipe["sparsity"]),
                                    biases="layer", seed=problem.seed)
    engine = AskTell(oracle.get_params(), estimator=CoordinateEstimator(mu=recipe["mu"]), optimizer="adamw",
                     lr=recipe["lr"], optimizer_kwargs={"weight_decay": recipe["weight_decay"]},
                     lr_schedule=WarmupCosine(recipe["steps"]), maxiter=recipe["steps"], budget=budget,
                     evaluate_final=False)
    scheduler = FeatureReuseScheduler()
    for _ in range(recipe["steps"]):
        engine.coords = None if sampler is None else sampler.sample()  # before the step builds its plan
        if engine.step(oracle, scheduler) is None:
            break
    wall = time.perf_counter() - t0
    x = engine.x.detach()
    return {**problem.metrics(x), "x": x, "queries": oracle.nfev, "wall_s": wall, "steps": engine.nit,
            "recipe": recipe}


def _one_se_choice(rows: list[dict]) -> dict:
    """The one-standard-error rule (Hastie, Tibshirani & Friedman, ESL 7.10): the cheapest candidate
    (fewest queries) whose mean validation accuracy is within one standard error (over seeds) of the
    best mean."""
    best = max(rows, key=lambda r: r["val_acc_mean"])
    se = statistics.stdev(best["val_acc"]) / math.sqrt(len(best["val_acc"])) if len(best["val_acc"]) > 1 else 0.0
    near = [r for r in rows if r["val_acc_mean"] >= best["val_acc_mean"] - se]
    return min(near, key=lambda r: r["queries"])


def tune_cnn(args) -> dict:
    """CGE's validation accuracy for CNN_CANDIDATES and CNN_BUDGET_CANDIDATES over init seeds
    0..--cnn-seeds-1: the recipe by the one-standard-error rule, the budget run's sparsity by the best
    mean (all its candidates cost the same queries)."""
    import cge_vs_rge as cvr

    data = cvr.standardized_digits()
    problems = [cvr.EqualBudgetProblem(data, seed, args.cnn_budget) for seed in range(args.cnn_seeds)]

    def evaluate(cand: dict, budget: int | None) -> dict:
        runs = []
        for p in problems:
            steps = cand.get("steps") or _cnn_steps(p, cand["sparsity"], budget)
            runs.append(run_cge_recipe(p, {**CNN_RECIPE, **cand, "steps": steps}, budget))
        row = {**cand, "steps": runs[0]["steps"], "val_acc_mean": statistics.fmean(r["val_acc"] for r in runs),
               "val_acc": [r["val_acc"] for r in runs], "wall_s": [r["wall_s"] for r in runs],
               "queries": runs[0]["queries"]}
        print(f"tune sparsity {cand['sparsity']:<4} steps {row['steps']:<4} val {row['val_acc_mean']:.4f} "
              f"{[round(v, 4) for v in row['val_acc']]}  {row['queries']:,} queries  "
              f"wall {[round(w, 1) for w in row['wall_s']]}", flush=True)
        return row

    recipe_rows = [evaluate(c, None) for c in CNN_CANDIDATES]
    budget_rows = [evaluate({"sparsity": sp}, args.cnn_budget) for sp in CNN_BUDGET_CANDIDATES]
    chosen = _one_se_choice(recipe_rows)
    budget_best = max(budget_rows, key=lambda r: r["val_acc_mean"])
    return {"rule": "recipe: cheapest candidate within one standard error of the best mean validation accuracy; "
                    "budget run: best mean validation accuracy",
            "candidates": recipe_rows, "budget_candidates": budget_rows,
            "selected": {"sparsity": chosen["sparsity"], "steps": chosen["steps"]},
            "selected_budget_sparsity": budget_best["sparsity"],
            "constants_match_selection": (CNN_RECIPE["sparsity"] == chosen["sparsity"]
                                          and CNN_RECIPE["steps"] == chosen["steps"]
                                          and CNN_BUDGET_SPARSITY == budget_best["sparsity"])}


#: scipy's finite-difference step on the CNN: its default (1e-8) vanishes in the float32 model
#: (x + 1e-8 == x, a zero gradient, and L-BFGS-B stops at x0), so it gets CGE's mu
SCIPY_CNN_EPS = 5e-3


def run_scipy_cnn(problem, budget: int) -> dict:
    """scipy's L-BFGS-B with its finite-difference gradient (step ``SCIPY_CNN_EPS``) on the CNN's batch
    loss, ``budget`` evaluations."""
    from scipy.optimize import minimize as sp_minimize

    oracle = problem.oracle(budget)
    best = {"f": math.inf, "x": problem.x0.numpy().astype(np.float64)}

    def f(x):
        if oracle.nfev >= budget:
            raise Budget
        v = oracle(x)
        if v < best["f"]:
            best["f"], best["x"] = v, np.array(x, dtype=np.float64)
        return v

    t0 = time.perf_counter()
    try:
        sp_minimize(f, best["x"].copy(), method="L-BFGS-B",
                    options={"maxfun": budget, "maxiter": budget, "eps": SCIPY_CNN_EPS})
    except Budget:
        pass
    return {**problem.metrics(best["x"]), "x": best["x"], "queries": oracle.nfev, "wall_s": time.perf_counter() - t0}


CNN_METHODS = ("ngopt", "sep_cma_es", "lbfgsb_fd", "cge_adam", "zo_sparse_budget", "zo_recipe")
CNN_SOLVER = {"zoblackbox": "zo_sparse_budget", "nevergrad": "ngopt", "cma": "sep_cma_es", "scipy": "lbfgsb_fd"}


def run_cnn(args) -> dict:
    """Per init seed, the CNN's batch loss as a black box: at --cnn-budget queries NGOpt, sep-CMA-ES,
    scipy L-BFGS-B (finite differences), CGE + Adam and zoblackbox's sparse CGE at CNN_BUDGET_SPARSITY;
    then zoblackbox's CNN_RECIPE, whose wall time is compared with NGOpt's."""
    import cge_vs_rge as cvr

    data = cvr.standardized_digits()
    per_seed = []
    for seed in range(args.cnn_seeds):
        problem = cvr.EqualBudgetProblem(data, seed, args.cnn_budget)
        loss0 = problem.metrics(problem.x0)["batch_loss"]
        res = {
            "ngopt": cvr.run_ngopt(problem, cvr.EB_HPARAMS["ngopt"], args.cnn_budget),
            "sep_cma_es": cvr.run_sep_cma(problem, cvr.EB_HPARAMS["sep_cma_es"], args.cnn_budget),
            "lbfgsb_fd": run_scipy_cnn(problem, args.cnn_budget),
            "cge_adam": cvr.run_zo_adam(problem, "cge_adam", cvr.EB_HPARAMS["cge_adam"], args.cnn_budget),
            "zo_sparse_budget": run_cge_recipe(
                problem, {**CNN_RECIPE, "sparsity": CNN_BUDGET_SPARSITY,
                          "steps": _cnn_steps(problem, CNN_BUDGET_SPARSITY, args.cnn_budget)}, args.cnn_budget),
            "zo_recipe": run_cge_recipe(problem),
        }
        row = {"seed": seed, "params": problem.dim, "loss_x0": loss0}
        for method, r in res.items():
            row[method] = {"acc": r["acc"], "val_acc": r["val_acc"], "batch_loss": r["batch_loss"],
                           "rel_loss": r["batch_loss"] / loss0, "queries": r["queries"], "wall_s": r["wall_s"],
                           **({"steps": r["steps"]} if "steps" in r else {})}
            if r["queries"] > args.cnn_budget and method != "zo_recipe":
                raise RuntimeError(f"{method} used {r['queries']} > {args.cnn_budget} queries on the CNN")
        row["ngopt"]["algorithm"] = res["ngopt"]["algorithm"]
        row["recipe_beats_ngopt_in_less_wall_time"] = (row["zo_recipe"]["acc"] > row["ngopt"]["acc"]
                                                       and row["zo_recipe"]["wall_s"] < row["ngopt"]["wall_s"])
        per_seed.append(row)
        print(f"CNN seed {seed}: " + " | ".join(f"{m} acc {row[m]['acc']:.4f} loss {row[m]['rel_loss']:.2e} "
                                                 f"{row[m]['queries']:,} q {row[m]['wall_s']:.1f} s"
                                                 for m in CNN_METHODS), flush=True)

    out = {"params": per_seed[0]["params"], "budget": args.cnn_budget, "images": cvr.EB_BATCH,
           "seeds": args.cnn_seeds, "recipe": CNN_RECIPE, "budget_sparsity": CNN_BUDGET_SPARSITY,
           "per_seed": per_seed}
    for method in CNN_METHODS:
        out[method] = {key + "_median": statistics.median(r[method][key] for r in per_seed)
                       for key in ("acc", "rel_loss", "wall_s", "queries")}
        out[method]["acc_per_seed"] = [r[method]["acc"] for r in per_seed]
    out["recipe_wins_per_seed"] = sum(r["recipe_beats_ngopt_in_less_wall_time"] for r in per_seed)
    out["recipe_wall_ratio_median"] = statistics.median(r["zo_recipe"]["wall_s"] / r["ngopt"]["wall_s"]
                                                        for r in per_seed)
    out["cge_beats_ngopt_in_less_wall_time"] = (out["zo_recipe"]["acc_median"] > out["ngopt"]["acc_median"]
                                                and out["recipe_wall_ratio_median"] < 1)
    peers_at_budget = [m for m in CNN_METHODS if m not in ("cge_adam", "zo_sparse_budget", "zo_recipe")]
    out["zo_best_acc_at_equal_queries"] = out["zo_sparse_budget"]["acc_median"] > max(
        out[m]["acc_median"] for m in peers_at_budget)
    return out


def cnn_row(cnn: dict) -> dict:
    """The CNN in ``rows``' format: ``final_loss`` = median batch loss / loss at x0 at equal queries."""
    row = {"problem": "digits_cnn", "dim": cnn["params"], "budget": cnn["budget"]}
    for solver, method in CNN_SOLVER.items():
        row[solver] = {"final_loss": cnn[method]["rel_loss_median"], "wall_s": cnn[method]["wall_s_median"],
                       "test_acc": cnn[method]["acc_median"], "method": method}
    return row


def plot(result: dict, name: str) -> None:
    dims = sorted({r["d"] for r in result["runs"]})
    cnn = result.get("cnn")
    fig, axes = new_figure(ncols=len(FUNCTIONS) + bool(cnn), width=4.2, height=3.8)
    colors = dict(zip(METHODS, ("#4c72b0", "#64b5cd", "#8172b2", "#55a868", "#dd8452", "#c44e52", "#937860")))
    for ax, fname in zip(axes, FUNCTIONS):
        for method in METHODS:
            rows = sorted((r for r in result["runs"] if r["function"] == fname and r["method"] == method),
                          key=lambda r: r["d"])
            if not rows:
                continue
            ys = [max(r["rel_median"], 1e-16) for r in rows]
            ax.plot([r["d"] for r in rows], ys, marker="o", color=colors[method], label=method,
                    lw=2.2 if method.startswith("zo") else 1.2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(dims, [str(d) for d in dims])
        ax.set_title(fname, fontsize=10)
        ax.set_xlabel("dimension d")
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("f(x_final) / f(x0), median of seeds")
    fig.suptitle(f"equal budgets: min({result['evals_per_dim']} d, {result['max_evals']:,}) evaluations per run",
                 fontsize=10)
    axes[0].legend(fontsize=7, loc="lower left")
    if cnn:
        ax = axes[-1]
        labels = {"ngopt": "NGOpt", "sep_cma_es": "sep-CMA", "lbfgsb_fd": "L-BFGS-B", "cge_adam": "CGE+Adam",
                  "zo_sparse_budget": f"sparse CGE\n{CNN_BUDGET_SPARSITY:.0%}", "zo_recipe": "zo recipe\n(more q)"}
        accs = [cnn[m]["acc_median"] for m in CNN_METHODS]
        bars = ax.bar(range(len(CNN_METHODS)), accs, color=["#8172b2", "#55a868", "#937860", "#64b5cd",
                                                              "#4c72b0", "#4c72b0"])
        for bar, m in zip(bars, CNN_METHODS):
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 0.003,
                    f"{cnn[m]['acc_median']:.3f}\n{cnn[m]['wall_s_median']:.0f} s", ha="center", fontsize=6.5)
        ax.set_xticks(range(len(CNN_METHODS)), [labels[m] for m in CNN_METHODS], fontsize=6.5, rotation=30)
        ax.set_ylim(min(accs) - 0.05, 1.0)
        ax.set_ylabel("test accuracy (median of seeds)")
        ax.set_title(f"digits CNN ({cnn['params']:,} params), {cnn['budget']:,} queries\n"
                     f"except the recipe ({cnn['zo_recipe']['queries_median']:,.0f})", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, name)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="d = 10 and 100, 1 seed, no CNN part")
    ap.add_argument("--dims", type=positive_int, nargs="+", default=None, help="dimensions (default 10 100 1000)")
    ap.add_argument("--seeds", type=positive_int, default=None, help="seeds per cell (default 5; quick 1)")
    ap.add_argument("--evals-per-dim", type=positive_int, default=100, help="budget = this x d (default 100)")
    ap.add_argument("--max-evals", type=positive_int, default=20_000, help="cap of the budget (default 20,000)")
    ap.add_argument("--seeds-large", type=positive_int, default=2, help="seeds at d >= 1000 (default 2)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--no-cnn", action="store_true", help="skip the digits CNN part")
    ap.add_argument("--cnn-budget", type=positive_int, default=30_000, help="NGOpt's queries on the CNN")
    ap.add_argument("--cnn-seeds", type=positive_int, default=3, help="init seeds of the CNN part (default 3)")
    ap.add_argument("--tune-cnn", action="store_true",
                    help="only rerun the validation selection of the CNN recipe (CNN_CANDIDATES); writes NAME_cnn_tuning.json")
    ap.add_argument("--threads", type=positive_int, default=1)
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--name", default="peers_bbo")
    ap.add_argument("--out-dir", type=Path, default=_common.RESULTS)
    return ap


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.dims = args.dims or ([10, 100] if args.quick else [10, 100, 1000])
    args.seeds = args.seeds or (1 if args.quick else 5)
    _common.RESULTS = args.out_dir
    set_threads(args.threads)
    warn_if_busy()
    if args.tune_cnn:
        result = {"benchmark": "peers_bbo_cnn_tuning", "recipe": CNN_RECIPE, **tune_cnn(args),
                  "machine": machine_info()}
        path = write_json(f"{args.name}_cnn_tuning", result)
        print(f"selected recipe {result['selected']}, budget sparsity {result['selected_budget_sparsity']} "
              f"(the script's constants match: {result['constants_match_selection']}); wrote {path}")
        return result
    t0 = time.perf_counter()
    rows = run_functions(args)
    result = {"benchmark": "peers_bbo",
              "command": " ".join(["python benchmarks/peers_bbo.py", *(argv if argv is not None else sys.argv[1:])]),
              "evals_per_dim": args.evals_per_dim, "max_evals": args.max_evals, "seeds": args.seeds,
              "seeds_large": args.seeds_large, "noise_sd": NOISE, "zoblackbox_settings": ZO_BEST,
              "runs": rows, "rows": solver_rows(rows),
              "winners": winners(rows)}
    if not (args.quick or args.no_cnn):
        result["cnn"] = run_cnn(args)
        result["rows"].append(cnn_row(result["cnn"]))
    result["wall_s"] = time.perf_counter() - t0
    result["machine"] = machine_info()
    path = write_json(args.name, result)
    if not args.no_plot:
        plot(result, args.name)
    print()
    for key, w in result["winners"].items():
        peer = "-" if w["best_peer_rel"] is None else f"{w['best_peer_rel']:.2e}"
        print(f"{key:<20} best {w['best_method']:<12} zoblackbox {w['best_zoblackbox_rel']:.2e}  best peer "
              f"{peer}  -> {'zoblackbox best' if w['zoblackbox_best'] else 'a peer is better'}")
    print(f"\nwrote {path} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
