"""Solver-in-the-loop PDE correction: SRC, NON, FO-SOL, ZO-SOL and HYBRID-SOL side by side.

Two scenarios (``zoblackbox pde --scenario ...``), recipes in ``RECIPES`` of
``zoblackbox/recipes.py``, all data generated locally:

* ``burgers1d`` -- 1-D forced viscous Burgers (L=32, nu=0.1). The reference runs 128 cells at
  dt = 0.1; the source solver is 4x coarser in space (32 cells) and 10x in time (one step of
  dt = 1.0). 100 recorded steps; 20 training simulations (the methods fit 0-13, 14-19 are the
  validation set the recipe was chosen on) and 10 test simulations (data seed 0). Correction: a
  457-parameter 1-D CNN (two hidden layers of 8 channels, kernel 5, ReLU, circular padding).
* ``wake2d`` -- 2-D incompressible wake behind a cylinder (PhiFlow's pressure projection), a
  CPU-sized version of DeepZero's setting: source 32 x 16 cells, reference 2x finer, 40 recorded
  steps, 6 training (fit 0-3, validation 4-5) and 2 test simulations of different viscosities.
  Correction: a 1,026-parameter 2-D CNN (two hidden layers of 8 channels, kernel 3).

The two scenarios run in parallel processes (``--jobs 2``), one per core.

Methods (5 seeds each: network init and minibatches; the data are fixed):

* SRC: the source solver alone;
* NON: supervised on precomputed one-step pairs (no solver in the loop);
* FO-SOL: NON's parameters, then Adam on the loss of ``unroll`` corrected solver steps, autograd
  through PhiFlow (the reference a differentiable solver allows);
* ZO-SOL (DeepZero): the same start, steps and minibatches, CGE over the network's parameters
  through the black-box rollout; the ``d + 1`` (``2 d + 1`` central) queries of a step share one
  batched solver call per unrolled step;
* HYBRID-SOL: the same, backprop through the network with each solver step a
  ``zoblackbox.nn.BlackBox`` (forward CGE over the 32-cell Burgers state: ``n + 1`` solver rows per
  rolled-out row; RGE with q = 16 on the 1,122-value wake state).

Metric: MAE of corrected rollouts of the test simulations (all recorded steps) against the
downsampled reference. Solver calls are counted as rows the solver evaluated (``solver_calls``);
``solver_batches`` counts the batched calls.

**Targets** (per scenario): FO-SOL MAE <= 0.8 x NON MAE in at least 4 of 5 seeds; ZO-SOL closes
>= 80% of the NON -> FO-SOL gap (mean over seeds, ``(NON - ZO) / (NON - FO)``); HYBRID-SOL closes
>= 95% of it with >= 10x fewer solver rows than ZO-SOL; the full run <= 30 minutes on 2 cores,
``--quick`` <= 5 minutes.

The recipes were chosen on training simulations only (``TUNING``, also in the JSON).

Run:  python benchmarks/pde_sil.py            (both scenarios, 5 seeds)
      python benchmarks/pde_sil.py --quick    (1 seed, fewer SOL steps, smaller data)
      python benchmarks/pde_sil.py --plot-only
Writes benchmarks/results/pde_sil.json and pde_sil.png (``--out-dir``/``--name`` to change).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import torch
from _common import RESULTS, machine_info, new_figure, save_figure, set_threads, warn_if_busy

from zoblackbox.cli_pde import SCENARIOS, make_problem, run_methods
from zoblackbox.recipes import RECIPES

METHODS = ("src", "non", "fo-sol", "zo-sol", "hybrid-sol")
LABELS = {"src": "SRC", "non": "NON", "fo-sol": "FO-SOL", "zo-sol": "ZO-SOL", "hybrid-sol": "HYBRID-SOL"}
COLORS = {"SRC": "#999999", "NON": "#4c72b0", "FO-SOL": "#55a868", "ZO-SOL": "#c44e52", "HYBRID-SOL": "#dd8452"}
FO_NON_RATIO, FO_NON_SEEDS = 0.8, 4  # FO-SOL <= 0.8 x NON in >= 4 of 5 seeds
ZO_GAP, HYBRID_GAP, HYBRID_FEWER = 0.80, 0.95, 10.0
FULL_LIMIT_S, QUICK_LIMIT_S = 1800.0, 300.0
#: --quick: 1 seed, and per scenario fewer SOL steps / simulations (a smoke run of every method)
QUICK = {"burgers1d": {"recipe": {"sol_steps": 60, "non_steps": 500, "validation_sims": 2},
                       "config": {"n_train": 8, "n_test": 4}},
         "wake2d": {"recipe": {"sol_steps": 4, "non_steps": 100, "validation_sims": 1},
                    "config": {"steps": 16, "n_train": 3, "n_test": 1}}}

#: How the recipes were chosen: validation MAE of full rollouts on training simulations only (burgers:
#: fit on 0-13, validate on 14-19 of the 20 training simulations, data seed 0; earlier rows on the old
#: 10-simulation set, fit 0-6 / validate 7-9). "ratio" = FO-SOL / NON validation MAE per seed.
TUNING = {
    "burgers1d": {
        "split": "training simulations only: fit 0-13, validate 14-19 (20 training simulations); the 10 test "
                 "simulations were never used to choose anything",
        "grid": [
            {"scenario": "old default: dt 0.1, 32/128 cells, 200 steps (fit 0-6 / val 7-9)", "fo": "unroll 16, lr 1e-3",
             "ratio_seed0": 1.31},
            {"scenario": "nu 0.02, dt 0.1", "fo": "unroll 16 lr 1e-3 / unroll 32 lr 3e-4", "ratio_seed0": [0.97, 0.99]},
            {"scenario": "16 source cells, dt 0.1", "fo": "unroll 16 lr 1e-3 / unroll 32 lr 3e-4",
             "ratio_seed0": [0.91, 0.93]},
            {"scenario": "source dt 0.4 (reference 4 substeps), 200 steps, 10 training sims (fit 0-6)",
             "fo": "unroll 16, lr 1e-3, batch 2", "ratio_seeds_0_1_2": [0.70, 0.66, 0.97]},
            {"scenario": "the same with 20 training sims (fit 0-13)", "fo": "unroll 16, lr 1e-3, batch 2",
             "ratio_seeds_0_1_2_3": [1.04, 0.78, 1.01, 1.34],
             "note": "the dt 0.4 effect did not survive a larger validation set"},
            {"scenario": "source dt 0.4, 64-step rollouts", "fo": "unroll 16", "ratio_seeds_0_1_2_3": [0.94, 1.20, 0.99, 0.99]},
            {"scenario": "source dt 0.6, 150 steps", "fo": "unroll 16 lr 3e-4", "ratio_seeds_0_1_2": [0.87, 1.10, 0.90]},
            {"scenario": "source dt 0.8, 100 steps", "fo": "unroll 16 lr 1e-3", "ratio_seeds_0_1_2_3": [0.97, 1.04, 1.27, 1.13]},
            {"scenario": "source dt 1.2, 100 steps (NON worse than SRC)", "fo": "unroll 16 lr 3e-4 batch 2",
             "ratio_seeds_0_1_2_3": [0.47, 0.51, 0.45, 1.22], "note": "tanh/GELU networks: NON diverges, 0.22-2.5"},
            {"scenario": "source dt 1.0, 100 steps", "fo": "unroll 16, lr 3e-4, batch 4, grad-norm clip 1",
             "ratio_seeds_0_to_4": [0.51, 0.84, 0.85, 0.87, 0.92]},
            {"scenario": "source dt 1.0, 100 steps (chosen)", "fo": "unroll 16, lr 3e-4, batch 4, 300 steps (chosen)",
             "ratio_seeds_0_to_4": [0.50, 0.81, 0.83, 0.87, 0.93],
             "validation_mae_mean": {"SRC": 0.0929, "NON": 0.0978, "FO-SOL": 0.0774},
             "note": "the same without clipping (the library's Adam has none); only 1 of 5 seeds meets 0.8 on "
                     "validation, so the FO-SOL target was expected to be missed"},
            {"scenario": "source dt 1.0, 100 steps", "fo": "unroll 16, lr 1e-3, batch 4, 600 steps",
             "ratio_seeds_0_to_3": [0.56, 0.85, 1.21, 0.74]},
            {"scenario": "source dt 1.0, network 16-16 channels kernel 7 (4,433 parameters)", "fo": "unroll 16 lr 3e-4",
             "ratio_seed0": 1.03, "note": "with more capacity NON is as good as FO-SOL (0.045)"},
            {"scenario": "FO-SOL from scratch (no NON warm start), dt 0.1 and 0.4", "fo": "unroll 16, lr 3e-3, 1000 steps",
             "ratio_seeds_0_1_2": [1.20, 1.11, 1.17], "note": "worse than NON"},
        ],
    },
    "burgers1d_session_2026_12_08": {
        "split": "the same split, now also the benchmark's: every method fits training simulations 0-13 and "
                 "14-19 are held back (Recipe.validation_sims = 6); the earlier rows trained NON on all 20 for the "
                 "test run, so their validation numbers did not predict it",
        "finding": "NON fit on 14 simulations is unstable on simulation 18 (validation MAE 0.07-0.49 over seeds 0-4, "
                   "SRC 0.13); fit on all 20 it is 0.05-0.07. Unrolled training keeps the corrected rollouts on "
                   "states NON never saw: the distribution-shift effect of Um et al.",
        "selection_rule": "most seeds with FO-SOL <= 0.8 x NON, then the lowest mean ratio (seeds 0-4; 5-9 to check)",
        "grid": [
            {"fo": "lr 3e-4 (the old recipe)", "ratios_seeds_0_to_4": [0.674, 0.336, 0.895, 0.531, 0.487]},
            {"fo": "lr 1e-3 (chosen)", "ratios_seeds_0_to_4": [0.533, 0.355, 0.940, 0.448, 0.384],
             "ratios_seeds_5_to_9": [0.790, 0.776, 0.965, 0.002, 0.874]},
            {"fo": "lr 3e-3", "ratios_seeds_0_to_4": [0.619, 0.153, 0.972, 0.484, 0.377]},
            {"fo": "lr 3e-4, 600 steps", "ratios_seeds_0_to_4": [0.635, 0.412, 0.961, 0.585, 0.459]},
            {"fo": "lr 3e-4, unroll 32", "ratios_seeds_0_to_4": [1.268, 0.574, 0.981, 0.650, 0.630]},
            {"fo": "lr 1e-3, unroll 8", "ratios_seeds_0_to_4": [0.503, 0.399, 0.964, 0.512, 0.504]},
            {"fo": "lr 1e-3, batch 8", "ratios_seeds_0_to_4": [0.534, 0.287, 0.965, 0.489, 0.425],
             "ratios_seeds_5_to_9": [0.874, 0.814, 1.316, 0.002, 0.909]},
            {"fo": "lr 1e-3, network (4,)", "ratios_seeds_0_to_4": [0.865, 0.897, 0.851, 0.674, 0.596]},
            {"fo": "lr 1e-3, network (4, 4) kernel 3", "ratios_seeds_0_to_4": [1.069, 0.993, 1.074, 0.628, 0.865]},
            {"scenario": "fit 0-9, validate 10-19", "fo": "lr 1e-3",
             "ratios_seeds_0_to_9": [0.895, 0.630, 0.919, 0.962, 0.873, 0.769, 0.710, 0.838, 0.480, 0.850]},
            {"scenario": "nu 0.02 / nu 0 / source dt 1.2", "fo": "lr 3e-4",
             "ratios_seeds_0_to_4": {"nu 0.02": [0.721, 1.04, 0.779, 0.848, 1.539],
                                     "nu 0": [0.666, 0.977, 0.909, 0.831, 0.772],
                                     "dt 1.2": [0.763, 0.697, 0.913, 0.878, 0.171]}},
            {"scenario": "200 recorded steps", "fo": "lr 1e-3",
             "ratios_seeds_0_to_9": [0.888, 0.018, 0.045, 1.079, 0.003, 0.889, 576.8, 0.17, 0.002, 0.656],
             "note": "NON and FO-SOL both diverge on some seeds"},
        ],
        "expected": "7 of the 10 validation seeds meet 0.8 with the chosen recipe, so 4 of 5 test seeds is not certain",
    },
    "wake2d": {
        "split": "6 training simulations: fit 0-3, validate 4-5 (Recipe.validation_sims = 2); test 6-7 (new: the "
                 "simulations 4-5, the test set of the runs before, are validation now and the test set is fresh)",
        "bug": "before 2026-12-08 the scenario's inflow mask covered every face, so the flow was static: the earlier "
               "wake rows measured corrections of a fixed field and are void",
        "selection_rule": "the best NON on validation within the budget, then the FO-SOL setting with the lowest "
                          "mean FO-SOL / NON ratio",
        "grid": [
            {"net": "(4,) kernel 3, 222 parameters, NON 300 steps (the old recipe)", "fo": "40 steps, lr 1e-3",
             "validation_mae": {"SRC": 0.0206, "NON": [0.0200, 0.0190, 0.0220, 0.0196, 0.0225]},
             "ratios_seeds_0_to_4": [1.025, 0.981, 0.932, 1.040, 0.868]},
            {"net": "the same, warm-up 100 steps", "fo": "40 steps, lr 1e-3",
             "ratios_seeds_0_to_4": [0.963, 0.935, 1.003, 1.138, 0.938]},
            {"net": "NON only, 2000 steps, seeds 0-1", "validation_mae_NON": {
                "(4,) k3, 222": [0.0166, 0.0177], "(8,) k3, 442": [0.0082, 0.0128], "(8,) k5, 1210": [0.0198, 0.0198],
                "(8, 8) k3, 1026, 1000 steps": [0.0054, 0.0097], "(8, 8) k3, 1026 (chosen)": [0.0045, 0.0057]}},
            {"net": "(8, 8) k3, NON 2000 steps", "fo": "40 steps, lr 1e-3",
             "ratios_seeds_0_to_4": [1.070, 1.030, 1.390, 0.968, 1.058]},
            {"net": "(8, 8) k3, NON 2000 steps", "fo": "20 steps, lr 1e-3",
             "ratios_seeds_0_to_4": [1.315, 1.136, 1.561, 1.520, 1.009]},
            {"net": "(8, 8) k3, NON 2000 steps (chosen)", "fo": "20 steps, lr 3e-4 (chosen)",
             "validation_mae": {"SRC": 0.0206, "NON": [0.0045, 0.0057, 0.0036, 0.0048, 0.0075],
                                "FO-SOL": [0.0049, 0.0056, 0.0037, 0.0049, 0.0072]},
             "ratios_seeds_0_to_4": [1.069, 0.979, 1.004, 1.019, 0.968]},
        ],
        "expected": "no setting reached FO-SOL <= 0.8 x NON on validation: the FO-SOL target was expected to be "
                    "missed; the 30-minute budget allows 20 SOL steps of unroll 2 at this network size (ZO-SOL "
                    "evaluates 2,053 rows per solver call, ~3 s each)",
    },
}


def mean_std(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "per_seed": values}


def scenario_summary(per_seed: dict[int, dict], problem, recipe) -> dict:
    runs = {LABELS[m]: [per_seed[s][m] for s in sorted(per_seed)] for m in next(iter(per_seed.values()))}
    mae = {name: mean_std([r["mae"] for r in rs]) for name, rs in runs.items()}

    def per_method(key):
        return {name: statistics.fmean(r[key] for r in rs) for name, rs in runs.items()}

    val = {name: mean_std([r["val_mae"] for r in rs]) for name, rs in runs.items()
           if all(r.get("val_mae") is not None for r in rs)}
    out = {"mae": mae, "val_mae": val, "solver_calls": per_method("solver_rows"), "solver_batches": per_method("solver_calls"),
           "queries": per_method("queries"), "wall_s": per_method("train_wall_s"), "sol_steps": per_method("steps"),
           "seeds": sorted(per_seed), "params": runs["SRC"][0]["params"],
           "mae_curve_mean": {n: torch.tensor([r["mae_curve"] for r in rs]).mean(0).tolist() for n, rs in runs.items()},
           "failures": {name: [r["failures"] for r in rs] for name, rs in runs.items()},
           "estimators": {name: rs[0].get("estimator") for name, rs in runs.items() if rs[0].get("estimator")},
           "data": {"n_train": problem.train.n_sims, "n_validation": recipe.validation_sims,
                    "n_fit": problem.train.n_sims - recipe.validation_sims, "n_test": problem.test.n_sims,
                    "steps": problem.test.n_steps,
                    "config": problem.config},
           "recipe": asdict(recipe)}
    out["targets"] = targets(out)
    return out


def targets(s: dict) -> dict:
    mae = s["mae"]
    non, fo = mae["NON"]["per_seed"], mae["FO-SOL"]["per_seed"]
    wins = sum(f <= FO_NON_RATIO * n for f, n in zip(fo, non))
    need = min(FO_NON_SEEDS, len(non))
    t = {"fo_vs_non": {"seeds_met": wins, "seeds": len(non), "ratios": [f / n for f, n in zip(fo, non)],
                       "target": f"FO-SOL <= {FO_NON_RATIO} x NON in >= {FO_NON_SEEDS} of 5 seeds", "met": wins >= need}}
    gap = mae["NON"]["mean"] - mae["FO-SOL"]["mean"]
    for name, key, goal in (("ZO-SOL", "zo_gap_closed", ZO_GAP), ("HYBRID-SOL", "hybrid_gap_closed", HYBRID_GAP)):
        if name in mae:
            closed = (mae["NON"]["mean"] - mae[name]["mean"]) / gap if gap > 0 else None
            t[key] = {"value": closed, "target": goal, "met": closed is not None and closed >= goal,
                      "note": None if gap > 0 else "FO-SOL does not beat NON on the mean: no gap to close"}
    if "ZO-SOL" in mae and "HYBRID-SOL" in mae and s["solver_calls"]["HYBRID-SOL"]:
        ratio = s["solver_calls"]["ZO-SOL"] / s["solver_calls"]["HYBRID-SOL"]
        t["hybrid_fewer_solver_calls"] = {"value": ratio, "target": HYBRID_FEWER, "met": ratio >= HYBRID_FEWER}
    return t


def plot(result: dict, name: str, out_dir: Path) -> Path:
    scen = list(result["scenarios"])
    fig, axes = new_figure(ncols=2 * len(scen), width=4.6, height=4.4)
    for i, sc in enumerate(scen):
        s = result["scenarios"][sc]
        ax, ax2 = axes[2 * i], axes[2 * i + 1]
        names = list(s["mae"])
        means = [s["mae"][m]["mean"] for m in names]
        stds = [s["mae"][m]["std"] for m in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color=[COLORS[m] for m in names])
        for j, m in enumerate(names):
            pts = s["mae"][m]["per_seed"]
            ax.scatter([j] * len(pts), pts, color="k", s=8, zorder=3)
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_ylabel("test MAE (dots: seeds)")
        t = s["targets"]
        ax.set_title(f"{sc}: FO <= 0.8 NON in {t['fo_vs_non']['seeds_met']}/{t['fo_vs_non']['seeds']} seeds", fontsize=9)
        sol = [m for m in names if s["solver_calls"][m] > 0]
        ax2.bar(range(len(sol)), [s["solver_calls"][m] for m in sol], color=[COLORS[m] for m in sol])
        ax2.set_yscale("log")
        ax2.set_xticks(range(len(sol)), sol, rotation=30, fontsize=8)
        ax2.set_ylabel("solver rows per training run")
        ax2.set_title(f"{sc}: solver rows (log)", fontsize=9)
    fig.suptitle("Solver-in-the-loop correction through a black-box PhiFlow solver "
                 f"({'quick' if result.get('quick') else 'full'} run, {result['wall_s']:.0f} s)", fontsize=10)
    out_dir.mkdir(parents=True, exist_ok=True)
    if out_dir == RESULTS:
        return save_figure(fig, name)
    fig.tight_layout()
    path = out_dir / f"{name}.png"
    fig.savefig(path, dpi=110)
    return path


def run_scenario(sc: str, quick: bool, data_seed: int, seeds: list[int], threads: int) -> dict:
    """Every method on one scenario for ``seeds``: the scenario's summary (``scenario_summary``)."""
    set_threads(threads)
    # phiml's implicit solves build torch sparse CSR matrices; torch notes (once) that its sparse support is in
    # beta and that invariant checks are off -- nothing this benchmark can act on (also filtered in pytest)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state", category=UserWarning)
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled", category=UserWarning)
    recipe = RECIPES[sc]
    config = recipe.scenario_config
    if quick:
        recipe = replace(recipe, **QUICK[sc]["recipe"])
        config = {**config, **QUICK[sc]["config"]}
    ts = time.perf_counter()
    problem = make_problem(sc, data_seed=data_seed, config=config)
    print(f"{sc}: {problem.train.n_sims} training ({recipe.validation_sims} held back for validation) / "
          f"{problem.test.n_sims} test simulations of {problem.test.n_steps} steps ({time.perf_counter() - ts:.1f} s)",
          flush=True)

    def log(msg):
        print(f"[{sc}] {msg.strip()}", flush=True)

    per_seed = {seed: run_methods(problem, list(METHODS), recipe, seed, log=log) for seed in seeds}
    summary = scenario_summary(per_seed, problem, recipe)
    summary["scenario_wall_s"] = time.perf_counter() - ts
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer SOL steps and simulations (smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per scenario process")
    parser.add_argument("--jobs", type=int, default=2,
                        help="scenarios run in parallel processes (default 2: one per core of the 2-core target)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--name", default=None, help="file name (default pde_sil, pde_sil_quick with --quick)")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = parser.parse_args(argv)
    name = args.name or ("pde_sil_quick" if args.quick else "pde_sil")
    if args.plot_only:
        print(plot(json.loads((args.out_dir / f"{name}.json").read_text()), name, args.out_dir))
        return 0
    set_threads(args.threads)  # as in each scenario's process, so machine_info records it
    warn_if_busy()
    seeds = args.seeds[:1] if args.quick else args.seeds
    jobs = max(1, min(args.jobs, len(args.scenarios)))
    t0 = time.perf_counter()
    result = {"scenarios": {}, "quick": args.quick, "seeds": seeds, "data_seed": args.data_seed, "jobs": jobs}
    work = [(sc, args.quick, args.data_seed, seeds, args.threads) for sc in args.scenarios]
    if jobs == 1:
        summaries = [run_scenario(*w) for w in work]
    else:  # one process per scenario, each on its own core (spawn: no forked torch/phiml state)
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            summaries = list(pool.map(run_scenario, *zip(*work)))
    for sc, summary in zip(args.scenarios, summaries):
        result["scenarios"][sc] = summary
    wall = time.perf_counter() - t0
    limit = QUICK_LIMIT_S if args.quick else FULL_LIMIT_S
    result.update(wall_s=wall, wall_target={"limit_s": limit, "met": wall <= limit}, tuning=TUNING,
                  command=" ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), machine=machine_info())
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    png = plot(result, name, args.out_dir)
    for sc, s in result["scenarios"].items():
        print(f"\n{sc}\n{'method':<11}{'MAE mean':>10}{'std':>9}{'queries':>12}{'solver rows':>13}{'train s':>9}")
        for m in s["mae"]:
            print(f"{m:<11}{s['mae'][m]['mean']:>10.4f}{s['mae'][m]['std']:>9.4f}{s['queries'][m]:>12,.0f}"
                  f"{s['solver_calls'][m]:>13,.0f}{s['wall_s'][m]:>9.1f}")
        for key, t in s["targets"].items():
            value = t.get("value", t.get("seeds_met"))
            print(f"  {key}: {value if not isinstance(value, float) else round(value, 3)} "
                  f"(target {t.get('target')}): {'met' if t['met'] else 'NOT met'}")
    print(f"\ntotal {wall:.0f} s (limit {limit:.0f} s: {'met' if wall <= limit else 'NOT met'}); wrote {path} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
