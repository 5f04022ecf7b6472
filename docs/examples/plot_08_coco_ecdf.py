"""
COCO benchmark: an ECDF of minimize against scipy and pycma
===========================================================

A small run of the COCO platform's BBOB suite (``cocoex``): five functions in dimension 2
(sphere, ellipsoid, Rosenbrock, Rastrigin, Schwefel x sin x), three instances each, 200 function
evaluations per run, for :func:`zoblackbox.minimize` with its defaults, scipy's L-BFGS-B and
pycma's IPOP-CMA-ES. COCO's observer logs every evaluation; ``cocopp``, COCO's post-processing,
then draws its runtime ECDF: the fraction of (instance, target) pairs reached against evaluations
per dimension. The full benchmark (dimensions 2 to 40, 24 functions, held-out instances) is in
``benchmarks/bbob.py`` and ``docs/minimize.md``; its results are not recomputed here.
"""

import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import cma
import cocoex
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import scipy.optimize

from zoblackbox import minimize

FUNCTIONS, DIM, INSTANCES, BUDGET = (1, 2, 8, 15, 20), 2, (1, 2, 3), 200


class BudgetSpent(Exception):
    pass


def capped(problem):
    """The problem as a solver sees it: 1-D float64 in, float out, at most BUDGET evaluations."""
    count = 0

    def f(x):
        nonlocal count
        if count >= BUDGET:
            raise BudgetSpent
        count += 1
        return float(problem(np.ascontiguousarray(x, dtype=np.float64).reshape(-1)))

    return f


def solve(solver, problem):
    f, x0 = capped(problem), np.array(problem.initial_solution, dtype=np.float64)
    try:
        if solver == "zoblackbox":
            minimize(f, x0, budget=BUDGET)
        elif solver == "scipy":
            scipy.optimize.minimize(f, x0, method="L-BFGS-B", options={"maxfun": BUDGET})
        else:
            cma.fmin2(f, x0, 2, {"maxfevals": BUDGET, "verbose": -9, "seed": 1}, restarts=9, incpopsize=2)
    except BudgetSpent:  # a solver that overshoots its own evaluation limit is stopped at BUDGET
        pass


def log_runs(solver):
    """Run ``solver`` on every problem with COCO's observer; returns the folder of its logs."""
    observer = cocoex.Observer("bbob", f"result_folder: {solver} algorithm_name: {solver}")
    for function in FUNCTIONS:
        for instance in INSTANCES:
            # one suite per run, freed with its problem (as benchmarks/bbob.py does)
            suite = cocoex.Suite("bbob", f"instances: {instance}", f"dimensions: {DIM} function_indices: {function}")
            problem = suite[0]
            problem.observe_with(observer)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pycma's and scipy's notes about tiny budgets
                solve(solver, problem)
            problem.free()
            suite.free()
    return str(observer.result_folder)


work = Path(tempfile.mkdtemp())
here = os.getcwd()
os.chdir(work)  # COCO writes its observer data under ./exdata
try:
    folders = [log_runs(solver) for solver in ("zoblackbox", "scipy", "pycma")]
    print("COCO logs:", ", ".join(Path(f).name for f in folders))
    # cocopp in its own process: it writes an HTML report and its figures (PNG only here)
    script = ("import matplotlib; matplotlib.use('Agg'); import cocopp; "
              "cocopp.genericsettings.figure_file_formats = ['png']; "
              "cocopp.main(['--no-interactive', '-o', 'ppdata', *__import__('sys').argv[1:]])")
    subprocess.run([sys.executable, "-c", script, *folders], check=True, capture_output=True, timeout=600)
    (ecdf,) = [p for p in Path("ppdata").rglob(f"pprldmany_{DIM:02d}D_noiselessall.png")
               if not p.parent.name.startswith("pprldmany-single")]
    image = mpimg.imread(ecdf)
finally:
    os.chdir(here)

# %%
# cocopp's runtime ECDF over all five functions (each line: one solver; higher and further left
# is better).
fig, ax = plt.subplots(figsize=(7, 5))
ax.imshow(image)
ax.axis("off")
ax.set_title(f"COCO BBOB, d = {DIM}, functions {FUNCTIONS}, {BUDGET} evaluations (cocopp)")
fig.tight_layout()
plt.show()
