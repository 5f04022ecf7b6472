"""zoblackbox.nn: a black box inside autograd, with finite-difference vector-Jacobian products.

Reference gradients come from torch autograd through the same function written in torch ops, in
float64. Tolerances: central CGE (mu = 1e-5, and the default cbrt(eps) relative step) rtol 1e-6;
forward CGE (mu = 1e-7) rtol 1e-5. The one probabilistic test (RGE's mean) fixes its seed and
compares with four standard errors measured from its own samples.
"""

from __future__ import annotations

import doctest
import math
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

import zoblackbox.nn as zonn
from zoblackbox import (
    BudgetExhaustedError,
    ConfigError,
    CoordinateEstimator,
    FunctionOracle,
    OracleError,
    RandomEstimator,
)
from zoblackbox.estimators import StepUnderflow
from zoblackbox.nn import BlackBox, ExecutorRowScheduler, VectorFunctionOracle, VectorOracle

N, M = 4, 2


def smooth(X: torch.Tensor) -> torch.Tensor:
    """A smooth R^4 -> R^2 in torch ops (the autograd reference)."""
    return torch.stack([torch.sin(X[:, 0]) * X[:, 1] + X[:, 2] ** 2,
                        torch.exp(0.3 * X[:, 3]) * X[:, 0] - X[:, 1] * X[:, 2]], dim=1)


def smooth_numpy(X):
    """The same function computed in numpy: a black box torch cannot see into."""
    X = X.detach().cpu().numpy()
    return np.stack([np.sin(X[:, 0]) * X[:, 1] + X[:, 2] ** 2, np.exp(0.3 * X[:, 3]) * X[:, 0] - X[:, 1] * X[:, 2]],
                    axis=1)


class Recorder:
    """Counts the calls of ``fn`` and the rows of each call."""

    def __init__(self, fn=smooth_numpy):
        self.fn, self.rows = fn, []

    def __call__(self, X):
        self.rows.append(X.shape[0])
        return self.fn(X)


def inputs(B=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return (0.5 * torch.randn(B, N, generator=g, dtype=dtype)).requires_grad_()


# --------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("estimator, rtol", [
    (CoordinateEstimator(mu=1e-5, scheme="central"), 1e-6),
    (CoordinateEstimator(mu=1e-7, scheme="forward"), 1e-5),
    (None, 1e-6),  # default: central CGE, relative step cbrt(eps)
])
def test_gradients_through_the_black_box_match_autograd(estimator, rtol):
    """loss = g(BlackBox(f)(h(x))): gradients reach h's and g's parameters and x as with autograd."""
    torch.manual_seed(0)
    h = nn.Linear(3, N).double()
    g = nn.Sequential(nn.Linear(M, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    box = BlackBox(smooth_numpy, N, M, estimator)

    def grads(middle):
        for p in [*h.parameters(), *g.parameters(), x]:
            p.grad = None
        g(middle(h(x))).pow(2).sum().backward()
        return [p.grad.clone() for p in [*h.parameters(), *g.parameters(), x]]

    for got, want in zip(grads(box), grads(smooth)):
        torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * want.abs().max().item())
    torch.testing.assert_close(box(h(x)), smooth(h(x)), rtol=1e-12, atol=0)  # the forward is f itself


def test_the_function_s_own_autograd_is_never_used():
    """f raises if it is called on a tensor that requires grad or with grad enabled, and its torch ops
    go through a Function whose derivative raises: the box still returns the right gradient."""

    class NoDerivative(torch.autograd.Function):
        @staticmethod
        def forward(ctx, X):
            return smooth(X)

        @staticmethod
        def backward(ctx, grad):
            raise AssertionError("the black box's autograd was used")

    def guarded(X):
        if X.requires_grad or torch.is_grad_enabled():
            raise AssertionError("f was called inside autograd")
        return NoDerivative.apply(X)

    x = inputs()
    BlackBox(guarded, N, M)(x).sum().backward()
    ref = inputs()
    smooth(ref).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("scheme, rows_per_input", [("forward", N + 1), ("central", 2 * N + 1)])
def test_one_batched_call_per_forward_reused_by_every_backward(scheme, rows_per_input):
    f = Recorder()
    box = BlackBox(f, N, M, CoordinateEstimator(mu=1e-6, scheme=scheme))
    x = inputs(B=3)
    y = box(x)
    assert f.rows == [3 * rows_per_input] and box.oracle.nfev == 3 * rows_per_input
    w = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    (y * w).sum().backward(retain_graph=True)
    first = x.grad.clone()
    (y * w).sum().backward()
    assert f.rows == [3 * rows_per_input]  # the backward passes made no query
    torch.testing.assert_close(x.grad, 2 * first, rtol=0, atol=0)
    ref = inputs(B=3)
    (smooth(ref) * w).sum().backward()
    torch.testing.assert_close(first, ref.grad, rtol=1e-4, atol=1e-6)


def test_without_a_gradient_the_forward_costs_one_row_per_input():
    f = Recorder()
    box = BlackBox(f, N, M)
    x = inputs(B=6).detach().reshape(2, 3, N)
    with torch.no_grad():
        y = box(x.requires_grad_())
    assert y.shape == (2, 3, M) and f.rows == [6]
    y2 = box(x.detach())  # grad enabled but nothing to differentiate
    assert f.rows == [6, 6] and box.oracle.nfev == 12
    torch.testing.assert_close(y2, smooth(x.detach().reshape(6, N)).reshape(2, 3, M), rtol=1e-12, atol=0)


def test_the_box_follows_the_input_dtype():
    seen = []
    box = BlackBox(lambda X: (seen.append(X.dtype), smooth(X))[1], N, M)
    for dtype in (torch.float32, torch.float64):
        x = inputs(dtype=dtype)
        y = box(x)
        y.sum().backward()
        assert y.dtype == dtype and x.grad.dtype == dtype and seen[-1] == dtype
    ref = inputs(dtype=torch.float32)
    smooth(ref).sum().backward()
    torch.testing.assert_close(x.grad.float(), ref.grad, rtol=1e-3, atol=1e-3)  # float32 steps: ~1e-5 error


# --------------------------------------------------------------------------------- RGE
def linear_box(estimator, B):
    g = torch.Generator().manual_seed(5)
    A = torch.randn(M, N, generator=g, dtype=torch.float64)
    c = torch.randn(M, dtype=torch.float64)
    f = Recorder(lambda X: X @ A.T + c)
    return BlackBox(f, N, M, estimator), A, f


@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("directions", ["gaussian", "sphere"])
def test_rge_vjp_is_its_definition_on_a_linear_function(antithetic, directions):
    """VJP_b = phi / q * sum_k ((w_b . (f(x_b + mu u_bk) - f(x_b))) / mu) u_bk, and on f = A x + c each
    difference is mu A u_bk: the estimate is phi / q * sum_k (w_b^T A u_bk) u_bk with the estimator's
    own draws (B q directions, row b taking draws b q .. (b + 1) q - 1)."""
    q, B, seed = 5, 3, 11
    box, A, f = linear_box(RandomEstimator(mu=1e-3, q=q, seed=seed, antithetic=antithetic, directions=directions), B)
    x = inputs(B)
    w = torch.tensor([[0.5, -1.5], [1.0, 2.0], [-0.3, 0.7]], dtype=torch.float64)
    (box(x) * w).sum().backward()
    assert f.rows == [B * ((2 * q if antithetic else q) + 1)]
    twin = RandomEstimator(q=q, seed=seed, directions=directions)
    U = twin.sampler.sample(B * q, N, twin.generator).reshape(B, q, N)
    phi = twin.phi(N)
    want = phi / q * torch.einsum("bk,bkn->bn", torch.einsum("bm,mn,bkn->bk", w, A, U), U)
    torch.testing.assert_close(x.grad, want, rtol=1e-8, atol=1e-10)


def test_rge_vjp_is_unbiased_on_average():
    """Probabilistic (seed fixed): on a quadratic the antithetic differences are exact directional
    derivatives, so E[VJP] is the true VJP; 4000 identical rows (independent directions each) average
    to it within four standard errors measured from the rows themselves."""
    B, q = 4000, 3
    Q = torch.tensor([[2.0, 0.5, 0.0, 0.1], [0.5, 1.0, 0.3, 0.0], [0.0, 0.3, 1.5, 0.2], [0.1, 0.0, 0.2, 0.5]],
                     dtype=torch.float64)

    def quadratic(X):
        return torch.stack([0.5 * ((X @ Q) * X).sum(1), X[:, 0] * X[:, 3]], dim=1)

    box = BlackBox(quadratic, N, M, RandomEstimator(mu=1e-2, q=q, antithetic=True, seed=1))
    x0 = torch.tensor([0.3, -0.7, 1.1, 0.4], dtype=torch.float64)
    x = x0.repeat(B, 1).requires_grad_()
    w = torch.tensor([1.0, -2.0], dtype=torch.float64)
    (box(x) @ w).sum().backward()
    ref = x0.clone().requires_grad_()
    (quadratic(ref[None])[0] @ w).backward()
    mean, se = x.grad.mean(0), x.grad.std(0) / math.sqrt(B)
    assert torch.all((mean - ref.grad).abs() < 4 * se), (mean, ref.grad, se)
    assert torch.all(se < 0.1 * ref.grad.abs().max())  # the test has power: the errors are small


# --------------------------------------------------------------------------------- oracle machinery
def test_budget_is_refused_before_any_query():
    f = Recorder()
    box = BlackBox(f, N, M, CoordinateEstimator(mu=1e-6, scheme="forward"), budget=20)
    box(inputs(B=3))
    with pytest.raises(BudgetExhaustedError, match=r"costs 15 queries \(n \+ 1 per row with n=4\).* 5 left"):
        box(inputs(B=3))
    assert f.rows == [15] and box.oracle.nfev == 15
    with pytest.raises(ConfigError, match=r"single row costs 9 queries \(2 n \+ 1 with n=4\).* 8 left"):
        BlackBox(f, N, M, budget=8)


def nan_at(x, row, coordinate, mu):
    """smooth_numpy, answering NaN (both outputs) at the one query ``x[row] + mu e_coordinate``."""
    target = x.detach()[row].numpy().copy()
    target[coordinate] += mu

    def f(X):
        out = smooth_numpy(X)
        out[np.abs(X.detach().numpy() - target).max(axis=1) < mu / 4] = np.nan
        return out
    return f


def test_a_nonfinite_row_raises_naming_the_input_row_and_perturbation():
    x = inputs(B=3)
    mu = 1e-6
    box = BlackBox(nan_at(x, 1, 2, mu), N, M, CoordinateEstimator(mu=mu, scheme="forward"))
    with pytest.raises(OracleError, match=r"query #8 returned non-finite outputs .* query row 8 of 15 is input row "
                                          r"1, coordinate 2 stepped by \+mu") as info:
        box(x)
    assert info.value.query_index == 8 and info.value.kind == "nonfinite" and math.isnan(info.value.value)
    assert box.oracle.nfev == 15 and len(box.oracle.failures) == 1


def test_skip_policy_leaves_the_failed_difference_out():
    x = inputs(B=3)
    mu = 1e-6
    box = BlackBox(nan_at(x, 1, 2, mu), N, M, CoordinateEstimator(mu=mu, scheme="forward"),
                   on_failure="skip")
    box(x).sum().backward()
    ref = inputs(B=3)
    smooth(ref).sum().backward()
    want = ref.grad.clone()
    want[1, 2] = 0.0  # the only Jacobian column of row 1 that needed the failed query
    torch.testing.assert_close(x.grad, want, rtol=1e-4, atol=1e-6)
    assert [f.index for f in box.oracle.failures] == [8]


def test_retry_resolves_a_flaky_row():
    calls = []

    def flaky(X):
        calls.append(X.shape[0])
        out = smooth_numpy(X)
        if len(calls) == 1:
            out[4] = np.inf
        return out

    x = inputs(B=2)
    box = BlackBox(flaky, N, M, on_failure="retry")
    box(x).sum().backward()
    ref = inputs(B=2)
    smooth(ref).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-6, atol=1e-8)
    assert calls == [18, 1] and box.oracle.nfev == 19 and box.oracle.failures[0].resolved


def test_an_exception_in_f_is_an_oracle_error_by_default():
    def broken(X):
        raise RuntimeError("solver diverged")

    box = BlackBox(broken, N, M)
    with pytest.raises(OracleError, match=r"query #0 raised RuntimeError: solver diverged .*input row 0, the "
                                          r"unperturbed point"):
        box(inputs())


@pytest.mark.parametrize("answer, shape", [(lambda X: np.zeros((X.shape[0], M + 1)), "(27, 3)"),
                                           (lambda X: np.zeros((X.shape[0] - 1, M)), "(26, 2)")])
def test_an_answer_of_the_wrong_shape_is_an_oracle_error(answer, shape):
    box = BlackBox(answer, N, M, on_failure="skip")  # whatever the policy
    with pytest.raises(OracleError, match=re.escape(f"shape {shape} for 27 row(s); expected (27, 2)")):
        box(inputs())
    assert box.oracle.nfev == 27  # the batch ran: it is counted


@pytest.mark.parametrize("estimator", [CoordinateEstimator(mu=1e-3, scheme="central"), RandomEstimator(mu=1e-3)])
def test_a_step_below_the_dtype_resolution_is_refused(estimator):
    f = Recorder()
    box = BlackBox(f, N, M, estimator)
    x = inputs(dtype=torch.float32).detach()
    x[1, 2] = 1e8
    with pytest.raises(StepUnderflow, match=r"mu=0.001 is below the torch.float32 resolution at input row 1, "
                                            r"coordinate 2 \(x=100000000.0\)"):
        box(x.requires_grad_())
    assert f.rows == []
    assert issubclass(StepUnderflow, ConfigError)


def test_bad_input_is_named():
    box = BlackBox(smooth_numpy, N, M)
    with pytest.raises(ConfigError, match=r"shape \(\.\.\., 4\) \(n=4\), got \(3, 5\)"):
        box(torch.zeros(3, 5, dtype=torch.float64))
    with pytest.raises(ConfigError, match="floating-point tensor, got dtype torch.int64"):
        box(torch.zeros(3, N, dtype=torch.int64))
    with pytest.raises(TypeError, match="must be a torch.Tensor .* got list"):
        box([[0.0] * N])
    x = torch.zeros(3, N, dtype=torch.float64)
    x[2, 1] = math.nan
    with pytest.raises(ConfigError, match="row 2, coordinate 1 is nan"):
        box(x)
    with pytest.raises(ConfigError, match=r"needs its widths: BlackBox\(f, n=..., m=...\), got n=4, m=None"):
        BlackBox(smooth_numpy, N)
    with pytest.raises(ConfigError, match="m must be a positive int, got 0"):
        BlackBox(smooth_numpy, N, 0)
    with pytest.raises(TypeError, match="estimator must be .* got str"):
        BlackBox(smooth_numpy, N, M, "central")
    with pytest.raises(ConfigError, match="top_b and fitness_shaping"):
        BlackBox(smooth_numpy, N, M, RandomEstimator(q=2, antithetic=True, top_b=1))
    with pytest.raises(TypeError, match="f must be a callable, a VectorOracle or an Oracle, got int"):
        BlackBox(3, N, M)
    oracle = VectorFunctionOracle(smooth_numpy, N, M)
    with pytest.raises(ConfigError, match="budget belong"):
        BlackBox(oracle, budget=10)
    with pytest.raises(ConfigError, match=r"m=3 disagrees with the oracle"):
        BlackBox(oracle, N, 3)
    with pytest.raises(ConfigError, match="one loss per query"):
        oracle.evaluate_plan(None)


def test_a_scalar_oracle_is_a_box_with_one_output_counted_in_its_own_nfev():
    oracle = FunctionOracle(lambda X: smooth(X)[:, 0], N, vectorized=True, dtype=torch.float64, budget=100)
    box = BlackBox(oracle)
    x = inputs(B=2)
    y = box(x)
    y.sum().backward()
    ref = inputs(B=2)
    smooth(ref)[:, :1].sum().backward()
    assert y.shape == (2, 1) and oracle.nfev == 18 and oracle.budget == 100
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-6, atol=1e-8)


def test_executor_scheduler_shards_rows_and_keeps_counting_and_failures():
    x = inputs(B=3)
    mu = 1e-6
    f = Recorder(nan_at(x, 1, 2, mu))
    with ThreadPoolExecutor(2) as pool:
        box = BlackBox(f, N, M, CoordinateEstimator(mu=mu, scheme="forward"), on_failure="skip",
                       scheduler=ExecutorRowScheduler(pool, shards=3))
        box(x).sum().backward()
        assert sorted(f.rows) == [5, 5, 5] and box.oracle.nfev == 15
        assert [r.index for r in box.oracle.failures] == [8]  # the index of a single call
        one = BlackBox(nan_at(x, 1, 2, mu), N, M, CoordinateEstimator(mu=mu, scheme="forward"),
                       on_failure="skip")
        x1 = inputs(B=3)
        one(x1).sum().backward()
        torch.testing.assert_close(x.grad, x1.grad, rtol=0, atol=0)
        raising = BlackBox(nan_at(x, 1, 2, mu), N, M, CoordinateEstimator(mu=mu, scheme="forward"),
                           scheduler=ExecutorRowScheduler(pool, shards=3))
        with pytest.raises(OracleError, match="query row 8 of 15 is input row 1, coordinate 2"):
            raising(inputs(B=3))


def test_vector_oracle_on_its_own():
    def per_row(x):  # one row at a time; log of a negative entry is NaN
        return torch.stack([x.sum(), x[0].log()])

    oracle = VectorFunctionOracle(per_row, N, M, vectorized=False, budget=3, on_failure="inf")
    X = torch.tensor([[0.1, 0.2, 0.3, 0.4], [-1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    out = oracle.evaluate(X)
    assert out.shape == (2, M) and torch.isinf(out[1]).all() and oracle.nfev == 2
    assert oracle.failures[0].kind == "nonfinite" and oracle.failures[0].index == 1
    assert "query #1 returned non-finite outputs at indices [1]: [nan]" in oracle.failures[0].message
    torch.testing.assert_close(oracle(X[0]), per_row(X[0]), rtol=0, atol=0)
    with pytest.raises(BudgetExhaustedError):
        oracle.evaluate(X)
    assert isinstance(oracle, VectorOracle) and "out_dim=2" in repr(oracle)


def test_module_docstring_example_runs():
    failures, tried = doctest.testmod(zonn, optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0


# ----------------------------------------------------------------------------------------- context
def _with_context(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """R^4 x R^2 -> R^2: the context scales and shifts the smooth function."""
    return smooth(X) * C[:, :1] + C[:, 1:] * X[:, :1]


@pytest.mark.parametrize("estimator", [None, CoordinateEstimator(mu=1e-7, scheme="forward")])
def test_context_is_passed_unperturbed_and_gets_no_gradient(estimator):
    seen = []

    def f(X, C):
        seen.append((X.clone(), C.clone()))
        with torch.no_grad():
            return _with_context(X, C)

    box = BlackBox(f, n=N, m=M, estimator=estimator, context=2)
    x = torch.randn(3, N, dtype=torch.float64, requires_grad=True)
    ctx = torch.tensor([[1.0, 0.5], [2.0, -1.0], [0.5, 3.0]], dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, M, dtype=torch.float64)
    (box(x, ctx) * w).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    (_with_context(x_ref, ctx.detach()) * w).sum().backward()
    rtol = 1e-6 if estimator is None else 1e-5
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=rtol, atol=rtol)
    assert ctx.grad is None  # the context is data, not an input
    (X, C), = seen  # one call of B (2n + 1) or B (n + 1) rows, each block with its row's context
    per_row = box.num_queries(1)
    assert X.shape == (3 * per_row, N) and C.shape == (3 * per_row, 2)
    assert torch.equal(C, ctx.detach().repeat_interleave(per_row, dim=0))
    assert box.oracle.nfev == 3 * per_row and box.oracle.dim == N + 2 and box.n == N


def test_context_without_gradient_and_with_leading_dims():
    box = BlackBox(lambda X, C: _with_context(X, C), n=N, m=M, context=2)
    x, ctx = torch.randn(2, 3, N, dtype=torch.float64), torch.rand(2, 3, 2, dtype=torch.float64)
    y = box(x, ctx)
    torch.testing.assert_close(y, _with_context(x.reshape(-1, N), ctx.reshape(-1, 2)).reshape(2, 3, M))
    assert box.oracle.nfev == 6


def test_context_oracle_receives_concatenated_rows():
    oracle = VectorFunctionOracle(lambda Z: _with_context(Z[:, :N], Z[:, N:]), N + 2, M)
    box = BlackBox(oracle, n=N, context=2)
    x = torch.randn(2, N, dtype=torch.float64, requires_grad=True)
    ctx = torch.rand(2, 2, dtype=torch.float64)
    box(x, ctx).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    _with_context(x_ref, ctx).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    with pytest.raises(ConfigError, match=r"n=5 disagrees with the oracle .*dim - context = 6 - 2"):
        BlackBox(oracle, n=5, context=2)
    with pytest.raises(ConfigError, match="leaves no input beside context=6"):
        BlackBox(oracle, context=6)


def test_bad_context_is_refused_before_any_query():
    box = BlackBox(lambda X, C: _with_context(X, C), n=N, m=M, context=2)
    x = torch.randn(3, N, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ConfigError, match=r"needs a context of shape \(\.\.\., 2\)"):
        box(x)
    with pytest.raises(ConfigError, match=r"context must have shape \(3, 2\).*got \(3, 3\)"):
        box(x, torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="context must be a torch.Tensor"):
        box(x, [[0.0, 1.0]] * 3)
    bad = torch.zeros(3, 2, dtype=torch.float64)
    bad[1, 1] = float("nan")
    with pytest.raises(ConfigError, match=r"context must be finite: row 1, entry 1 is nan"):
        box(x, bad)
    plain = BlackBox(smooth, n=N, m=M)
    with pytest.raises(ConfigError, match="takes no context"):
        plain(x, torch.zeros(3, 2, dtype=torch.float64))
    for bad_width in (-1, 1.5, True):
        with pytest.raises(ConfigError, match="context must be a non-negative int"):
            BlackBox(smooth, n=N, m=M, context=bad_width)
    assert box.oracle.nfev == 0 and plain.oracle.nfev == 0
