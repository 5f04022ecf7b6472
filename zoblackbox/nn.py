"""Black-box steps inside autograd: a torch module whose backward is a finite-difference VJP.

:class:`BlackBox` wraps a function ``f: R^n -> R^m`` that torch cannot differentiate -- a PDE
solver step, an external simulator, a classifier that answers queries only -- as one node of an
otherwise ordinary torch graph (DESIGN.md, "Black boxes inside autograd")::

    loss = g(BlackBox(f, n, m)(h(x)))        # h, g: torch modules with parameters

* **forward** calls ``f`` on a batch of rows ``(B, n) -> (B, m)``. When the input needs a
  gradient, the same single call also evaluates the finite-difference perturbations of every
  row, so no query is made in the backward.
* **backward** returns the vector-Jacobian product ``grad_out @ J`` from those differences:

  - :class:`~zoblackbox.estimators.CoordinateEstimator` (CGE) estimates the whole Jacobian
    ``J`` (``(B, m, n)``) in the forward; ``forward`` costs ``B (n + 1)`` rows, ``central``
    ``B (2 n + 1)`` rows (the ``+ 1`` is ``f(x)`` itself: the forward must return it). Every
    backward through the node (``retain_graph=True``) reuses ``J``.
  - :class:`~zoblackbox.estimators.RandomEstimator` (RGE, for large ``n``) draws ``q`` directions
    ``u_k`` per row and keeps them with the output differences ``df_k``; the backward is
    ``phi / q * sum_k ((grad_out . df_k) / mu) u_k`` (antithetic: ``/ (2 mu)``), i.e. the RGE of
    the gradient of the scalar ``grad_out . f`` with the estimator's conventions. ``q + 1`` rows per
    input row (antithetic ``2 q + 1``), whatever ``n``.

  Without a gradient to compute (``torch.no_grad()``, or an input that does not require grad)
  the forward costs ``B`` rows. Gradients flow to the input only: ``f`` has no torch parameters,
  and its own autograd is never used (it is called on detached rows under ``torch.no_grad()``).

Every call of ``f`` goes through a :class:`VectorOracle` (the vector-valued counterpart of
:class:`~zoblackbox.oracle.Oracle`): queries (rows) are counted in ``nfev``, a budget is refused
before anything runs, and failed rows (exceptions, non-finite outputs) follow the oracle's
:class:`~zoblackbox.oracle.FailurePolicy`; a :class:`RowScheduler` decides how the rows are evaluated
(one call by default, contiguous shards on any ``concurrent.futures`` executor with
:class:`ExecutorRowScheduler`).

Two known constructions are instances of this one:

* **ZO-AE-DS** (Zhang et al., ICLR 2022): the black-box classifier behind a white-box decoder gets
  a ZO gradient at the low-dimensional latent code. That is ``BlackBox(classifier o decoder,
  n=latent_dim, m=classes)`` between the trained encoder and the cross-entropy loss.
* **Solver-in-the-loop with a black-box solver step** (Um et al., NeurIPS 2020; DeepZero's ZO-SOL,
  Chen et al., ICLR 2024): in the unrolled rollout ``s_{t+1} = solver(s_t + net(s_t))`` the solver
  step is a ``BlackBox`` with ``n = m = state size``, and the correction network is trained by
  plain backprop. This hybrid estimates ``n``-dimensional Jacobians of the solver instead of
  perturbing the network's ``d`` parameters as ZO-SOL does (``zoblackbox pde --method zo-sol``), the cheaper of
  the two when the state is smaller than the network.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import wait

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from .errors import BudgetExhaustedError, ConfigError, OracleError
from .estimators import CoordinateEstimator, RandomEstimator, StepUnderflow
from .oracle import Oracle, QueryFailure, RawResult, as_vector, check_device, short_repr

__all__ = ["BlackBox", "ExecutorRowScheduler", "RowScheduler", "VectorFunctionOracle", "VectorOracle"]


def _positive_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------------------- oracles
class VectorOracle(Oracle):
    """An oracle with vector answers, ``f: R^dim -> R^out_dim``, queried on batches of rows.

    The counterpart of :class:`~zoblackbox.oracle.Oracle` for black boxes with several outputs: a
    query is one row ``x`` (length ``dim``), its answer a row of ``out_dim`` values. Budget,
    :attr:`nfev`, :attr:`failures` and the failure policy are the scalar oracle's: a batch that would
    overrun the budget is refused before anything runs; a query *failed* when it raised or when any
    of its ``out_dim`` values is non-finite, and the policy then raises
    :class:`~zoblackbox.errors.OracleError` naming the query (``"raise"``), or replaces the whole row
    by ``+inf`` (``"inf"``) or ``nan`` (``"skip"``), after ``retries`` re-evaluations of that row.
    An answer of the wrong shape for the whole batch is an OracleError whatever the policy (the
    batch is counted first).

    Subclasses implement :meth:`_evaluate_batch` (``(K, dim) -> (K, out_dim)``) or
    :meth:`_evaluate_one` (``(dim,) -> (out_dim,)``; a row that raises fails alone).

    A VectorOracle is *not* a scalar-loss oracle: estimators, :class:`~zoblackbox.AskTell` and the
    schedulers of :mod:`zoblackbox.schedule` need one loss per query (:meth:`evaluate_plan` refuses).
    Its rows are evaluated by a :class:`RowScheduler` (:meth:`evaluate` uses the default one).

    Parameters
    ----------
    dim : int
        Length of an input row.
    out_dim : int
        Length of an output row.
    budget : int or None
        Most queries (rows) over the oracle's lifetime.
    on_failure : FailurePolicy or str
        ``"raise"`` (default), ``"inf"``, ``"skip"``, ``"retry"`` or a
        :class:`~zoblackbox.oracle.FailurePolicy`.
    dtype : torch.dtype or None
        Floating dtype of the rows handed to the hooks; ``None`` (default): the rows keep their own
        floating dtype (a :class:`BlackBox` then follows its input's dtype).
    device : str, torch.device or None
        Device of those rows; ``None`` (default): the rows stay where they are.
    """

    def __init__(self, dim: int, out_dim: int, *, budget: int | None = None, on_failure="raise",
                 dtype: torch.dtype | None = None, device=None):
        super().__init__(dim, budget=budget, on_failure=on_failure, dtype=dtype, device=device)
        self._out_dim = _positive_int(out_dim, "out_dim")
        self.dtype: torch.dtype | None = dtype  # type: ignore[assignment]  # None: follow the rows
        self.device: torch.device | None = None if device is None else check_device(device)  # type: ignore[assignment]

    @property
    def out_dim(self) -> int:
        """Length of an output row."""
        return self._out_dim

    # ------------------------------------------------------------------ hooks
    def _evaluate_one(self, x: torch.Tensor):
        """Outputs ``(out_dim,)`` at one row; override this or :meth:`_evaluate_batch`."""
        raise NotImplementedError(f"{type(self).__name__} implements neither _evaluate_one nor _evaluate_batch")

    def _evaluate_batch(self, X: torch.Tensor):
        """Outputs ``(K, out_dim)`` at the rows of ``X``; override for vectorized evaluation."""
        raise NotImplementedError  # raw_evaluate goes row by row when this hook is not overridden

    def _batched(self) -> bool:
        return type(self)._evaluate_batch is not VectorOracle._evaluate_batch

    # ------------------------------------------------------------------ protocol
    def __call__(self, x) -> torch.Tensor:  # type: ignore[override]  # a row of outputs, not one loss
        """Outputs ``(out_dim,)`` at one row ``x`` (one query)."""
        x = as_vector(x, dim=self.dim, dtype=self.dtype, device=self.device)
        return self.evaluate(x[None])[0]

    def evaluate(self, X) -> torch.Tensor:
        """Outputs ``(K, out_dim)`` at the ``K`` rows of ``X`` (one batched evaluation, counted)."""
        return _ONE_CALL.run(self, X)

    def evaluate_plan(self, plan, chunk_size: int | None = None):
        raise ConfigError(f"{type(self).__name__} answers a vector of {self.out_dim} values per query: estimators and "
                          "the scalar schedulers need one loss per query; use it through zoblackbox.nn.BlackBox or "
                          "wrap it in a FunctionOracle that reduces its outputs to a loss")

    def raw_evaluate(self, X: torch.Tensor) -> RawResult:
        """Evaluate without counting or failure policy: ``values`` of shape ``(K, out_dim)`` (schedulers call
        this, then :meth:`record`).

        A batch (or, with the per-row hook, a row) that raises marks its queries as failed with the
        exception. An answer of the wrong shape for a whole batch raises :class:`OracleError` (the
        scheduler counts the batch). Unlike the scalar oracle's, this changes nothing on the oracle, so
        shards may run it in threads or processes.
        """
        K = X.shape[0]
        with torch.no_grad():
            if self._batched():
                try:
                    out = self._evaluate_batch(X)
                except Exception as exc:  # noqa: BLE001 - every failure goes to the policy
                    return RawResult(self._nan_rows(X), {i: exc for i in range(K)})
                return RawResult(self._as_rows(out, X, "_evaluate_batch"), {})
            values, errors = self._nan_rows(X), dict[int, BaseException]()
            for i in range(K):
                try:
                    values[i] = self._as_rows(self._evaluate_one(X[i]), X[i:i + 1], "_evaluate_one")[0]
                except Exception as exc:  # noqa: BLE001 - a row that raises (or answers badly) fails alone
                    errors[i] = exc
            return RawResult(values, errors)

    def record(self, raw: RawResult, point: Callable[[int], torch.Tensor],
               evaluate: Callable[[torch.Tensor], RawResult] | None = None) -> torch.Tensor:
        """Count the batch's queries and apply the failure policy row by row; returns the final outputs."""
        values = raw.values.clone()
        first = self.nfev
        self.nfev += values.shape[0]
        self._outstanding = max(0, self._outstanding - values.shape[0])
        nonfinite = (~torch.isfinite(values)).any(dim=1).nonzero().flatten().tolist()
        for i in sorted(set(raw.errors) | set(nonfinite)):
            values[i] = self._settle_row(first + i, i, values[i], raw.errors.get(i), point,
                                         evaluate or self.raw_evaluate)
        return values

    # ------------------------------------------------------------------ helpers
    def _check_batch(self, X) -> torch.Tensor:
        t = super()._check_batch(X)
        return t if t.is_floating_point() else t.to(torch.get_default_dtype())

    @staticmethod
    def _value_dtype(X: torch.Tensor, out: torch.Tensor | None = None) -> torch.dtype:
        # outputs keep their precision: a float64 simulator's differences are not rounded to float32
        if out is not None and out.is_floating_point():
            return torch.promote_types(out.dtype, X.dtype)
        return X.dtype

    def _nan_rows(self, X: torch.Tensor) -> torch.Tensor:
        return torch.full((X.shape[0], self.out_dim), math.nan, dtype=self._value_dtype(X), device=X.device)

    def _as_rows(self, out, X: torch.Tensor, hook: str) -> torch.Tensor:
        """``out`` as a ``(K, out_dim)`` tensor on the rows' device; OracleError for a wrong shape."""
        K = X.shape[0]
        if not isinstance(out, torch.Tensor):
            arr = np.asarray(out)
            if arr.dtype.kind not in "biuf":
                raise TypeError(f"the black box must return real numbers, got {type(out).__name__}: {short_repr(out)}")
            out = torch.as_tensor(arr)
        if out.is_complex() or out.dtype == torch.bool:
            raise TypeError(f"the black box must return real numbers, got dtype {out.dtype}")
        shape = tuple(out.shape)
        if self.out_dim == 1 and shape == (K,):
            out = out.reshape(K, 1)
        elif hook == "_evaluate_one" and shape == (self.out_dim,):
            out = out.reshape(1, self.out_dim)
        elif shape != (K, self.out_dim):
            expected = f"({self.out_dim},)" if hook == "_evaluate_one" else f"({K}, {self.out_dim})"
            message = (f"{type(self).__name__}.{hook} returned outputs of shape {shape} for {K} row(s); "
                       f"expected {expected} (out_dim={self.out_dim})")
            if hook == "_evaluate_one":
                raise ValueError(message)  # one row: a failure of that query, under the policy
            raise OracleError(message)
        return out.detach().to(device=X.device, dtype=self._value_dtype(X, out))

    def _settle_row(self, index: int, i: int, row: torch.Tensor, exc: BaseException | None, point,
                    evaluate) -> torch.Tensor:
        if exc is None:
            bad = (~torch.isfinite(row)).nonzero().flatten()
            values = row[bad[:5]].tolist()
            failure = QueryFailure(index, "nonfinite", f"query #{index} returned non-finite outputs at indices "
                                   f"{bad[:5].tolist()}: {values}", float(values[0]))
        else:
            kind = "timeout" if isinstance(exc, TimeoutError) else "exception"
            failure = QueryFailure(index, kind, f"query #{index} raised {type(exc).__name__}: {exc}", None)
        while failure.attempts <= self.policy.retries and self.remaining - self._outstanding >= 1:
            try:
                retry = evaluate(point(i)[None])
            finally:
                self.nfev += 1
                failure.attempts += 1
            if 0 not in retry.errors and bool(torch.isfinite(retry.values[0]).all()):
                failure.resolved = True
                self.failures.append(failure)
                return retry.values[0].to(row)
        self.failures.append(failure)
        if self.policy.action == "raise":
            note = f" (after {failure.attempts} attempts)" if failure.attempts > 1 else ""
            raise OracleError(failure.message + note, query_index=index, value=failure.value,
                              kind=failure.kind) from exc
        return torch.full_like(row, math.inf if self.policy.action == "inf" else math.nan)

    def __repr__(self) -> str:
        budget = "" if self.budget is None else f", budget={self.budget}"
        return f"{type(self).__name__}(dim={self.dim}, out_dim={self.out_dim}, nfev={self.nfev}{budget})"


class VectorFunctionOracle(VectorOracle):
    """Wrap a Python callable ``f: R^dim -> R^out_dim`` as a :class:`VectorOracle`.

    Parameters
    ----------
    fn : callable
        ``fn(X) -> (K, out_dim)`` for a ``(K, dim)`` batch of rows, or, with ``vectorized=False``,
        ``fn(x) -> (out_dim,)`` for one row (a row that raises then fails alone). With
        ``out_dim == 1`` a result of shape ``(K,)`` is accepted.
    dim, out_dim : int
        Input and output widths.
    vectorized : bool
        Whether ``fn`` takes a batch (default ``True``).
    numpy : bool
        Hand ``fn`` numpy arrays instead of torch tensors (simulators written in numpy).
    **kwargs
        ``budget``, ``on_failure``, ``dtype``, ``device`` as in :class:`VectorOracle`.

    Raises
    ------
    TypeError
        ``fn`` is not callable, or a flag is not a bool.
    ConfigError
        A bad width, budget, policy, dtype or device (the message names it).
    """

    def __init__(self, fn: Callable, dim: int, out_dim: int, *, vectorized: bool = True, numpy: bool = False,
                 **kwargs):
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}: {short_repr(fn)}")
        for name, flag in (("vectorized", vectorized), ("numpy", numpy)):
            if not isinstance(flag, (bool, np.bool_)):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}: {flag!r}")
        super().__init__(dim, out_dim, **kwargs)
        self.fn = fn
        self.vectorized = bool(vectorized)
        self.numpy = bool(numpy)

    def _batched(self) -> bool:
        return self.vectorized

    def _convert(self, X: torch.Tensor):
        return X.cpu().numpy() if self.numpy else X

    def _evaluate_batch(self, X):
        return self.fn(self._convert(X))

    def _evaluate_one(self, x):
        return self.fn(self._convert(x))


class _ScalarRows(VectorOracle):
    """A scalar :class:`~zoblackbox.oracle.Oracle` seen as a VectorOracle with ``out_dim = 1``.

    Queries are evaluated by the wrapped oracle's ``raw_evaluate`` and counted in *its* ``nfev`` and
    ``failures``, under its budget and failure policy (like :class:`~zoblackbox.oracle.BudgetView`);
    the wrapped oracle is never changed otherwise.
    """

    def __init__(self, oracle: Oracle):
        self.unwrapped = oracle
        self._out_dim = 1
        self._outstanding = 0

    nfev = property(lambda self: self.unwrapped.nfev, lambda self, v: setattr(self.unwrapped, "nfev", v))
    failures = property(lambda self: self.unwrapped.failures)
    policy = property(lambda self: self.unwrapped.policy)
    budget = property(lambda self: self.unwrapped.budget)
    dim = property(lambda self: self.unwrapped.dim)
    dtype = property(lambda self: self.unwrapped.dtype)
    device = property(lambda self: self.unwrapped.device)

    def reserve(self, n: int) -> None:
        super().reserve(n)
        if type(self.unwrapped).reserve is not Oracle.reserve:  # the oracle checks something of its own
            self.unwrapped.reserve(n)

    def raw_evaluate(self, X):
        raw = self.unwrapped.raw_evaluate(X)  # float64 losses on the CPU
        return RawResult(raw.values.reshape(-1, 1).to(X.device), raw.errors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.unwrapped!r})"


# ----------------------------------------------------------------------------------------- schedulers
class RowScheduler:
    """Evaluates a batch of rows of a :class:`VectorOracle`: reserve, evaluate, record.

    The budget is checked for the whole batch before anything runs (:meth:`Oracle.reserve`); the
    outputs are counted and the failure policy applied in this process (:meth:`VectorOracle.record`),
    so counting and failures do not depend on how the rows ran. This base class evaluates the batch
    in one call of the oracle (:meth:`VectorOracle.raw_evaluate`); subclasses override
    :meth:`raw_rows` only.
    """

    def run(self, oracle: VectorOracle, X) -> torch.Tensor:
        """Outputs ``(K, out_dim)`` of the ``K`` rows of ``X``, counted and checked by ``oracle``."""
        if not isinstance(oracle, VectorOracle):
            raise TypeError(f"oracle must be a VectorOracle, got {type(oracle).__name__}: {short_repr(oracle)}")
        X = oracle._check_batch(X)
        oracle.reserve(X.shape[0])
        before = oracle.nfev
        try:
            raw = self.raw_rows(oracle, X)
        except OracleError:
            if oracle.nfev == before:  # the batch ran (and answered badly): count it, then stop
                oracle.nfev += X.shape[0]
            raise
        return oracle.record(raw, lambda i: X[i])

    def raw_rows(self, oracle: VectorOracle, X: torch.Tensor) -> RawResult:
        """The uncounted outputs of ``X``'s rows (``(K, out_dim)``) and their per-row errors."""
        return oracle.raw_evaluate(X)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


_ONE_CALL = RowScheduler()


class ExecutorRowScheduler(RowScheduler):
    """Rows evaluated in contiguous shards on an executor (``submit() -> Future``).

    Any ``concurrent.futures`` executor works: a ``ThreadPoolExecutor`` for a black box that releases
    the GIL (an external program, a torch or numpy kernel), a ``ProcessPoolExecutor`` for Python
    simulators (the oracle, and so ``f``, must then pickle). Each shard is one call of
    :meth:`VectorOracle.raw_evaluate` in a worker; the main process reserves the budget before and
    counts and applies the failure policy after (retries of failed rows run here), so ``nfev``, the
    failure records and the query indices in errors are those of a single call. The executor belongs
    to the caller (it is not shut down here).

    Parameters
    ----------
    executor : concurrent.futures.Executor
        Anything with ``submit(fn, *args) -> Future``.
    shards : int or None
        Shards per batch (at most one per row); default: the executor's worker count where it has one
        (the ``concurrent.futures`` pools do), else 1.

    Raises
    ------
    TypeError
        ``executor`` has no ``submit``.
    ConfigError
        ``shards`` is not a positive int.
    """

    def __init__(self, executor, shards: int | None = None):
        if not callable(getattr(executor, "submit", None)):
            raise TypeError(f"executor must have a submit() method (a concurrent.futures executor), got "
                            f"{type(executor).__name__}: {short_repr(executor)}")
        self.executor = executor
        default = getattr(executor, "_max_workers", None)
        self.shards = _positive_int(shards, "shards") if shards is not None else (
            default if isinstance(default, int) and default >= 1 else 1)

    def raw_rows(self, oracle: VectorOracle, X: torch.Tensor) -> RawResult:
        chunks = torch.tensor_split(X, min(self.shards, X.shape[0]))
        futures = [self.executor.submit(oracle.raw_evaluate, chunk) for chunk in chunks]
        wait(futures)  # no shard is left running when another one failed
        results = [future.result() for future in futures]  # re-raises a shard's OracleError or executor error
        widths = {tuple(r.values.shape[1:]) for r in results}
        if len(widths) != 1:
            raise OracleError(f"the shards of one batch returned outputs of different widths: {sorted(widths)}")
        errors, start = {}, 0
        for chunk, result in zip(chunks, results):
            errors.update({start + i: exc for i, exc in result.errors.items()})
            start += chunk.shape[0]
        dtype = results[0].values.dtype
        for r in results[1:]:
            dtype = torch.promote_types(dtype, r.values.dtype)
        values = torch.cat([r.values.to(device=X.device, dtype=dtype) for r in results])
        return RawResult(values, errors)

    def __repr__(self) -> str:
        return f"ExecutorRowScheduler({type(self.executor).__name__}, shards={self.shards})"


# ----------------------------------------------------------------------------------------- the module
class _WithContext:
    """``f(X, C)`` seen as a function of the rows ``[x | context]`` (what the oracle evaluates)."""

    def __init__(self, f: Callable, n: int):
        self.f, self.n = f, n

    def __call__(self, Z):
        return self.f(Z[..., :self.n], Z[..., self.n:])

    def __repr__(self) -> str:
        return f"{short_repr(self.f)} with context"


class _BlackBoxFunction(torch.autograd.Function):
    """forward: the black box's outputs (and its finite differences); backward: their VJP."""

    @staticmethod
    def forward(ctx, x, context, box):
        y, kind, saved = box._differentiate(x, context)
        ctx.kind, ctx.x_dtype, ctx.x_device = kind, x.dtype, x.device
        ctx.save_for_backward(*saved)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        if ctx.kind == "jacobian":
            (J,) = ctx.saved_tensors  # (B, m, n)
            g = grad_out.to(device=J.device, dtype=J.dtype)
            grad = torch.einsum("bm,bmn->bn", g, J)
        else:  # directions U (B, q, n) and weighted differences D (B, q, m)
            U, D = ctx.saved_tensors
            g = grad_out.to(device=D.device, dtype=D.dtype)
            grad = torch.einsum("bq,bqn->bn", torch.einsum("bm,bqm->bq", g, D), U)
        return grad.to(device=ctx.x_device, dtype=ctx.x_dtype), None, None


class BlackBox(torch.nn.Module):
    """A black-box function ``f: R^n -> R^m`` as a torch module with finite-difference gradients.

    ``BlackBox(f, n, m)(x)`` maps ``x`` of shape ``(..., n)`` to ``(..., m)`` by calling ``f`` on the
    ``(B, n)`` rows of ``x``; gradients reach ``x`` (and whatever computed it) through vector-Jacobian
    products estimated from queries only (module docstring). The rows follow ``x``'s dtype and device
    unless the oracle fixes its own.

    Parameters
    ----------
    f : callable, VectorOracle or Oracle
        ``f(X) -> (B, m)`` for a ``(B, n)`` tensor (or numpy array with ``numpy=True``), computed in
        at least the rows' precision (outputs rounded to float32 turn float64 differences into noise); or a
        :class:`VectorOracle` (its budget and failure policy apply); or a scalar
        :class:`~zoblackbox.oracle.Oracle` (``m = 1``, counted in that oracle's ``nfev``).
    n, m : int or None
        Input and output widths; required with a plain function, checked against an oracle's.
    estimator : CoordinateEstimator, RandomEstimator or None
        How the VJP is estimated. Default: central CGE with relative steps
        ``mu = cbrt(eps)`` of the rows' dtype (``6.1e-6`` in float64, ``4.9e-3`` in float32), which
        balances truncation and rounding on smooth functions. An RGE's directions come from its own
        generator (its ``seed``): ``B q`` directions per forward, row ``b`` taking draws
        ``b q .. (b + 1) q - 1``. ``top_b`` and ``fitness_shaping`` are refused (they are not linear
        in ``f``'s outputs, so there would be no VJP).
    budget : int or None
        Most queries (rows) of ``f``, for a plain function (an oracle has its own).
    on_failure : FailurePolicy, str or None
        Failure policy for a plain function (default ``"raise"``); under ``"inf"``/``"skip"`` a failed
        row's differences are left out (zero Jacobian entries for CGE, one direction fewer for RGE).
    vectorized, numpy : bool
        As in :class:`VectorFunctionOracle`, for a plain function.
    scheduler : RowScheduler or None
        Evaluates the rows (default: one call of ``f`` per forward).
    context : int
        Width ``c`` of a per-row side input that ``f`` needs but that is never differentiated (a
        forcing, boundary conditions, a simulation's parameters; default 0: none). Every forward
        then takes ``box(x, context)`` with ``context`` of shape ``(..., c)``; each perturbed row
        of an input row carries that row's context unchanged, so the cost stays ``B (n + 1)`` /
        ``B (2 n + 1)`` / ``B (q + 1)`` rows whatever ``c``. A plain function is called as
        ``f(X, C)`` with ``X (K, n)`` and ``C (K, c)``; an oracle has ``dim = n + c`` and receives
        the rows ``[x | context]``.

    Attributes
    ----------
    oracle : VectorOracle
        Counts the queries: ``box.oracle.nfev``, ``box.oracle.failures``.

    Raises
    ------
    TypeError
        ``f`` is not callable, ``estimator`` or ``scheduler`` of the wrong type.
    ConfigError
        Bad widths, widths that disagree with the oracle, oracle settings passed with an oracle, or a
        budget too small for the gradient of a single row (``n`` too large for it).

    Examples
    --------
    >>> import numpy as np
    >>> import torch
    >>> from zoblackbox.nn import BlackBox
    >>> def simulator(X):  # numpy inside: torch never sees how the outputs were computed
    ...     X = X.detach().numpy()
    ...     return np.stack([X[:, 0] * X[:, 1], np.sin(X[:, 1])], axis=1)
    >>> box = BlackBox(simulator, n=2, m=2)
    >>> x = torch.tensor([[1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    >>> box(x).sum().backward()  # d/dx [x0 x1 + sin x1] = [x1, x0 + cos x1]
    >>> [round(v, 6) for v in x.grad[0].tolist()]
    [2.0, 0.583853]
    >>> box.oracle.nfev  # one call of 2 n + 1 = 5 rows (central CGE)
    5
    """

    def __init__(self, f, n: int | None = None, m: int | None = None, estimator=None, *, budget: int | None = None,
                 on_failure=None, vectorized: bool = True, numpy: bool = False, scheduler: RowScheduler | None = None,
                 context: int = 0):
        super().__init__()
        if isinstance(context, (bool, np.bool_)) or not isinstance(context, (int, np.integer)) or context < 0:
            raise ConfigError(f"context must be a non-negative int (the side input's width), got {context!r}")
        self.context = c = int(context)
        if isinstance(f, Oracle):
            given = [name for name, value, default in (("budget", budget, None), ("on_failure", on_failure, None),
                                                       ("vectorized", vectorized, True), ("numpy", numpy, False))
                     if value is not default]
            if given:
                raise ConfigError(f"{', '.join(given)} belong(s) to the oracle {f!r}; set them when building it, "
                                  "not on the BlackBox")
            oracle = f if isinstance(f, VectorOracle) else _ScalarRows(f)
            if oracle.dim <= c:
                raise ConfigError(f"the oracle {f!r} takes rows of {oracle.dim} values, which leaves no input beside "
                                  f"context={c}; its dim must be n + context")
            for name, value, own in (("n", n, oracle.dim - c), ("m", m, oracle.out_dim)):
                if value is not None and _positive_int(value, name) != own:
                    detail = f"dim - context = {oracle.dim} - {c}" if name == "n" and c else f"{name} = {own}"
                    raise ConfigError(f"{name}={value!r} disagrees with the oracle {f!r} ({detail})")
        elif callable(f):
            if n is None or m is None:
                raise ConfigError(f"a plain function needs its widths: BlackBox(f, n=..., m=...), got n={n!r}, m={m!r}")
            n_in = _positive_int(n, "n")
            fn = f if c == 0 else _WithContext(f, n_in)
            oracle = VectorFunctionOracle(fn, n_in + c, _positive_int(m, "m"), vectorized=vectorized,
                                          numpy=numpy, budget=budget,
                                          on_failure="raise" if on_failure is None else on_failure)
        else:
            raise TypeError(f"f must be a callable, a VectorOracle or an Oracle, got {type(f).__name__}: "
                            f"{short_repr(f)}")
        if estimator is not None and not isinstance(estimator, (CoordinateEstimator, RandomEstimator)):
            raise TypeError(f"estimator must be a CoordinateEstimator, a RandomEstimator or None, got "
                            f"{type(estimator).__name__}: {short_repr(estimator)}")
        if isinstance(estimator, RandomEstimator) and (estimator.top_b is not None or estimator.shaping is not None):
            raise ConfigError(f"{estimator!r}: top_b and fitness_shaping select or rescale losses, which has no "
                              "vector-Jacobian product; use a plain RandomEstimator inside a BlackBox")
        if scheduler is not None and not callable(getattr(scheduler, "run", None)):
            raise TypeError(f"scheduler must be a RowScheduler or None, got {type(scheduler).__name__}: "
                            f"{short_repr(scheduler)}")
        self.oracle = oracle
        self.estimator = estimator
        self.scheduler = scheduler or _ONE_CALL
        self._defaults: dict[torch.dtype, CoordinateEstimator] = {}
        per_row = self.num_queries(1)
        if oracle.remaining < per_row:
            raise ConfigError(f"the gradient of a single row costs {per_row} queries ({self._cost_formula()} with "
                              f"n={self.n}), but the oracle has {oracle.remaining} left of its budget "
                              f"{oracle.budget}; raise the budget or use a RandomEstimator with fewer directions")

    @property
    def n(self) -> int:
        """Input width (the differentiated part of a row; the context comes on top)."""
        return self.oracle.dim - self.context

    @property
    def m(self) -> int:
        """Output width."""
        return self.oracle.out_dim

    def num_queries(self, batch_size: int, grad: bool = True) -> int:
        """Queries (rows of ``f``) of one forward of ``batch_size`` input rows.

        Parameters
        ----------
        batch_size : int
            Input rows ``B``.
        grad : bool
            Whether the forward also prepares a gradient (``False``: ``B`` rows).

        Returns
        -------
        int
            ``B (n + 1)`` (forward CGE), ``B (2 n + 1)`` (central CGE, the default), ``B (q + 1)`` (RGE) or
            ``B (2 q + 1)`` (antithetic RGE).
        """
        if not grad:
            return batch_size
        est = self.estimator
        if isinstance(est, RandomEstimator):
            per_row = (2 * est.q if est.antithetic else est.q) + 1
        else:  # CGE (the default is central)
            per_row = self.n + 1 if est is not None and est.scheme == "forward" else 2 * self.n + 1
        return batch_size * per_row

    def _cost_formula(self) -> str:
        est = self.estimator
        if isinstance(est, RandomEstimator):
            return "2 q + 1" if est.antithetic else "q + 1"
        return "n + 1" if est is not None and est.scheme == "forward" else "2 n + 1"

    def extra_repr(self) -> str:
        est = "central CGE, mu = cbrt(eps), relative" if self.estimator is None else repr(self.estimator)
        ctx = f", context={self.context}" if self.context else ""
        return f"n={self.n}, m={self.m}{ctx}, estimator={est}, oracle={self.oracle!r}"

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """``f`` on the rows of ``x``; differentiable with respect to ``x`` by finite differences.

        Parameters
        ----------
        x : torch.Tensor
            Floating-point input of shape ``(..., n)``.
        context : torch.Tensor or None
            The side input, shape ``(..., c)`` with ``x``'s leading shape; required when the box
            was built with ``context=c > 0``, refused otherwise. It gets no gradient.

        Returns
        -------
        torch.Tensor
            ``f``'s outputs, shape ``(..., m)``, in ``x``'s dtype and on its device. Under the ``"inf"`` or
            ``"skip"`` policy a failed unperturbed row comes back as ``inf`` or ``nan``.

        Raises
        ------
        TypeError
            ``x`` (or ``context``) is not a tensor.
        ConfigError
            ``x`` is not floating-point, has the wrong width, no rows, or non-finite entries (named); a
            context is missing, unexpected, of the wrong shape or non-finite;
            or a step underflows (:class:`~zoblackbox.estimators.StepUnderflow`, naming the row and
            coordinate).
        BudgetExhaustedError
            The forward's rows exceed what is left of the budget (nothing is queried).
        OracleError
            A row failed under the ``"raise"`` policy (the message names the query, the input row and
            the perturbation), or ``f`` answered with the wrong shape.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (..., {self.n}), got {type(x).__name__}: "
                            f"{short_repr(x)}")
        if not x.is_floating_point():
            raise ConfigError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.n:
            raise ConfigError(f"x must have shape (..., {self.n}) (n={self.n}), got {tuple(x.shape)}")
        if x.numel() == 0:
            raise ConfigError(f"x holds no rows (shape {tuple(x.shape)}); the black box needs at least one")
        rows = x.reshape(-1, self.n)
        finite = torch.isfinite(rows)
        if not bool(finite.all()):
            b, i = (~finite).nonzero()[0].tolist()
            raise ConfigError(f"x must be finite: row {b}, coordinate {i} is {float(rows[b, i])!r} "
                              f"({int((~finite).sum())} non-finite entries)")
        ctx = self._context_rows(x, context)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _BlackBoxFunction.apply(rows, ctx, self)
        else:
            self._check_budget(rows.shape[0], grad=False)
            work = self._working(rows)
            y = self._evaluate(work.unsqueeze(1), ("the unperturbed point",), self._working_context(ctx, work))[:, 0]
            y = y.to(device=x.device, dtype=x.dtype)
        return y.reshape(*x.shape[:-1], self.m)

    def _context_rows(self, x: torch.Tensor, context) -> torch.Tensor | None:
        """The context as ``(B, c)`` rows, checked against ``x``; ``None`` without a context."""
        c = self.context
        if c == 0:
            if context is not None:
                raise ConfigError("this BlackBox takes no context (built with context=0); build it with "
                                  "context=<width> to pass a side input")
            return None
        if context is None:
            raise ConfigError(f"this BlackBox needs a context of shape (..., {c}) with every forward: box(x, context)")
        if not isinstance(context, torch.Tensor):
            raise TypeError(f"context must be a torch.Tensor of shape (..., {c}), got {type(context).__name__}: "
                            f"{short_repr(context)}")
        if tuple(context.shape) != (*x.shape[:-1], c):
            raise ConfigError(f"context must have shape {(*x.shape[:-1], c)} (x's leading shape, then context={c}), "
                              f"got {tuple(context.shape)}")
        rows = context.detach().reshape(-1, c)
        if not bool(torch.isfinite(rows).all()):
            b, i = (~torch.isfinite(rows)).nonzero()[0].tolist()
            raise ConfigError(f"context must be finite: row {b}, entry {i} is {float(rows[b, i])!r}")
        return rows

    def _working_context(self, ctx: torch.Tensor | None, work: torch.Tensor) -> torch.Tensor | None:
        return None if ctx is None else ctx.to(dtype=work.dtype, device=work.device)

    def _working(self, rows: torch.Tensor) -> torch.Tensor:
        """Detached rows in the oracle's dtype and device (the input's where the oracle fixes none)."""
        oracle = self.oracle
        return rows.detach().to(dtype=oracle.dtype or rows.dtype, device=oracle.device or rows.device)

    def _evaluate(self, rows: torch.Tensor, what: tuple[str, ...], ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs ``(B, R, m)`` of ``rows`` ``(B, R, n)``: one counted evaluation of ``B R`` rows,
        each followed by its input row's context (``ctx`` ``(B, c)``) when there is one.

        ``what[j]`` names row ``j`` of each input row's block, for error messages."""
        B, R, _ = rows.shape
        oracle, K = self.oracle, B * R
        if ctx is not None:
            rows = torch.cat([rows, ctx.unsqueeze(1).expand(B, R, self.context)], dim=2)
        first = oracle.nfev
        try:
            values = self.scheduler.run(oracle, rows.reshape(K, oracle.dim))
        except OracleError as exc:
            r = None if exc.query_index is None else exc.query_index - first
            if r is None or not 0 <= r < K:
                raise
            b, j = divmod(r, R)
            raise OracleError(f"{exc} [BlackBox: query row {r} of {K} is input row {b}, {what[j]}]",
                              query_index=exc.query_index, value=exc.value, kind=exc.kind) from exc
        return values.reshape(B, R, self.m)

    def _differentiate(self, x: torch.Tensor, context: torch.Tensor | None = None):
        """``(y, kind, saved)``: the outputs and what the backward needs (see _BlackBoxFunction)."""
        work = self._working(x)
        ctx = self._working_context(context, work)
        est = self.estimator if self.estimator is not None else self._default(work.dtype)
        self._check_budget(work.shape[0])
        if isinstance(est, RandomEstimator):
            y, saved = self._random(work, est, ctx)
            return y.to(device=x.device, dtype=x.dtype), "directions", saved
        y, J = self._coordinate(work, est, ctx)
        return y.to(device=x.device, dtype=x.dtype), "jacobian", (J,)

    def _check_budget(self, B: int, grad: bool = True) -> None:
        K = self.num_queries(B, grad)
        if K > self.oracle.remaining:
            cost = f"{self._cost_formula()} per row with n={self.n}" if grad else "one per row, no gradient"
            raise BudgetExhaustedError(f"a forward of {B} input row(s) costs {K} queries ({cost}), but the oracle has "
                                       f"{self.oracle.remaining} left of its budget {self.oracle.budget}; nothing "
                                       "was queried")

    def _default(self, dtype: torch.dtype) -> CoordinateEstimator:
        if dtype not in self._defaults:
            mu = float(torch.finfo(dtype).eps) ** (1 / 3)
            self._defaults[dtype] = CoordinateEstimator(mu=mu, scheme="central", relative=True)
        return self._defaults[dtype]

    @staticmethod
    def _check_steps(work: torch.Tensor, steps: torch.Tensor, mu: float, sign: str) -> None:
        zero = steps == 0
        if bool(zero.any()):
            b, i = zero.nonzero()[0].tolist()
            raise StepUnderflow(f"mu={mu!r} is below the {work.dtype} resolution at input row {b}, coordinate {i} "
                                f"(x={float(work[b, i])!r}): x {sign} mu == x, so no difference can be measured; "
                                "raise mu")

    def _coordinate(self, work: torch.Tensor, est: CoordinateEstimator, ctx: torch.Tensor | None = None):
        n = self.n
        h = est.mu * torch.clamp(work.abs(), min=1.0) if est.relative else est.mu
        up = (work + h) - work  # realized steps, as CoordinateEstimator.plan uses them
        self._check_steps(work, up, est.mu, "+")
        steps = [up]
        what = ["the unperturbed point"] + [f"coordinate {i} stepped by +mu" for i in range(n)]
        if est.scheme == "central":
            down = (work - h) - work
            self._check_steps(work, down, est.mu, "-")
            steps.append(down)
            what += [f"coordinate {i} stepped by -mu" for i in range(n)]
        base = work.unsqueeze(1)
        rows = torch.cat([base] + [base + torch.diag_embed(s) for s in steps], dim=1)  # (B, 1 + n[+ n], n)
        V = self._evaluate(rows, tuple(what), ctx)
        up = up.to(V.dtype)
        if est.scheme == "forward":
            J = (V[:, 1:] - V[:, :1]) / up.unsqueeze(2)
        else:
            J = (V[:, 1:n + 1] - V[:, n + 1:]) / (up - down.to(V.dtype)).unsqueeze(2)
        J = torch.where(torch.isfinite(J), J, torch.zeros_like(J))  # failed rows ("inf"/"skip") drop out
        return V[:, 0], J.transpose(1, 2).contiguous()  # (B, m), (B, m, n)

    def _random(self, work: torch.Tensor, est: RandomEstimator, ctx: torch.Tensor | None = None):
        B, n = work.shape
        q, mu = est.q, est.mu
        self._check_steps(work, (work + mu) - work, mu, "+")
        if est.antithetic:
            self._check_steps(work, (work - mu) - work, mu, "-")
        U = est.sampler.sample(B * q, n, est.generator)
        if not isinstance(U, torch.Tensor) or tuple(U.shape) != (B * q, n):
            got = tuple(U.shape) if isinstance(U, torch.Tensor) else type(U).__name__
            raise ConfigError(f"{est.sampler!r}.sample(q={B * q}, n={n}) must return a tensor of shape "
                              f"({B * q}, {n}), got {got}")
        U = U.to(device=work.device, dtype=work.dtype).reshape(B, q, n)
        base = work.unsqueeze(1)
        blocks = [base, base + mu * U] + ([base - mu * U] if est.antithetic else [])
        what = (("the unperturbed point",) + tuple(f"direction {k} (+mu u)" for k in range(q))
                + (tuple(f"direction {k} (-mu u)" for k in range(q)) if est.antithetic else ()))
        V = self._evaluate(torch.cat(blocks, dim=1), what, ctx)
        if est.antithetic:
            D = (V[:, 1:q + 1] - V[:, q + 1:]) / (2 * mu)
        else:
            D = (V[:, 1:] - V[:, :1]) / mu  # (B, q, m)
        ok = torch.isfinite(D).all(dim=2)  # directions whose rows all answered
        D = torch.where(ok.unsqueeze(2), D, torch.zeros_like(D))
        q_ok = ok.sum(dim=1, keepdim=True).to(D.dtype)
        weight = torch.where(q_ok > 0, est.phi(n) / q_ok.clamp(min=1), torch.zeros_like(q_ok))
        return V[:, 0], (U.to(D.dtype), D * weight.unsqueeze(2))
