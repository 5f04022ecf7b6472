"""The engine redesign keeps behaviour: the same runs on this checkout and on the commit before it.

Every optimization loop of the library became a driver of one ask/tell engine (``zoblackbox.AskTell``).
This script runs the same cases with the current code and with a reference commit (default
``7a137ad``, the last commit before the engine) and compares what they return:

* ``minimize``: Adam (auto estimator), native L-BFGS, noise-aware L-BFGS with central CGE,
  ``torch.optim.LBFGS``, RGE + SGD -- on a vectorized 8-D Rosenbrock, 900 queries each;
* ``Trainer``: a digits MLP, 2 epochs, CGE + Adam, RGE + Adam, first order, SGD with momentum;
* the CNN recipe of ``benchmarks/peers_bbo.py`` (``run_cge_recipe``), 30 steps, dense and 75% sparse;
* ``zoblackbox demo`` (skipped with ``--quick``).

For each case it records a SHA-256 of the returned parameters and the scalar results (loss,
queries, iterations, accuracy); ``equal`` is true when all of them are identical. Wall times are
reported, not compared. The reference runs in a subprocess on a ``git worktree`` of the reference
commit (its ``adapters/`` copied inside the package so that nothing of this checkout is imported);
the reference commit must be in the clone's history (not a shallow clone).

Run:  python benchmarks/engine_equivalence.py [--quick] [--against REV]
Writes benchmarks/results/engine_equivalence.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _digest(array) -> str:
    import numpy as np

    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def run_cases(bench_dir: Path, quick: bool) -> dict:
    """The cases on whatever ``zoblackbox`` is importable (this checkout or the reference)."""
    import numpy as np
    import torch
    from scipy.optimize import rosen

    from zoblackbox import CoordinateEstimator, FunctionOracle, RandomEstimator, Trainer, minimize
    from zoblackbox.data import load_digits_split, make_loader
    from zoblackbox.models import digits_mlp

    torch.set_num_threads(1)
    out: dict = {}

    def oracle():
        return FunctionOracle(lambda X: torch.as_tensor(rosen(X.T.numpy())), 8, vectorized=True, dtype=torch.float64)

    minimize_cases = {
        "minimize_adam": {"optimizer": "adam", "budget": 900},  # the default before minimize's auto strategy
        "minimize_lbfgs": {"optimizer": "lbfgs", "estimator": CoordinateEstimator(mu=1e-6), "budget": 900},
        "minimize_lbfgs_noisy": {"optimizer": "lbfgs", "estimator": CoordinateEstimator(mu=1e-3, scheme="central"),
                                 "optimizer_kwargs": {"noise": 1e-4}, "budget": 900},
        "minimize_torch_lbfgs": {"optimizer": torch.optim.LBFGS, "estimator": CoordinateEstimator(mu=1e-6),
                                 "budget": 900},
        "minimize_rge_sgd": {"estimator": RandomEstimator(q=4, seed=2), "optimizer": "sgd", "lr": 1e-3, "budget": 900},
    }
    for name, kw in minimize_cases.items():
        t0 = time.perf_counter()
        r = minimize(oracle(), np.zeros(8), **kw)
        out[name] = {"x": _digest(r.x), "fun": r.fun, "nfev": r.nfev, "nit": r.nit,
                     "history": len(r.history), "wall_s": time.perf_counter() - t0}

    digits = load_digits_split(seed=0)
    trainer_cases = {"trainer_cge": {}, "trainer_rge": {"estimator": RandomEstimator(q=8, seed=3)},
                     "trainer_fo": {"method": "fo"},
                     "trainer_sgd_momentum": {"optimizer": "sgd", "optimizer_kwargs": {"momentum": 0.9},
                                              "lr_schedule": "constant"}}
    for name, kw in trainer_cases.items():
        torch.manual_seed(0)
        model = digits_mlp(hidden=16)
        loader = make_loader(digits.x_train[:512], digits.y_train[:512], 64, shuffle=True, seed=1)
        t0 = time.perf_counter()
        r = Trainer(model, loader, None, lr=0.05, epochs=2, progress=False, **kw).fit()
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
        out[name] = {"x": _digest(params), "queries": r["queries"], "steps": r["steps"],
                     "train_acc": r["train_acc"], "wall_s": time.perf_counter() - t0}

    sys.path.insert(0, str(bench_dir))
    import cge_vs_rge as cvr
    import peers_bbo as pb

    problem = cvr.EqualBudgetProblem(cvr.standardized_digits(), 0, 30_000)
    for name, extra in (("cnn_recipe_sparse", {}), ("cnn_recipe_dense", {"sparsity": 0.0})):
        r = pb.run_cge_recipe(problem, {**pb.CNN_RECIPE, "steps": 30, **extra})
        out[name] = {"x": _digest(np.asarray(r["x"])), "acc": r["acc"], "val_acc": r["val_acc"],
                     "queries": r["queries"], "wall_s": r["wall_s"]}

    if not quick:
        from zoblackbox.cli import main

        with tempfile.TemporaryDirectory() as tmp:
            summary = Path(tmp) / "demo.json"
            t0 = time.perf_counter()
            main(["demo", "--json", str(summary), "--no-progress"])
            demo = json.loads(summary.read_text())
        out["demo"] = {"test_acc": demo["test_acc"], "fo_test_acc": demo["fo_test_acc"], "queries": demo["queries"],
                       "steps": demo["steps"], "wall_s": time.perf_counter() - t0}
    return out


def reference_run(rev: str, quick: bool) -> dict:
    """The cases on a worktree of ``rev``, in a subprocess that imports nothing of this checkout."""
    tmp = Path(tempfile.mkdtemp(prefix="zoblackbox-ref-"))
    tree = tmp / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), rev], check=True,
                   capture_output=True)
    try:
        shutil.copytree(tree / "adapters", tree / "zoblackbox" / "adapters")  # found before the editable install's
        result = tmp / "ref.json"
        env = {**os.environ, "PYTHONPATH": str(tree)}
        subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", str(result),
                        "--bench-dir", str(tree / "benchmarks")] + (["--quick"] if quick else []),
                       check=True, env=env, cwd=tmp)
        return json.loads(result.read_text())
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False,
                       capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def compare(ref: dict, new: dict) -> dict:
    rows = {}
    for name, b in new.items():
        a = ref.get(name)
        keys = sorted(k for k in b if k != "wall_s")
        equal = a is not None and all(a.get(k) == b.get(k) for k in keys)
        rows[name] = {"equal": equal, "reference": a, "engine": b,
                      "wall_ratio": (b["wall_s"] / a["wall_s"]) if a and a.get("wall_s") else None}
    return rows


def plot(rows: dict, path: Path) -> None:
    """Wall time of each case, engine / reference (1 = the same), labelled identical or different."""
    import _common

    fig, ax = _common.new_figure(width=9.0)
    names = [n for n, r in rows.items() if r["wall_ratio"]]
    ratios = [rows[n]["wall_ratio"] for n in names]
    colors = ["#55a868" if rows[n]["equal"] else "#c44e52" for n in names]
    ax.barh(names, ratios, color=colors)
    ax.axvline(1.0, color="k", lw=0.8)
    for i, n in enumerate(names):
        ax.annotate(f"{ratios[i]:.2f}  {'identical' if rows[n]['equal'] else 'DIFFERENT'}", (ratios[i], i),
                    va="center", fontsize=8, xytext=(3, 0), textcoords="offset points")
    ax.set_xlabel("wall time, engine / reference commit (results: green = bitwise identical)")
    ax.set_title("One ask/tell engine under every loop: same results", fontsize=10)
    ax.set_xlim(0, max(ratios + [1.0]) * 1.4)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="skip the demo (about 1 minute instead of 2)")
    ap.add_argument("--against", default="7a137ad", help="reference commit (default: the last one before the engine)")
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bench-dir", type=Path, default=ROOT / "benchmarks", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engine_equivalence.json")
    args = ap.parse_args(argv)
    if args.worker is not None:
        args.worker.write_text(json.dumps(run_cases(args.bench_dir, args.quick)))
        return {}
    import _common

    new = run_cases(ROOT / "benchmarks", args.quick)
    ref = reference_run(args.against, args.quick)
    rows = compare(ref, new)
    result = {"benchmark": "engine_equivalence", "command": "python benchmarks/engine_equivalence.py"
              + (" --quick" if args.quick else ""), "reference_commit": args.against,
              "machine": _common.machine_info() if hasattr(_common, "machine_info") else None,
              "all_equal": all(r["equal"] for r in rows.values()), "cases": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    plot(rows, args.out.with_suffix(".png"))
    for name, r in rows.items():
        ratio = f"{r['wall_ratio']:.2f}" if r["wall_ratio"] else "-"
        print(f"{name:24s} {'identical' if r['equal'] else 'DIFFERENT'}   wall engine/reference {ratio}")
    print(f"all identical: {result['all_equal']}; wrote {args.out}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
