"""Gymnasium policies as oracles: ``x`` (a flat policy parameter vector) -> minus the mean return.

:class:`GymPolicyOracle` wraps a gymnasium environment and a policy (:class:`LinearPolicy`,
:class:`MLPPolicy`) so that every zoblackbox estimator, optimizer, budget, failure policy and
scheduler works on reinforcement-learning tasks. One query is ``episodes`` (k) episodes of the
policy with parameters ``x``; its loss is ``-mean(return)``.

Common random numbers (CRN)
    A *batch* is everything one :meth:`Oracle.reserve` opens: one ``evaluate`` call, one
    estimator plan (whatever scheduler runs it), one ``oracle(x)``. Every query of a batch runs
    its k episodes with the *same* k environment seeds, so an antithetic pair ``x + mu u``,
    ``x - mu u`` (or a whole ES population) is compared on identical start states and noise. The
    seeds advance between batches: batch ``b`` uses ``SeedSequence([seed, b]).generate_state(k)``.
    A retry of a failed query re-runs the same seeds.

Vector environments
    A batch's ``K * k`` (query, episode) pairs are queued through the ``num_envs`` sub-environments
    of one ``gymnasium.make_vec(..., vectorization_mode="sync")`` environment: a sub-environment
    that finishes an episode is reset (``reset(seed=...)``) with the next pair's seed and
    parameters. The policy acts for all active sub-environments in one call; the oracle steps each
    active sub-environment itself rather than through ``SyncVectorEnv.step``, whose per-step merge of
    info dicts cost about 12% of a MuJoCo rollout, and which would also step finished
    sub-environments through gymnasium's autoreset step. Nothing is stepped that is not counted, so
    :attr:`GymPolicyOracle.vector_steps` equals the env steps of the rollouts.
    ``vectorize="none"`` uses plain single environments (the reference; the same returns).

Observation normalisation (oracle state)
    ``obs_norm=None``: raw observations. ``"running"``: the policy sees ``(obs - mean) / std``
    with per-dimension statistics of every observation the counted training episodes have acted
    on (ARS V2). Statistics are frozen within a batch (the queries of one batch see the same
    normalisation, so CRN pairs stay paired) and absorb the batch's observations when the next
    batch opens; the loss function therefore changes (slowly) between batches. ``"frozen"``: the
    statistics only change when you set them (:meth:`GymPolicyOracle.set_obs_stats`,
    :meth:`GymPolicyOracle.collect_obs_stats`). The statistics are part of the trained policy:
    :meth:`GymPolicyOracle.evaluate_policy` uses them, :meth:`state_dict` saves them.

Budgets
    ``max_episodes`` and ``max_env_steps`` count *training* episodes and env steps (held-out
    evaluations are counted apart). Both are exact: a batch is refused before anything runs
    (:class:`~zoblackbox.errors.BudgetExhaustedError`) unless its ``K * k`` episodes -- and, for
    env steps, its worst case ``K * k * max_episode_steps`` -- fit in what is left.
"""

from __future__ import annotations

import copy
import itertools
import math
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from zoblackbox.checkpoint import field_error
from zoblackbox.errors import BudgetExhaustedError, CheckpointError, ConfigError, MissingDependencyError
from zoblackbox.oracle import Oracle, as_vector

__all__ = [
    "GymPolicyOracle",
    "LinearPolicy",
    "MLPPolicy",
    "ObsNormalizer",
    "Policy",
    "PolicyEvaluation",
    "import_gymnasium",
]

OBS_NORM_MODES = (None, "frozen", "running")
VECTORIZE_MODES = ("sync", "none")


def import_gymnasium():
    """gymnasium, imported on first use; :class:`MissingDependencyError` when it is not installed."""
    try:
        import gymnasium
    except ImportError as exc:
        raise MissingDependencyError(
            "GymPolicyOracle needs gymnasium, which is not installed: pip install zoblackbox[gym]"
        ) from exc
    return gymnasium


def _check_shift(value) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(value)):
        raise ConfigError(f"reward_shift must be a finite number (subtracted from every training step's reward), "
                          f"got {value!r}")
    return float(value)


def _require_env_dependencies(spec) -> None:
    """A MuJoCo task without the ``mujoco`` package: MissingDependencyError naming the extra, before any episode."""
    entry = spec.entry_point if isinstance(spec.entry_point, str) else ""
    if entry.startswith("gymnasium.envs.mujoco"):
        for module in ("mujoco", "imageio"):
            try:
                __import__(module)
            except ImportError as exc:
                raise MissingDependencyError(
                    f"{spec.id} is a MuJoCo task and needs the {module!r} package, which is not installed: "
                    "pip install zoblackbox[gym] (the extra installs mujoco; its wheels ship the models)") from exc


def _check_int(name: str, value, minimum: int = 1, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------------------ policies
class Policy:
    """A deterministic policy ``obs -> action`` whose parameters are one flat vector.

    A policy is a *shape*: constructed with optional ``obs_dim``/``act_dim`` and bound to an
    environment's spaces by :meth:`bind` (the oracle does it; a given dimension must match the
    space). Discrete actions are the argmax of ``n`` outputs; continuous (Box) actions are the
    outputs clipped to the action bounds (``squash="clip"``) or mapped into them by
    ``low + (tanh(o) + 1) / 2 * (high - low)`` (``squash="tanh"``).

    Every method works on a batch: row ``i`` of ``params`` acts on row ``i`` of ``obs``, which is
    how one vector environment runs many different parameter vectors at once.
    """

    squash_default = "clip"

    def __init__(self, obs_dim: int | None = None, act_dim: int | None = None, *, squash: str | None = None):
        self.obs_dim = _check_int("obs_dim", obs_dim, allow_none=True)
        self.act_dim = _check_int("act_dim", act_dim, allow_none=True)
        squash = self.squash_default if squash is None else squash
        if squash not in ("clip", "tanh"):
            raise ConfigError(f"squash must be 'clip' or 'tanh', got {squash!r}")
        self.squash = squash
        self.discrete: bool | None = None
        self.low: np.ndarray | None = None
        self.high: np.ndarray | None = None
        self.action_dtype = None

    # -- binding
    @property
    def bound(self) -> bool:
        return self.discrete is not None

    def bind(self, observation_space, action_space, env_id: str = "the environment") -> Policy:
        """A copy of this policy with the dimensions of gymnasium spaces (any dimension given at
        construction must match them); the policy itself is left unbound, so it can be reused."""
        gym = import_gymnasium()
        spaces = gym.spaces
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 1:
            raise ConfigError(f"{type(self).__name__} needs a 1-D Box observation space; {env_id} has "
                              f"{observation_space}")
        obs_dim = int(observation_space.shape[0])
        if isinstance(action_space, spaces.Discrete):
            act_dim, discrete = int(action_space.n), True
        elif isinstance(action_space, spaces.Box) and len(action_space.shape) == 1:
            act_dim, discrete = int(action_space.shape[0]), False
        else:
            raise ConfigError(f"{type(self).__name__} needs a Discrete or 1-D Box action space; {env_id} has "
                              f"{action_space}")
        if self.obs_dim is not None and self.obs_dim != obs_dim:
            raise ConfigError(f"{type(self).__name__}(obs_dim={self.obs_dim}) does not match {env_id}: its "
                              f"observation space has shape ({obs_dim},)")
        if self.act_dim is not None and self.act_dim != act_dim:
            what = f"Discrete({act_dim})" if discrete else f"shape ({act_dim},)"
            raise ConfigError(f"{type(self).__name__}(act_dim={self.act_dim}) does not match {env_id}: its "
                              f"action space is {what}")
        bound = copy.copy(self)
        bound.obs_dim, bound.act_dim, bound.discrete = obs_dim, act_dim, discrete
        if discrete:
            bound.low = bound.high = None
            bound.action_dtype = np.int64
            bound.action_start = int(getattr(action_space, "start", 0))
        else:
            bound.low = np.asarray(action_space.low, dtype=np.float64)
            bound.high = np.asarray(action_space.high, dtype=np.float64)
            if self.squash == "tanh" and not (np.all(np.isfinite(bound.low)) and np.all(np.isfinite(bound.high))):
                raise ConfigError(f"squash='tanh' needs finite action bounds; {env_id} has {action_space}")
            bound.action_dtype = action_space.dtype
        return bound

    def _require_bound(self):
        if self.obs_dim is None or self.act_dim is None:
            raise ConfigError(f"{type(self).__name__} has no dimensions yet: give obs_dim and act_dim, or bind it "
                              "to an environment (GymPolicyOracle does)")

    # -- parameters
    @property
    def num_params(self) -> int:
        """Length of the flat parameter vector."""
        self._require_bound()
        return sum(int(np.prod(s)) for s in self.shapes())

    def shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the weight arrays, in flat-vector order."""
        raise NotImplementedError

    def unflatten(self, params) -> list[np.ndarray]:
        """``(P, num_params)`` (or ``(num_params,)``) -> the weight arrays, each with a leading P axis."""
        p = np.asarray(params, dtype=np.float64)
        single = p.ndim == 1
        p = p[None] if single else p
        if p.ndim != 2 or p.shape[1] != self.num_params:
            raise ConfigError(f"{type(self).__name__} has {self.num_params} parameters, got an array of shape "
                              f"{np.shape(params)}")
        out, start = [], 0
        for s in self.shapes():
            n = int(np.prod(s))
            w = p[:, start:start + n].reshape((p.shape[0], *s))
            out.append(w[0] if single else w)
            start += n
        return out

    def flatten(self, weights: Sequence) -> np.ndarray:
        """The inverse of :meth:`unflatten` for one parameter set."""
        shapes = self.shapes()
        if len(weights) != len(shapes):
            raise ConfigError(f"expected {len(shapes)} weight arrays, got {len(weights)}")
        parts = []
        for w, s in zip(weights, shapes):
            w = np.asarray(w, dtype=np.float64)
            if w.shape != tuple(s):
                raise ConfigError(f"weight of shape {w.shape} where {tuple(s)} is expected")
            parts.append(w.reshape(-1))
        return np.concatenate(parts)

    def init_params(self, seed: int | None = 0) -> np.ndarray:
        """A starting parameter vector (zeros for a linear policy, a standard initialization for MLPs)."""
        return np.zeros(self.num_params)

    # -- acting
    def outputs(self, params: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """Raw outputs ``(P, act_dim)`` for parameter rows ``params`` ``(P, d)`` and observations ``(P, obs_dim)``."""
        raise NotImplementedError

    def act(self, params: np.ndarray, obs: np.ndarray) -> np.ndarray:
        """Actions for a batch (``P`` parameter rows, ``P`` observations), in the action space."""
        out = self.outputs(np.atleast_2d(params), np.atleast_2d(obs))
        if self.discrete:
            return np.argmax(out, axis=1).astype(np.int64) + self.action_start
        if self.squash == "tanh":
            a = self.low + (np.tanh(out) + 1.0) * 0.5 * (self.high - self.low)
        else:
            a = np.clip(out, self.low, self.high)
        return a.astype(self.action_dtype, copy=False)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(obs_dim={self.obs_dim}, act_dim={self.act_dim}, squash={self.squash!r})"


class LinearPolicy(Policy):
    """``o = W obs (+ b)``: ``act_dim * obs_dim`` (+ ``act_dim``) parameters, ``W`` row-major first.

    Args:
        obs_dim, act_dim: optional; taken from the environment when bound.
        bias: add a bias vector (default False, as in ARS).
        squash: continuous actions by ``"clip"`` (default) or ``"tanh"``.
    """

    def __init__(self, obs_dim: int | None = None, act_dim: int | None = None, *, bias: bool = False,
                 squash: str | None = None):
        super().__init__(obs_dim, act_dim, squash=squash)
        self.bias = bool(bias)

    def shapes(self):
        self._require_bound()
        return [(self.act_dim, self.obs_dim)] + ([(self.act_dim,)] if self.bias else [])

    def outputs(self, params, obs):
        ws = self.unflatten(params)
        out = np.einsum("pao,po->pa", ws[0], obs)
        return out + ws[1] if self.bias else out

    def __repr__(self) -> str:
        return f"LinearPolicy(obs_dim={self.obs_dim}, act_dim={self.act_dim}, bias={self.bias}, squash={self.squash!r})"


class MLPPolicy(Policy):
    """A tanh (or relu) multilayer perceptron: ``obs -> hidden... -> act_dim`` with biases.

    Parameters are ``W1, b1, W2, b2, ...`` (``W`` of shape ``(out, in)``) in that order.

    Args:
        hidden: hidden layer widths (default ``(32,)``).
        activation: ``"tanh"`` (default) or ``"relu"``.
        squash: continuous actions by ``"tanh"`` (default) or ``"clip"``.
    """

    squash_default = "tanh"

    def __init__(self, hidden: Sequence[int] = (32,), obs_dim: int | None = None, act_dim: int | None = None, *,
                 activation: str = "tanh", squash: str | None = None):
        super().__init__(obs_dim, act_dim, squash=squash)
        hidden = tuple(hidden) if isinstance(hidden, (list, tuple)) else (hidden,)
        if not hidden:
            raise ConfigError("hidden must name at least one layer width; use LinearPolicy for none")
        for h in hidden:
            _check_int("hidden layer width", h)
        self.hidden = tuple(int(h) for h in hidden)
        if activation not in ("tanh", "relu"):
            raise ConfigError(f"activation must be 'tanh' or 'relu', got {activation!r}")
        self.activation = activation

    def _sizes(self):
        self._require_bound()
        return [self.obs_dim, *self.hidden, self.act_dim]

    def shapes(self):
        sizes = self._sizes()
        out = []
        for i, o in itertools.pairwise(sizes):
            out += [(o, i), (o,)]
        return out

    def init_params(self, seed: int | None = 0) -> np.ndarray:
        """PyTorch's default initialization (uniform in ``+-1/sqrt(fan_in)``), output layer scaled by 0.1."""
        rng = np.random.default_rng(seed)
        weights, shapes = [], self.shapes()
        for li in range(0, len(shapes), 2):
            o, i = shapes[li]
            bound = 1.0 / math.sqrt(i)
            scale = 0.1 if li == len(shapes) - 2 else 1.0
            weights.append(rng.uniform(-bound, bound, (o, i)) * scale)
            weights.append(rng.uniform(-bound, bound, (o,)) * scale)
        return self.flatten(weights)

    def outputs(self, params, obs):
        ws = self.unflatten(params)
        h = obs
        act = np.tanh if self.activation == "tanh" else (lambda z: np.maximum(z, 0.0))
        for li in range(0, len(ws), 2):
            h = np.einsum("poi,pi->po", ws[li], h) + ws[li + 1]
            if li < len(ws) - 2:
                h = act(h)
        return h

    def __repr__(self) -> str:
        return (f"MLPPolicy(hidden={self.hidden}, obs_dim={self.obs_dim}, act_dim={self.act_dim}, "
                f"activation={self.activation!r}, squash={self.squash!r})")


# ------------------------------------------------------------------------------------------ obs stats
class ObsNormalizer:
    """Per-dimension running mean and variance (Chan et al.'s parallel update), as ``(obs - mean) / std``.

    ``std`` is ``sqrt(var)`` with dimensions whose variance is below ``1e-8`` left unscaled (std 1),
    as in ARS; with no observation seen yet the map is the identity.
    """

    def __init__(self, dim: int):
        self.dim = int(dim)
        self.count = 0
        self.mean = np.zeros(self.dim)
        self.m2 = np.zeros(self.dim)

    def copy(self) -> ObsNormalizer:
        c = ObsNormalizer(self.dim)
        c.count, c.mean, c.m2 = self.count, self.mean.copy(), self.m2.copy()
        return c

    def update(self, obs: np.ndarray) -> None:
        obs = np.asarray(obs, dtype=np.float64).reshape(-1, self.dim)
        n = obs.shape[0]
        if n == 0:
            return
        self.merge(n, obs.mean(axis=0), ((obs - obs.mean(axis=0)) ** 2).sum(axis=0))

    def merge(self, n: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if n == 0:
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta ** 2 * (self.count * n / total)
        self.count = total

    def absorb(self, other: ObsNormalizer) -> None:
        self.merge(other.count, other.mean, other.m2)

    @property
    def std(self) -> np.ndarray:
        if self.count < 2:
            return np.ones(self.dim)
        var = self.m2 / self.count
        return np.where(var < 1e-8, 1.0, np.sqrt(np.maximum(var, 1e-8)))

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        if self.count == 0:
            return obs
        return (obs - self.mean) / self.std

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    def load_state_dict(self, state: Mapping, field: str = "obs_stats") -> None:
        """Load :meth:`state_dict` (checked first: :meth:`check_state_dict`)."""
        self.count, self.mean, self.m2 = self.check_state_dict(state, field)

    def check_state_dict(self, state: Mapping, field: str = "obs_stats") -> tuple[int, np.ndarray, np.ndarray]:
        """``(count, mean, m2)`` of a :meth:`state_dict`: ``count`` an int >= 0, ``mean`` and ``m2`` finite
        vectors of this observation's dim, ``m2 >= 0``; a CheckpointError names the field. Changes nothing."""
        if not isinstance(state, Mapping):
            raise field_error(field, state, "a dict with count, mean and m2")
        for key in ("count", "mean", "m2"):
            if key not in state:
                raise CheckpointError(f"field {field}.{key} is missing")
        count = state["count"]
        if isinstance(count, (bool, np.bool_)) or not isinstance(count, (int, np.integer)) or count < 0:
            raise field_error(f"{field}.count", count, "an int >= 0")
        out = []
        for key in ("mean", "m2"):
            value = state[key]
            try:
                arr = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError):
                arr = None
            if isinstance(value, (str, bytes)) or arr is None or arr.shape != (self.dim,) or not np.all(np.isfinite(arr)):
                raise field_error(f"{field}.{key}", value, f"{self.dim} finite floats (the observation's dim)")
            if key == "m2" and np.any(arr < 0):
                raise field_error(f"{field}.m2", value, "sums of squares >= 0")
            out.append(arr)
        return int(count), out[0], out[1]


# ------------------------------------------------------------------------------------------ results
@dataclass
class PolicyEvaluation:
    """Returns and lengths of evaluation episodes (seed ``seeds[i]`` for episode ``i``)."""

    returns: np.ndarray
    lengths: np.ndarray
    seeds: list[int]

    @property
    def mean(self) -> float:
        return float(np.mean(self.returns))

    @property
    def std(self) -> float:
        return float(np.std(self.returns))

    @property
    def env_steps(self) -> int:
        return int(np.sum(self.lengths))


@dataclass
class _Rollouts:
    returns: np.ndarray  # per pair
    lengths: np.ndarray  # per pair
    obs: ObsNormalizer | None  # statistics of the observations acted on (when collected)
    vector_steps: int  # sub-environment steps (only active sub-environments are stepped)


# ------------------------------------------------------------------------------------------ oracle
class GymPolicyOracle(Oracle):
    """A gymnasium environment and a policy as an oracle: ``loss(x) = -mean return over k episodes``.

    Args:
        env_id: a registered gymnasium id (``"CartPole-v1"``); an unknown id is a ``ConfigError``.
        policy: a :class:`Policy` (``LinearPolicy()``, ``MLPPolicy((32,))``); bound to the spaces here.
        episodes: k, episodes per query (>= 1).
        seed: base of the training episode seeds (module docstring, "CRN").
        obs_norm: ``None``, ``"frozen"`` or ``"running"`` (module docstring).
        num_envs: sub-environments of the vector environment (default 16; fewer when a batch has
            fewer episodes).
        vectorize: ``"sync"`` (``gymnasium.make_vec``) or ``"none"`` (single environments).
        max_episodes, max_env_steps: exact budgets of training episodes and env steps.
        max_episode_steps: override the environment's time limit (needed for ``max_env_steps``
            when the environment has none).
        env_kwargs: keyword arguments of ``gymnasium.make``.
        reward_shift: a finite number subtracted from every training step's reward (ARS's ``shift``:
            the survival bonus of Hopper, Walker2d and Ant, so that standing still is not a local
            optimum); training losses are ``-mean(return - reward_shift * length)``. Held-out
            evaluations (:meth:`evaluate_policy`) always report the environment's true return.
        common_seeds: ``True`` (default): every query of a batch runs the batch's k env seeds
            (common random numbers, module docstring). ``False``: query ``i`` of a batch runs its own
            seeds ``SeedSequence([seed, batch, i])`` -- every rollout from its own start state, as
            ARS's workers do. (With a process pool, ``i`` counts the queries each worker evaluates.)
        **oracle_kwargs: ``budget`` (queries), ``on_failure``, ``dtype`` (default float64) as in
            :class:`~zoblackbox.oracle.Oracle`.

    Counters: :attr:`nfev` (queries), :attr:`episodes`, :attr:`env_steps` (training),
    :attr:`eval_episodes`, :attr:`eval_env_steps` (held-out evaluations), :attr:`vector_steps`.
    The oracle pickles without its environments (they are rebuilt on first use), so it works with
    :class:`~zoblackbox.schedule.ProcessPoolScheduler`; there, episodes and queries are counted
    exactly, while env steps and running observation statistics are only known for rollouts run
    in this process (a warning says so once).
    """

    def __init__(self, env_id: str, policy: Policy, *, episodes: int = 1, seed: int = 0,
                 obs_norm: str | None = None, num_envs: int = 16, vectorize: str = "sync",
                 max_episodes: int | None = None, max_env_steps: int | None = None,
                 max_episode_steps: int | None = None, env_kwargs: Mapping | None = None,
                 reward_shift: float = 0.0, common_seeds: bool = True, **oracle_kwargs):
        gym = import_gymnasium()
        if not isinstance(env_id, str):
            raise ConfigError(f"env_id must be a registered gymnasium id (a str), got {env_id!r}")
        if not isinstance(policy, Policy):
            raise ConfigError(f"policy must be a LinearPolicy, MLPPolicy or other Policy, got {policy!r}")
        self.k = _check_int("episodes", episodes)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
        if obs_norm not in OBS_NORM_MODES:
            raise ConfigError(f"obs_norm must be one of {OBS_NORM_MODES}, got {obs_norm!r}")
        if vectorize not in VECTORIZE_MODES:
            raise ConfigError(f"vectorize must be one of {VECTORIZE_MODES}, got {vectorize!r}")
        self.reward_shift = _check_shift(reward_shift)
        if not isinstance(common_seeds, (bool, np.bool_)):
            raise ConfigError(f"common_seeds must be a bool (True: every query of a batch runs the same env seeds), "
                              f"got {common_seeds!r}")
        self.common_seeds = bool(common_seeds)
        if vectorize == "sync" and not hasattr(getattr(gym, "vector", None), "AutoresetMode"):
            raise ConfigError("vectorize='sync' needs gymnasium >= 1.1 (AutoresetMode); use vectorize='none'")
        self.num_envs = _check_int("num_envs", num_envs)
        self.max_episodes = _check_int("max_episodes", max_episodes, 0, allow_none=True)
        self.max_env_steps = _check_int("max_env_steps", max_env_steps, 0, allow_none=True)
        self.env_id = env_id
        self.env_kwargs = dict(env_kwargs or {})
        try:
            spec = gym.spec(env_id)
        except gym.error.Error as exc:
            raise ConfigError(f"unknown gymnasium environment id {env_id!r}: {exc}") from exc
        limit = _check_int("max_episode_steps", max_episode_steps, allow_none=True)
        self.max_episode_steps = limit if limit is not None else spec.max_episode_steps
        if max_episode_steps is not None:
            self.env_kwargs["max_episode_steps"] = limit
        if self.max_env_steps is not None and self.max_episode_steps is None:
            raise ConfigError(f"max_env_steps needs a time limit: {env_id} has none, pass max_episode_steps")
        _require_env_dependencies(spec)
        try:
            probe = gym.make(env_id, **self.env_kwargs)
        except Exception as exc:
            raise ConfigError(f"gymnasium could not make {env_id!r} with {self.env_kwargs}: "
                              f"{type(exc).__name__}: {exc}") from exc
        try:
            self.observation_space, self.action_space = probe.observation_space, probe.action_space
        finally:
            probe.close()
        self.actor = policy.bind(self.observation_space, self.action_space, env_id)
        oracle_kwargs.setdefault("dtype", torch.float64)
        super().__init__(self.actor.num_params, **oracle_kwargs)
        self.seed = int(seed)
        self.obs_norm = obs_norm
        self.vectorize = vectorize
        self.obs_stats = ObsNormalizer(self.actor.obs_dim)
        self._pending_stats = ObsNormalizer(self.actor.obs_dim)
        self._batch = 0  # index of the current batch (its seeds)
        self._used = False  # whether the current batch has run (the next reserve opens a new one)
        self._pos = 0  # queries of the current batch evaluated in this process (their seeds, common_seeds=False)
        self._extra_episodes = 0
        self._env_steps = 0
        self._vector_steps = 0
        self._eval_episodes = 0
        self._eval_env_steps = 0
        self._local_queries = 0  # queries evaluated in this process and not yet recorded
        self.env_steps_complete = True  # False once a batch ran in other processes
        self._warned = False
        self._envs: dict = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ counters
    @property
    def episodes(self) -> int:
        """Training episodes run so far: ``k`` per counted query (retries included), plus those of
        :meth:`collect_obs_stats`."""
        return self.k * self.nfev + self._extra_episodes

    @property
    def env_steps(self) -> int:
        """Training env steps so far (steps of the counted episodes; no autoreset or idle step)."""
        return self._env_steps

    @property
    def eval_episodes(self) -> int:
        """Episodes run by :meth:`evaluate_policy` (not charged to the budgets)."""
        return self._eval_episodes

    @property
    def eval_env_steps(self) -> int:
        return self._eval_env_steps

    @property
    def vector_steps(self) -> int:
        """Sub-environment steps of training rollouts. Only sub-environments with an episode to run are
        stepped (no autoreset or idle steps), so this equals :attr:`env_steps` in this process."""
        return self._vector_steps

    @property
    def batches(self) -> int:
        """Batches opened so far (each with its own episode seeds)."""
        return self._batch + int(self._used)

    def episode_seeds(self, batch: int | None = None) -> list[int]:
        """The k environment seeds of ``batch`` (default: the batch the next query runs in)."""
        if batch is None:
            batch = self._batch + int(self._used)
        return [int(s) for s in np.random.SeedSequence([self.seed, int(batch)]).generate_state(self.k)]

    @property
    def remaining(self) -> float:
        """Queries left within every budget (queries, episodes, env steps)."""
        left = super().remaining
        if self.max_episodes is not None:
            left = min(left, (self.max_episodes - self.episodes) // self.k)
        if self.max_env_steps is not None:
            left = min(left, (self.max_env_steps - self._env_steps) // (self.k * self.max_episode_steps))
        return left

    # ------------------------------------------------------------------ batches and budgets
    def reserve(self, n: int) -> None:
        """Open a batch of ``n`` queries: refuse it if it would overrun a budget, else advance the seeds
        (and let running observation statistics absorb the previous batch)."""
        if self.max_episodes is not None and self.episodes + n * self.k > self.max_episodes:
            raise BudgetExhaustedError(
                f"a batch of {n} queries x {self.k} episodes would exceed the episode budget of {self.max_episodes} "
                f"({self.episodes} already run, {self.max_episodes - self.episodes} left)")
        if self.max_env_steps is not None:
            worst = n * self.k * self.max_episode_steps
            if self._env_steps + worst > self.max_env_steps:
                raise BudgetExhaustedError(
                    f"a batch of {n} queries x {self.k} episodes may take up to {worst} env steps "
                    f"({self.max_episode_steps} per episode), more than the {self.max_env_steps - self._env_steps} "
                    f"left of the env-step budget of {self.max_env_steps}")
        super().reserve(n)
        if self._used:
            self._batch += 1
            self._used = False
            self._pos = 0
            self._commit_stats()

    def _commit_stats(self) -> None:
        if self.obs_norm == "running" and self._pending_stats.count:
            self.obs_stats.absorb(self._pending_stats)
        self._pending_stats = ObsNormalizer(self.actor.obs_dim)

    def record(self, raw, point, evaluate=None) -> torch.Tensor:
        before = self.nfev
        try:
            return super().record(raw, point, evaluate)
        finally:
            n = self.nfev - before
            self._used = True
            if self._local_queries < n:
                self.env_steps_complete = False
                if not self._warned:
                    self._warned = True
                    warnings.warn(
                        f"GymPolicyOracle({self.env_id!r}): queries ran in other processes; episodes and queries "
                        "are counted exactly, but env_steps (and max_env_steps) only count rollouts run in this "
                        "process" + (", and running observation statistics are not updated from them"
                                     if self.obs_norm == "running" else ""), RuntimeWarning, stacklevel=2)
            self._local_queries = max(0, self._local_queries - n)

    # ------------------------------------------------------------------ evaluation
    def _evaluate_batch(self, X: torch.Tensor) -> torch.Tensor:
        finite = torch.isfinite(X).all(dim=1)
        if not bool(finite.all()):  # non-finite parameters are failed queries (NaN), never rolled out
            out = torch.full((X.shape[0],), math.nan, dtype=torch.float64)
            self._local_queries += int((~finite).sum())  # answered here (as failures), without a rollout
            if bool(finite.any()):
                out[finite] = self._evaluate_batch(X[finite])
            return out
        params = X.detach().cpu().to(torch.float64).numpy()
        K = params.shape[0]
        self._used = True
        pair_params = np.repeat(params, self.k, axis=0)
        if self.common_seeds:
            pair_seeds = self.episode_seeds(self._batch) * K
        else:  # query i of the batch: its own k seeds
            pair_seeds = [int(s) for i in range(self._pos, self._pos + K)
                          for s in np.random.SeedSequence([self.seed, self._batch, i]).generate_state(self.k)]
            self._pos += K
        self._local_queries += K
        roll = self._rollouts(pair_params, pair_seeds, self.obs_stats if self.obs_norm else None,
                              collect=self.obs_norm == "running")
        self._env_steps += int(roll.lengths.sum())
        self._vector_steps += roll.vector_steps
        if roll.obs is not None:
            self._pending_stats.absorb(roll.obs)
        returns = roll.returns - self.reward_shift * roll.lengths  # training returns: shifted per step
        return torch.from_numpy(-returns.reshape(K, self.k).mean(axis=1))

    def evaluate_policy(self, params, episodes: int = 100, seed: int = 1_000_000) -> PolicyEvaluation:
        """Held-out evaluation: ``episodes`` episodes with env seeds ``seed, seed + 1, ...``.

        Uses the current observation statistics (without updating them); counted in
        :attr:`eval_episodes` / :attr:`eval_env_steps`, not in the training counters or budgets.
        Training seeds come from ``SeedSequence([seed, batch])`` (32-bit), so a held-out range of
        small consecutive seeds does not overlap them in practice.
        """
        episodes = _check_int("episodes", episodes)
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
        x = as_vector(params, dim=self.dim, dtype=torch.float64, name="params").numpy()
        if not np.all(np.isfinite(x)):
            raise ConfigError("params must be finite")
        seeds = [int(seed) + i for i in range(episodes)]
        roll = self._rollouts(np.repeat(x[None], episodes, axis=0), seeds,
                              self.obs_stats if self.obs_norm else None, collect=False)
        self._eval_episodes += episodes
        self._eval_env_steps += int(roll.lengths.sum())
        return PolicyEvaluation(roll.returns, roll.lengths, seeds)

    # ------------------------------------------------------------------ observation statistics
    def set_obs_stats(self, mean, std, count: int = 1_000_000) -> None:
        """Set the normalisation to ``(obs - mean) / std`` (``count``: weight of these statistics)."""
        mean = np.asarray(mean, dtype=np.float64).reshape(-1)
        std = np.asarray(std, dtype=np.float64).reshape(-1)
        if mean.shape != (self.actor.obs_dim,) or std.shape != (self.actor.obs_dim,):
            raise ConfigError(f"mean and std must have shape ({self.actor.obs_dim},), got {mean.shape} and "
                              f"{std.shape}")
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
            raise ConfigError("mean must be finite and std finite and positive")
        count = _check_int("count", count, 2)
        self.obs_stats.load_state_dict({"count": count, "mean": mean, "m2": std ** 2 * count})
        self._pending_stats = ObsNormalizer(self.actor.obs_dim)

    def collect_obs_stats(self, params=None, episodes: int = 10, seed: int | None = None) -> None:
        """Add the observations of ``episodes`` rollouts of ``params`` (default zeros) to the statistics.

        These episodes are training interactions: they count in :attr:`episodes` and
        :attr:`env_steps` and must fit in the budgets. Their env seeds come from
        ``SeedSequence([seed, 2**32 - 1])`` (``seed`` defaults to the oracle's).
        """
        episodes = _check_int("episodes", episodes)
        x = np.zeros(self.dim) if params is None else as_vector(params, dim=self.dim, dtype=torch.float64).numpy()
        if self.max_episodes is not None and self.episodes + episodes > self.max_episodes:
            raise BudgetExhaustedError(f"{episodes} episodes would exceed the episode budget of {self.max_episodes}")
        if self.max_env_steps is not None and (self._env_steps + episodes * self.max_episode_steps
                                               > self.max_env_steps):
            raise BudgetExhaustedError(f"{episodes} episodes may exceed the env-step budget of {self.max_env_steps}")
        base = self.seed if seed is None else int(seed)
        seeds = [int(s) for s in np.random.SeedSequence([base, 2 ** 32 - 1]).generate_state(episodes)]
        roll = self._rollouts(np.repeat(x[None], episodes, axis=0), seeds,
                              self.obs_stats if self.obs_norm else None, collect=True)
        self._extra_episodes += episodes
        self._env_steps += int(roll.lengths.sum())
        self._vector_steps += roll.vector_steps
        self.obs_stats.absorb(roll.obs)

    # ------------------------------------------------------------------ rollouts
    def _make_envs(self, n: int):
        gym = import_gymnasium()
        key = (self.vectorize, n)
        env = self._envs.get(key)
        if env is None:
            if self.vectorize == "sync":
                env = gym.make_vec(self.env_id, num_envs=n, vectorization_mode="sync",
                                   vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP, "copy": False},
                                   **self.env_kwargs)
            else:
                env = [gym.make(self.env_id, **self.env_kwargs) for _ in range(n)]
            self._envs[key] = env
        return env

    def _rollouts(self, params: np.ndarray, seeds: list[int], norm: ObsNormalizer | None,
                  collect: bool) -> _Rollouts:
        """Run pair ``i`` = one episode of ``params[i]`` from ``reset(seed=seeds[i])``."""
        with self._lock:
            n = min(self.num_envs, len(seeds))
            if self.vectorize == "sync":
                return self._rollouts_vector(self._make_envs(n), params, seeds, norm, collect)
            return self._rollouts_single(self._make_envs(n), params, seeds, norm, collect)

    def _rollouts_vector(self, env, params, seeds, norm, collect) -> _Rollouts:
        # The sub-environments of the sync vector env are stepped one by one, only while they have an
        # episode to run: SyncVectorEnv.step merges every sub-environment's info dict on every step, which
        # cost about 12% of a MuJoCo rollout (Swimmer-v5) for information the oracle never reads, and it
        # would step finished sub-environments through gymnasium's autoreset step. The policy still acts
        # for all active sub-environments in one call.
        return self._rollouts_single(env.envs, params, seeds, norm, collect)

    def _rollouts_single(self, envs, params, seeds, norm, collect) -> _Rollouts:
        """Queue the pairs through ``envs``: step only the environments with a pair, each on its own
        (the policy acts for all of them in one call), refilling a finished one with the next pair."""
        M, n = len(seeds), len(envs)
        r = _Rollouts(np.zeros(M), np.zeros(M, dtype=np.int64),
                      ObsNormalizer(self.actor.obs_dim) if collect else None, 0)
        slot_pair = np.arange(n)  # the pair each environment runs, -1 once the queue is empty
        slot_params = params[:n].copy()
        obs = np.stack([np.asarray(envs[s].reset(seed=int(seeds[s]))[0], dtype=np.float64) for s in range(n)])
        next_pair = n
        while True:
            idx = np.nonzero(slot_pair >= 0)[0]
            if idx.size == 0:
                return r
            o = obs[idx]
            if r.obs is not None:
                r.obs.update(o)
            actions = self.actor.act(slot_params[idx], norm.normalize(o) if norm is not None else o)
            for j, s in enumerate(idx):
                p = slot_pair[s]
                ob, rew, term, trunc, _ = envs[s].step(int(actions[j]) if self.actor.discrete else actions[j])
                r.vector_steps += 1
                r.returns[p] += float(rew)
                r.lengths[p] += 1
                obs[s] = ob
                if term or trunc:
                    if next_pair < M:
                        slot_pair[s] = next_pair
                        slot_params[s] = params[next_pair]
                        obs[s] = envs[s].reset(seed=int(seeds[next_pair]))[0]
                        next_pair += 1
                    else:
                        slot_pair[s] = -1

    def close(self) -> None:
        """Close the environments (they are rebuilt on the next query)."""
        for env in self._envs.values():
            for e in (env if isinstance(env, list) else [env]):
                e.close()
        self._envs = {}

    # ------------------------------------------------------------------ state and pickling
    def state_dict(self) -> dict:
        """Counters, the seed position and the observation statistics (committed and pending)."""
        state = super().state_dict()
        state.update({
            "env_id": self.env_id, "seed": self.seed, "episodes_per_query": self.k, "batch": self._batch,
            "batch_used": self._used, "extra_episodes": self._extra_episodes, "env_steps": self._env_steps,
            "vector_steps": self._vector_steps, "eval_episodes": self._eval_episodes,
            "eval_env_steps": self._eval_env_steps, "obs_norm": self.obs_norm, "reward_shift": self.reward_shift,
            "common_seeds": self.common_seeds, "batch_pos": self._pos,
            "obs_stats": self.obs_stats.state_dict(), "pending_obs_stats": self._pending_stats.state_dict(),
        })
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Load :meth:`state_dict`: every field is checked (types, ranges, this oracle's env, episodes per
        query, observation dim and budgets) before anything changes; a failure is a CheckpointError
        naming the field."""
        checked = self._check_gym_state(state)
        super().load_state_dict(state)
        for attr, value in checked["counters"].items():
            setattr(self, attr, value)
        self.obs_stats.load_state_dict(state["obs_stats"])
        self._pending_stats = ObsNormalizer(self.actor.obs_dim)
        self._pending_stats.load_state_dict(state["pending_obs_stats"], "pending_obs_stats")

    def _check_gym_state(self, state: Mapping) -> dict:
        """Check a :meth:`state_dict` against this oracle (see :meth:`load_state_dict`); changes nothing."""
        if not isinstance(state, Mapping):
            raise field_error("oracle", state, "a dict")
        for key in ("env_id", "seed", "episodes_per_query", "batch", "batch_used", "extra_episodes", "env_steps",
                    "vector_steps", "eval_episodes", "eval_env_steps", "obs_norm", "obs_stats", "pending_obs_stats"):
            if key not in state:
                raise CheckpointError(f"field {key} is missing; a GymPolicyOracle state has it")
        for key, mine in (("env_id", self.env_id), ("episodes_per_query", self.k), ("obs_norm", self.obs_norm)):
            value = state[key]
            if type(value) is not type(mine) or value != mine:
                raise field_error(key, value, f"this oracle's {mine!r}")
        # reward_shift and common_seeds change what the training losses mean (older states, without
        # the fields, had neither: shift 0, common seeds)
        shift = state.get("reward_shift", 0.0)
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or float(shift) != self.reward_shift:
            raise field_error("reward_shift", shift, f"this oracle's {self.reward_shift!r}")
        common = state.get("common_seeds", True)
        if not isinstance(common, bool) or common != self.common_seeds:
            raise field_error("common_seeds", common, f"this oracle's {self.common_seeds!r}")
        pos = state.get("batch_pos", 0)
        if isinstance(pos, bool) or not isinstance(pos, int) or pos < 0:
            raise field_error("batch_pos", pos, "an int >= 0")
        Oracle.check_state_dict(self, state)
        counters = {}
        for key, attr in (("seed", "seed"), ("batch", "_batch"), ("extra_episodes", "_extra_episodes"),
                          ("env_steps", "_env_steps"), ("vector_steps", "_vector_steps"),
                          ("eval_episodes", "_eval_episodes"), ("eval_env_steps", "_eval_env_steps")):
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise field_error(key, value, "an int >= 0")
            counters[attr] = value
        if not isinstance(state["batch_used"], bool):
            raise field_error("batch_used", state["batch_used"], "a bool")
        counters["_used"] = state["batch_used"]
        counters["_pos"] = pos
        episodes = self.k * state["nfev"] + counters["_extra_episodes"]
        if self.max_episodes is not None and episodes > self.max_episodes:
            raise CheckpointError(f"field nfev is {state['nfev']} with extra_episodes={counters['_extra_episodes']}: "
                                  f"{episodes} training episodes, more than max_episodes={self.max_episodes}")
        if self.max_env_steps is not None and counters["_env_steps"] > self.max_env_steps:
            raise field_error("env_steps", counters["_env_steps"], f"an int <= max_env_steps={self.max_env_steps}")
        self.obs_stats.check_state_dict(state["obs_stats"], "obs_stats")
        self._pending_stats.check_state_dict(state["pending_obs_stats"], "pending_obs_stats")
        return {"counters": counters}

    def __getstate__(self):
        """Pickled as the next batch will run: environments and lock left out, the seed position and
        statistics advanced as the next ``reserve`` will (worker copies of a process pool evaluate
        with the seeds the main process opens)."""
        state = self.__dict__.copy()
        state["_envs"] = {}
        state["_lock"] = None
        if self._used:
            stats = self.obs_stats.copy()
            if self.obs_norm == "running":
                stats.absorb(self._pending_stats)
            state["obs_stats"] = stats
            state["_pending_stats"] = ObsNormalizer(self.actor.obs_dim)
            state["_batch"] = self._batch + 1
            state["_used"] = False
            state["_pos"] = 0
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        shift = f", reward_shift={self.reward_shift!r}" if self.reward_shift else ""
        shift += "" if self.common_seeds else ", common_seeds=False"
        return (f"GymPolicyOracle({self.env_id!r}, {self.actor!r}, episodes={self.k}, obs_norm={self.obs_norm!r}{shift}, "
                f"dim={self.dim}, nfev={self.nfev}, episodes_run={self.episodes}, env_steps={self._env_steps})")

