"""Oracle contract: counting, exact budgets, failure policies, input checks."""

import math
import re

import numpy as np
import pytest
import torch

from zoblackbox import BudgetExhaustedError, ConfigError, FailurePolicy, FunctionOracle, OracleError, ZOError


def test_counts_every_query_and_accepts_numpy():
    o = FunctionOracle(lambda x: float((x ** 2).sum()), dim=3)
    assert o([1.0, 2.0, 2.0]) == 9.0
    vals = o.evaluate(np.array([[1.0, 0, 0], [0, 3.0, 0]]))
    assert vals.tolist() == [1.0, 9.0]
    assert vals.dtype == torch.float64
    assert o.nfev == 3


def test_numpy_mode_hands_numpy_arrays_to_fn():
    seen = []
    o = FunctionOracle(lambda x: seen.append(type(x)) or float(np.sum(x)), dim=2, numpy=True)
    assert o([1.0, 2.0]) == 3.0
    assert seen == [np.ndarray]


def test_vectorized_function_oracle():
    o = FunctionOracle(lambda X: (X ** 2).sum(1), dim=2, vectorized=True)
    assert o.evaluate(torch.tensor([[1.0, 1.0], [2.0, 0.0]])).tolist() == [2.0, 4.0]
    assert o.nfev == 2


def test_budget_is_exact_and_refuses_before_spending():
    calls = []
    o = FunctionOracle(lambda x: calls.append(1) or 0.0, dim=2, budget=5)
    o.evaluate(torch.zeros(4, 2))
    with pytest.raises(BudgetExhaustedError, match="budget of 5"):
        o.evaluate(torch.zeros(2, 2))
    assert o.nfev == 4 and len(calls) == 4  # the refused batch spent nothing
    o(torch.zeros(2))
    assert o.nfev == 5 and o.remaining == 0


def test_default_policy_raises_with_query_index_and_value():
    o = FunctionOracle(lambda x: float("nan") if x[0] > 0 else 1.0, dim=1)
    o(torch.zeros(1))
    with pytest.raises(OracleError) as info:
        o.evaluate(torch.tensor([[0.0], [1.0]]))
    err = info.value
    assert isinstance(err, ZOError)
    assert err.query_index == 2 and err.kind == "nonfinite" and math.isnan(err.value)
    assert "query #2" in str(err) and "nan" in str(err)


def test_exception_is_chained_and_named():
    def boom(x):
        raise RuntimeError("solver diverged at t=3")

    o = FunctionOracle(boom, dim=2)
    with pytest.raises(OracleError, match="query #0 raised RuntimeError: solver diverged at t=3") as info:
        o(torch.zeros(2))
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize("policy, expected", [("inf", math.inf), ("skip", None)])
def test_inf_and_skip_policies_record_failures(policy, expected):
    o = FunctionOracle(lambda x: 1.0 / 0.0 if x[0] > 0 else 2.0, dim=1, on_failure=policy)  # raises ZeroDivision
    vals = o.evaluate(torch.tensor([[0.0], [1.0], [-1.0]]))
    assert vals[0] == 2.0 and vals[2] == 2.0
    assert (vals[1] == expected) if expected is not None else math.isnan(vals[1])
    assert o.nfev == 3
    report = o.failure_report()
    assert report == {"failed_queries": 1, "resolved_by_retry": 0, "by_kind": {"exception": 1}}
    assert o.failures[0].index == 1


def test_retry_counts_attempts_and_resolves_flaky_queries():
    state = {"n": 0}

    def flaky(x):
        state["n"] += 1
        if state["n"] in (2, 4):  # query #1 and its first retry fail
            return float("inf")
        return 1.0

    o = FunctionOracle(flaky, dim=1, on_failure="retry")
    vals = o.evaluate(torch.zeros(3, 1))
    assert vals.tolist() == [1.0, 1.0, 1.0]
    assert o.nfev == 5  # 3 queries + 2 retries of query #1 (the 2nd retry succeeded)
    assert o.failures[0].attempts == 3 and o.failures[0].resolved


def test_retry_then_raise_reports_attempts():
    o = FunctionOracle(lambda x: float("nan"), dim=1, on_failure=FailurePolicy("raise", retries=2))
    with pytest.raises(OracleError, match=r"query #0 returned the non-finite loss nan \(after 3 attempts\)"):
        o(torch.zeros(1))
    assert o.nfev == 3


def test_retries_never_exceed_the_budget():
    o = FunctionOracle(lambda x: float("nan"), dim=1, budget=4, on_failure=FailurePolicy("skip", retries=10))
    o.evaluate(torch.zeros(2, 1))
    assert o.nfev == 4


def test_vectorized_batch_exception_fails_whole_batch():
    def fn(X):
        raise ValueError("bad batch")

    o = FunctionOracle(fn, dim=2, vectorized=True, on_failure="skip")
    vals = o.evaluate(torch.zeros(3, 2))
    assert torch.isnan(vals).all() and len(o.failures) == 3


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3, 4), r"shape \(K, 2\), got \(3, 4\)"),
    (torch.zeros(2), r"shape \(K, 2\), got \(2,\)"),
    (torch.zeros(0, 2), "at least one point"),
])
def test_bad_batches(bad, match):
    o = FunctionOracle(lambda x: 0.0, dim=2)
    with pytest.raises(ConfigError, match=match):
        o.evaluate(bad)
    assert o.nfev == 0


def test_bad_point_and_constructor_values():
    o = FunctionOracle(lambda x: 0.0, dim=2)
    with pytest.raises(ConfigError, match="length 3, expected the oracle's dim 2"):
        o([1.0, 2.0, 3.0])
    with pytest.raises(ConfigError, match="must be 1-D, got shape"):
        o([[1.0, 2.0]])
    with pytest.raises(TypeError, match="1-D array of numbers"):
        o("ab")
    with pytest.raises(ConfigError, match="dim must be a positive int, got 0"):
        FunctionOracle(lambda x: 0.0, dim=0)
    with pytest.raises(ConfigError, match="budget must be"):
        FunctionOracle(lambda x: 0.0, dim=1, budget=-1)
    with pytest.raises(ConfigError, match="unknown failure policy 'ignore'"):
        FunctionOracle(lambda x: 0.0, dim=1, on_failure="ignore")
    with pytest.raises(TypeError, match="fn must be callable"):
        FunctionOracle(3, dim=1)


def test_non_scalar_return_is_a_failure():
    o = FunctionOracle(lambda x: x, dim=2)
    with pytest.raises(OracleError, match="scalar loss"):
        o(torch.zeros(2))


def test_state_dict_roundtrip():
    o = FunctionOracle(lambda x: float("nan"), dim=1, on_failure="skip")
    o.evaluate(torch.zeros(2, 1))
    o2 = FunctionOracle(lambda x: 0.0, dim=1)
    o2.load_state_dict(o.state_dict())
    assert o2.nfev == 2 and o2.failure_report() == o.failure_report()


def test_numpy_function_oracle_computes_in_float64_by_default():
    """A numpy function gets float64 points (numpy's precision), not torch's float32 default: a
    perturbation of 1e-10 survives the conversion."""
    seen = []
    o = FunctionOracle(lambda x: seen.append(x.dtype) or float(x[0] - 1.0), dim=1, numpy=True)
    assert o.dtype == torch.float64
    assert o([1.0 + 1e-10]) == pytest.approx(1e-10, rel=1e-6)
    assert seen == [np.float64]
    vec = FunctionOracle(lambda X: X[:, 0] - 1.0, dim=1, numpy=True, vectorized=True)
    assert vec.dtype == torch.float64 and vec.evaluate([[1.0 + 1e-10]]).item() == pytest.approx(1e-10, rel=1e-6)


def test_function_oracle_dtype_explicit_and_torch_default():
    """An explicit dtype wins over the numpy rule; torch functions keep torch's default dtype."""
    assert FunctionOracle(lambda x: 0.0, dim=1, numpy=True, dtype=torch.float32).dtype == torch.float32
    assert FunctionOracle(lambda x: 0.0, dim=1).dtype == torch.get_default_dtype()
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert FunctionOracle(lambda x: 0.0, dim=1).dtype == torch.float64
    finally:
        torch.set_default_dtype(old)


@pytest.mark.parametrize("name", ["vectorized", "numpy"])
@pytest.mark.parametrize("value", ["False", 0, 1, None, [True]])
def test_function_oracle_flags_must_be_bools(name, value):
    """A truthy non-bool (the string 'False') would silently switch the mode on: it is refused."""
    with pytest.raises(TypeError, match=rf"{name} must be a bool, got {type(value).__name__}: {re.escape(repr(value))}"):
        FunctionOracle(lambda x: 0.0, dim=1, **{name: value})


def test_function_oracle_accepts_numpy_bools():
    o = FunctionOracle(lambda X: X.sum(1), dim=2, vectorized=np.bool_(True), numpy=np.True_)
    assert o.vectorized is True and o.numpy is True
    assert o.evaluate([[1.0, 2.0]]).tolist() == [3.0]
