"""``zoblackbox pde``: train a correction network through a black-box PhiFlow solver.

The methods of DeepZero's solver-in-the-loop experiment (Chen et al., ICLR 2024; Um et al.,
NeurIPS 2020), all measured by the same metric -- the MAE of corrected coarse rollouts of the test
simulations against the downsampled reference:

* ``src`` -- the coarse solver alone, no correction;
* ``non`` -- the network trained on precomputed one-step pairs (no solver in the loop);
* ``fo-sol`` -- trained on the loss of ``unroll`` corrected solver steps, autograd through PhiFlow;
* ``zo-sol`` -- the same loss, CGE through the black-box solver (forward, ``mu = 1e-6``);
* ``rge-sol`` -- the same loss, RGE at the same query budget as ``zo-sol``;
* ``hybrid-sol`` -- the same loss, backprop through the network with the solver step as a
  :class:`~zoblackbox.nn.BlackBox` (its Jacobian estimated from solver queries, forward CGE over
  the state or RGE: ``Recipe.hybrid_q``).

``fo-sol``, ``zo-sol``, ``rge-sol`` and ``hybrid-sol`` start from NON's parameters (``--warm-start non``, the
default) and then take the same number of steps on the same minibatches; only the gradient
differs. The recipes (:data:`RECIPES`, defined in :mod:`zoblackbox.recipes` and importable from
here) were tuned on training simulations only.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .cli_args import fail_nonfinite, non_negative_int, positive_float, positive_int, seed_int, thread_count
from .errors import ConfigError
from .recipes import RECIPES, Recipe

if TYPE_CHECKING:
    from .adapters.phiflow import PhiFlowStep, SimulationSet

__all__ = ["METHODS", "RECIPES", "SCENARIOS", "Problem", "Recipe", "cmd_pde", "make_problem", "register",
           "run_methods"]

METHODS = ("src", "non", "fo-sol", "zo-sol", "rge-sol", "hybrid-sol")
SCENARIOS = ("burgers1d", "wake2d")


@dataclass
class Problem:
    """A scenario's black-box source solver with its training and test simulations."""

    scenario: str
    step: PhiFlowStep
    train: SimulationSet
    test: SimulationSet
    config: dict

    def fit_split(self, validation_sims: int = 0) -> tuple[SimulationSet, SimulationSet | None]:
        """The training simulations the methods fit and the held-back validation ones (the last
        ``validation_sims``; ``None`` when it is 0)."""
        if isinstance(validation_sims, bool) or not isinstance(validation_sims, int) or not (
                0 <= validation_sims < self.train.n_sims):
            raise ConfigError(f"validation_sims must be an int in [0, {self.train.n_sims - 1}] (the scenario has "
                              f"{self.train.n_sims} training simulations), got {validation_sims!r}")
        if validation_sims == 0:
            return self.train, None
        return self.train.split(self.train.n_sims - validation_sims)

    def make_net(self, recipe: Recipe, seed: int):
        from .adapters.phiflow import CorrectionCNN

        c = self.step.scenario.state_shape[0]
        a = 0 if self.train.aux is None else int(self.train.aux.shape[2])
        torch.manual_seed(seed)
        return CorrectionCNN(c + a, c, hidden=recipe.hidden, kernel_size=recipe.kernel_size,
                             spatial_rank=len(self.step.scenario.state_shape) - 1, padding_mode=recipe.padding_mode,
                             activation=recipe.activation)


def make_problem(scenario: str = "burgers1d", *, n_train: int | None = None, n_test: int | None = None,
                 data_seed: int = 0, sim_steps: int | None = None, warmup: int | None = None,
                 factor: int | None = None, config: dict | None = None) -> Problem:
    """Generate a scenario's simulations locally and wrap its source solver as a black box.

    ``config``: the scenario's settings (``RECIPES[scenario].scenario_config``: fields of
    ``BurgersConfig``/``WakeConfig`` and ``n_train``/``n_test``); the keyword arguments override it.
    Without it the configs' own defaults apply (10/5 Burgers and 4/2 wake simulations)."""
    from .adapters.phiflow import PhiFlowStep

    if scenario not in SCENARIOS:
        raise ConfigError(f"unknown scenario {scenario!r}; expected one of {SCENARIOS}")
    kw = dict(config or {})
    given_train, given_test = kw.pop("n_train", None), kw.pop("n_test", None)
    n_train = n_train or given_train or (10 if scenario == "burgers1d" else 4)
    n_test = n_test or given_test or (5 if scenario == "burgers1d" else 2)
    kw.update({k: v for k, v in (("steps", sim_steps), ("warmup", warmup)) if v is not None})
    if scenario == "burgers1d":
        from .adapters.burgers import BurgersConfig, burgers_datasets

        if factor is not None:
            kw["n_ref"] = kw.get("n_src", BurgersConfig().n_src) * factor
        config_obj = _config(BurgersConfig, kw, scenario)
        train, test = burgers_datasets(config_obj, n_train=n_train, n_test=n_test, seed=data_seed)
    else:
        from .adapters.wake import WakeConfig, wake_datasets

        if factor is not None:
            kw["factor"] = factor
        config_obj = _config(WakeConfig, kw, scenario)
        train, test = wake_datasets(config_obj, n_train=n_train, n_test=n_test, seed=data_seed)
    return Problem(scenario, PhiFlowStep(config_obj.solver("source")), train, test, asdict(config_obj))


def _config(cls, kw: dict, scenario: str):
    import dataclasses

    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise ConfigError(f"unknown {scenario} setting(s) {unknown}; {cls.__name__} has {sorted(known)}")
    return cls(**kw)


def run_methods(problem: Problem, methods, recipe: Recipe, seed: int = 0, *, log=print) -> dict:
    """Train and evaluate ``methods`` for one seed; NON is trained once and reused as warm start.

    Returns ``{method: result}`` with ``mae`` (test rollouts, all recorded steps), ``mae_curve``
    (per rollout step), ``queries``, ``solver_calls``, ``solver_rows``, ``train_wall_s``, ``steps``
    and ``failures`` (the oracle's report; ZO methods), and ``val_mae`` (the held-back validation
    simulations of ``recipe.validation_sims``, ``None`` without them). Every method trains on the
    training simulations that are not held back.
    """
    from .adapters.phiflow import (
        SolverInTheLoopOracle,
        rollout_maes,
        train_fo_sol,
        train_hybrid_sol,
        train_non,
        train_zo_sol,
    )
    from .estimators import CoordinateEstimator, RandomEstimator

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; expected some of {METHODS}")
    if recipe.warm_start not in ("non", "none"):
        raise ConfigError(f"warm_start must be 'non' or 'none', got {recipe.warm_start!r}")
    step, test = problem.step, problem.test
    train, val = problem.fit_split(recipe.validation_sims)
    net = problem.make_net(recipe, seed)
    d = net.layout.dim
    x_init = net.get_params().to(torch.float64)
    out: dict = {}

    def evaluate(name, params, res=None, extra=None):
        maes = rollout_maes(step, net, params, [test] if val is None else [test, val])
        mae, curve = maes[0]
        row = {"mae": mae, "mae_curve": curve.tolist(), "params": d, "queries": 0, "solver_calls": 0,
               "solver_rows": 0, "train_wall_s": 0.0, "steps": 0, "failures": {},
               "val_mae": None if val is None else maes[1][0]}
        if res is not None:
            row.update(queries=res.queries, solver_calls=res.solver_calls, solver_rows=res.solver_rows,
                       train_wall_s=res.wall_s, steps=res.steps, failures=res.failures,
                       final_loss=res.history[-1]["loss"] if res.history else None)
        row.update(extra or {})
        out[name] = row
        shown = "" if val is None else f"val MAE {row['val_mae']:.4f}  "
        log(f"  seed {seed} {name:<10} {shown}test MAE {mae:.4f}  queries {row['queries']:>9,}  solver calls "
            f"{row['solver_calls']:>6,}  train {row['train_wall_s']:.1f}s")

    if "src" in methods:
        evaluate("src", None)
    need_non = "non" in methods or (recipe.warm_start == "non" and any(m.endswith("-sol") for m in methods))
    non = None
    if need_non:
        non = train_non(step, net, train, x0=x_init, steps=recipe.non_steps, batch_size=recipe.non_batch,
                        lr=recipe.non_lr, seed=seed)
        if "non" in methods:
            evaluate("non", non.params, non)
    x0 = non.params if (non is not None and recipe.warm_start == "non") else x_init
    warm = {"warm_start": recipe.warm_start,
            "warm_start_wall_s": non.wall_s if (non is not None and recipe.warm_start == "non") else 0.0}

    def oracle():  # same minibatch sequence for every SOL method of this seed
        return SolverInTheLoopOracle(step, net, train, unroll=recipe.unroll, batch_size=recipe.batch_size, seed=seed)

    cge = CoordinateEstimator(mu=recipe.mu, scheme=recipe.scheme)
    budget = recipe.sol_steps * cge.num_queries(d)  # ZO-SOL's queries; RGE-SOL gets the same
    if "fo-sol" in methods:
        res = train_fo_sol(oracle(), x0=x0, steps=recipe.sol_steps, lr=recipe.sol_lr)
        evaluate("fo-sol", res.params, res, warm)
    if "zo-sol" in methods:
        res = train_zo_sol(oracle(), estimator=cge, x0=x0, steps=recipe.sol_steps, lr=recipe.sol_lr, budget=budget)
        evaluate("zo-sol", res.params, res, {**warm, "estimator": repr(cge)})
    if "rge-sol" in methods:
        q = recipe.rge_q or d
        est = RandomEstimator(mu=recipe.rge_mu, q=q, seed=seed)
        steps = budget // est.num_queries(d)
        res = train_zo_sol(oracle(), estimator=est, x0=x0, steps=steps, lr=recipe.rge_lr, budget=budget)
        evaluate("rge-sol", res.params, res, {**warm, "estimator": repr(est)})
    if "hybrid-sol" in methods:
        hybrid_est: CoordinateEstimator | RandomEstimator
        if recipe.hybrid_q is None:
            hybrid_est = CoordinateEstimator(mu=recipe.mu, scheme="forward")
        else:
            hybrid_est = RandomEstimator(mu=recipe.hybrid_mu, q=recipe.hybrid_q, seed=seed)
        lr = recipe.sol_lr if recipe.hybrid_lr is None else recipe.hybrid_lr
        res = train_hybrid_sol(oracle(), estimator=hybrid_est, x0=x0, steps=recipe.sol_steps, lr=lr)
        evaluate("hybrid-sol", res.params, res, {**warm, "estimator": repr(hybrid_est)})
    return out


# --------------------------------------------------------------------------- command line




def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``pde`` subcommand to the ``zoblackbox`` parser's subparsers."""
    p = subparsers.add_parser(
        "pde", help="solver-in-the-loop correction of a coarse PhiFlow solver, trained through the black box",
        description="Generates the scenario's simulations locally, trains the chosen methods and reports the MAE of "
                    "corrected test rollouts against the downsampled reference (needs the pde extra: "
                    "pip install 'zoblackbox[pde]').")
    p.add_argument("--scenario", choices=SCENARIOS, default="burgers1d")
    p.add_argument("--method", nargs="+", choices=METHODS, default=["zo-sol"],
                   help="methods to run (fo-sol/zo-sol/rge-sol start from NON's parameters unless --warm-start none)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed of the network and the minibatches (0 <= seed < 2**63)")
    p.add_argument("--data-seed", type=seed_int, default=0,
                   help="seed of the generated simulations (0 <= seed < 2**63)")
    p.add_argument("--n-train", type=positive_int, default=None, help="training simulations (default: the recipe's, burgers 20, wake 6)")
    p.add_argument("--n-test", type=positive_int, default=None, help="test simulations (default: the recipe's, burgers 10, wake 2)")
    p.add_argument("--sim-steps", type=positive_int, default=None, help="recorded steps per simulation (default: the recipe's, burgers 100, wake 40)")
    p.add_argument("--warmup", type=non_negative_int, default=None, help="reference steps before recording")
    p.add_argument("--factor", type=positive_int, default=None,
                   help="reference resolution / source resolution (burgers 4, wake 2; 4 is the GPU-sized wake)")
    p.add_argument("--sol-steps", type=non_negative_int, default=None, help="optimizer steps of the SOL methods")
    p.add_argument("--non-steps", type=non_negative_int, default=None, help="optimizer steps of NON")
    p.add_argument("--unroll", type=positive_int, default=None, help="solver steps in the SOL loss (m)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="windows per SOL minibatch")
    p.add_argument("--lr", type=positive_float, default=None, help="Adam learning rate of fo-sol and zo-sol")
    p.add_argument("--rge-lr", type=positive_float, default=None, help="Adam learning rate of rge-sol")
    p.add_argument("--mu", type=positive_float, default=None, help="CGE step (default 1e-6, see docs/pde.md)")
    p.add_argument("--scheme", choices=["forward", "central"], default=None, help="CGE differences")
    p.add_argument("--q", type=positive_int, default=None, help="RGE directions per step (default: the dimension)")
    p.add_argument("--hybrid-q", type=positive_int, default=None,
                   help="hybrid-sol: RGE directions per solver row (default: the recipe's; burgers: CGE over the state)")
    p.add_argument("--warm-start", choices=["non", "none"], default=None)
    p.add_argument("--validation-sims", type=non_negative_int, default=None,
                   help="hold back the last N training simulations as a validation set (default: the recipe's, "
                        "burgers 6, wake 2, or 0 with --n-train); 0 trains on all")
    p.add_argument("--threads", type=thread_count, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")
    p.set_defaults(handler=cmd_pde)
    return p


def recipe_from_args(args) -> Recipe:
    recipe = RECIPES[args.scenario]
    overrides = {"sol_steps": args.sol_steps, "non_steps": args.non_steps, "unroll": args.unroll,
                 "batch_size": args.batch_size, "sol_lr": args.lr, "rge_lr": args.rge_lr, "mu": args.mu,
                 "scheme": args.scheme, "rge_q": args.q, "warm_start": args.warm_start,
                 "hybrid_q": args.hybrid_q, "validation_sims": args.validation_sims}
    if args.validation_sims is None and args.n_train is not None:
        overrides["validation_sims"] = 0  # the recipe's validation set belongs to the recipe's training set
    return replace(recipe, **{k: v for k, v in overrides.items() if v is not None})


def cmd_pde(args) -> int:
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    recipe = recipe_from_args(args)
    problem = make_problem(args.scenario, n_train=args.n_train, n_test=args.n_test, data_seed=args.data_seed,
                           sim_steps=args.sim_steps, warmup=args.warmup, factor=args.factor,
                           config=recipe.scenario_config)
    if recipe.unroll > problem.train.n_steps:
        raise ConfigError(f"--unroll {recipe.unroll} exceeds the {problem.train.n_steps} recorded steps")
    print(f"zoblackbox pde: {args.scenario}, {problem.train.n_sims} training / {problem.test.n_sims} test simulations "
          f"of {problem.train.n_steps} steps, source {problem.step.scenario!r}")
    held = recipe.validation_sims
    if held:
        print(f"  the methods fit {problem.train.n_sims - held} of the training simulations; the last {held} are "
              "validation")
    results = run_methods(problem, args.method, recipe, args.seed)
    wall = time.perf_counter() - t0
    print(f"\n  {'method':<10}{'val MAE':>9}{'test MAE':>10}{'queries':>12}{'solver calls':>14}{'train s':>9}")
    for name, r in results.items():
        shown = "-" if r.get("val_mae") is None else f"{r['val_mae']:.4f}"
        print(f"  {name:<10}{shown:>9}{r['mae']:>10.4f}{r['queries']:>12,}{r['solver_calls']:>14,}"
              f"{r['train_wall_s']:>9.1f}")
    print(f"total {wall:.1f} s")
    if args.json is not None:
        summary = {"scenario": args.scenario, "seed": args.seed, "data_seed": args.data_seed, "recipe": asdict(recipe),
                   "config": problem.config, "methods": results, "wall_s": wall,
                   "mae": {name: r["mae"] for name, r in results.items()},
                   "queries": {name: r["queries"] for name, r in results.items()}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"results written to {args.json}")
    return fail_nonfinite({f"{name} test MAE": r["mae"] for name, r in results.items()},
                          "the learning rate (--lr, --rge-lr) is likely too large, or --mu too small for the solver")
