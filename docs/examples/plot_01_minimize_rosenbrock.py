"""
Minimize the Rosenbrock function with the defaults
==================================================

:func:`zoblackbox.minimize` with nothing but the function, a start point and a query budget, next
to :func:`scipy.optimize.minimize` with its defaults (BFGS on finite-difference gradients) on the
same 6-dimensional Rosenbrock function. Both only ever see function values; the plot shows the
best loss found against the number of function evaluations.
"""

import matplotlib.pyplot as plt
import numpy as np
import scipy.optimize

from zoblackbox import minimize

D = 6
x0 = np.zeros(D)
BUDGET = 2_000


def traced(fun):
    """``fun`` plus a record of every value it returned."""
    values = []

    def wrapper(x):
        y = float(fun(x))
        values.append(y)
        return y

    return wrapper, values


# %%
# zoblackbox: no settings but the budget. ``res.strategy`` says what the default strategy chose.
f_zo, zo_values = traced(scipy.optimize.rosen)
res = minimize(f_zo, x0, budget=BUDGET)
print(f"zoblackbox: f = {res.fun:.3g} after {res.nfev} queries ({res.message})")
for decision in res.strategy["decisions"]:
    print("  ", decision["phase"], "-", decision.get("why", ""))

# %%
# scipy: ``minimize(rosen, x0)`` with its defaults, capped at the same number of evaluations.
f_sp, sp_values = traced(scipy.optimize.rosen)
ref = scipy.optimize.minimize(f_sp, x0, options={"maxiter": BUDGET})
print(f"scipy BFGS: f = {ref.fun:.3g} after {ref.nfev} evaluations ({ref.message})")

# %%
# Best value so far against evaluations.
fig, ax = plt.subplots(figsize=(6, 4))
for values, label in ((zo_values, "zoblackbox.minimize (defaults)"), (sp_values, "scipy.optimize.minimize (BFGS)")):
    best = np.minimum.accumulate(np.maximum(values, 1e-16))
    ax.semilogy(np.arange(1, len(best) + 1), best, label=label)
ax.set_xlabel("function evaluations")
ax.set_ylabel("best f(x) so far")
ax.set_title(f"Rosenbrock, d = {D}, x0 = 0")
ax.legend()
fig.tight_layout()
plt.show()
