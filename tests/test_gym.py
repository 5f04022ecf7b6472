"""GymPolicyOracle: common random numbers, vector envs and autoreset, counters, budgets, obs-norm state."""

import pickle
import sys

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")

from zoblackbox import BudgetExhaustedError, ConfigError, MissingDependencyError, RandomEstimator, minimize
from zoblackbox.adapters.gym import GymPolicyOracle, LinearPolicy, MLPPolicy
from zoblackbox.plan import QueryPlan
from zoblackbox.schedule import SerialScheduler


def reference_episode(env_id, policy, x, seed, stats=None):
    """One episode with a plain gymnasium env and the policy, written out by hand."""
    env = gym.make(env_id)
    obs, _ = env.reset(seed=seed)
    total, steps, done = 0.0, 0, False
    while not done:
        o = np.asarray(obs, dtype=np.float64)[None]
        if stats is not None:
            o = stats.normalize(o)
        a = policy.act(x[None], o)[0]
        obs, r, term, trunc, _ = env.step(int(a) if policy.discrete else a)
        total += float(r)
        steps += 1
        done = term or trunc
    env.close()
    return total, steps


def params(oracle, n, scale=0.5, seed=0):
    return np.random.default_rng(seed).standard_normal((n, oracle.dim)) * scale


def test_policies_flatten_and_act():
    lin = LinearPolicy(obs_dim=3, act_dim=2, bias=True)
    assert lin.num_params == 8
    w = [np.arange(6.0).reshape(2, 3), np.array([0.5, -0.5])]
    x = lin.flatten(w)
    back = lin.unflatten(x)
    assert np.array_equal(back[0], w[0]) and np.array_equal(back[1], w[1])
    mlp = MLPPolicy((4,), obs_dim=3, act_dim=1)
    assert mlp.num_params == 3 * 4 + 4 + 4 * 1 + 1
    x0 = mlp.init_params(0)
    assert x0.shape == (21,) and np.array_equal(x0, mlp.init_params(0))
    env = gym.make("Pendulum-v1")
    bound = MLPPolicy((4,)).bind(env.observation_space, env.action_space)
    a = bound.act(np.tile(x0, (5, 1)) * 50, np.random.default_rng(0).standard_normal((5, 3)))
    assert a.shape == (5, 1) and np.all(np.abs(a) <= 2.0)  # tanh-scaled into [-2, 2]


def test_common_random_numbers_within_a_batch_and_new_seeds_between():
    o = GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=2, seed=3)
    X = params(o, 4)
    X = np.vstack([X, X])  # every point twice in one batch
    first = o.evaluate(X)
    assert torch.equal(first[:4], first[4:])  # same params, same batch: identical returns
    seeds0 = o.episode_seeds(0)
    second = o.evaluate(X)
    assert torch.equal(second[:4], second[4:])
    assert o.episode_seeds(1) != seeds0 and len(set(seeds0)) == 2
    assert not torch.equal(first, second)  # the next batch runs other env seeds


def test_plan_through_scheduler_and_chunks_share_one_batch():
    o = GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=1, seed=1)
    x = torch.as_tensor(params(o, 1)[0])
    est = RandomEstimator(mu=0.1, q=4, antithetic=True, seed=0)
    plan = est.plan(x)
    o.chunk_size = 3  # evaluate_plan cuts the plan into chunks: still one batch, one seed
    a = o.evaluate_plan(plan)
    b = GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=1, seed=1)
    c = SerialScheduler().run(b, plan)
    d = GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=1, seed=1).evaluate(plan.points())
    assert torch.equal(a, c) and torch.equal(a, d)
    assert o.batches == b.batches == 1


@pytest.mark.parametrize("env_id,policy", [("CartPole-v1", LinearPolicy()),
                                           ("Pendulum-v1", MLPPolicy((8,))),
                                           ("MountainCarContinuous-v0", LinearPolicy(bias=True))])
def test_vector_env_matches_single_envs_and_a_hand_written_loop(env_id, policy):
    # 3 queries x 3 episodes = 9 pairs through 4 sub-environments: refills, autoreset and idle steps
    vec = GymPolicyOracle(env_id, policy, episodes=3, seed=5, num_envs=4, obs_norm="frozen")
    single = GymPolicyOracle(env_id, policy, episodes=3, seed=5, num_envs=4, vectorize="none", obs_norm="frozen")
    for o in (vec, single):
        o.set_obs_stats(np.zeros(o.actor.obs_dim), np.full(o.actor.obs_dim, 0.5))
    X = params(vec, 3, scale=1.0, seed=2)
    lv, ls = vec.evaluate(X), single.evaluate(X)
    assert torch.equal(lv, ls)
    assert vec.env_steps == single.env_steps and vec.episodes == single.episodes == 9
    seeds = vec.episode_seeds(0)
    total_steps = 0
    for i in range(3):
        rets = []
        for s in seeds:
            ret, steps = reference_episode(env_id, vec.actor, X[i], s, vec.obs_stats)
            rets.append(ret)
            total_steps += steps
        assert float(lv[i]) == pytest.approx(-np.mean(rets), rel=1e-12, abs=1e-9)
    assert vec.env_steps == total_steps  # no autoreset or idle step counted
    assert vec.vector_steps == vec.env_steps  # only sub-environments with an episode are stepped


def test_counters_exact_and_evaluation_counted_apart():
    o = GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=2, seed=0)
    X = params(o, 3)
    o.evaluate(X)
    o(X[0])
    assert o.nfev == 4 and o.episodes == 8
    steps = o.env_steps
    ev = o.evaluate_policy(X[0], episodes=5, seed=123)
    assert ev.seeds == [123, 124, 125, 126, 127] and len(ev.returns) == 5
    assert o.eval_episodes == 5 and o.eval_env_steps == ev.env_steps
    assert o.episodes == 8 and o.env_steps == steps  # held-out episodes are not training
    ref = [reference_episode("CartPole-v1", o.actor, X[0], s)[0] for s in ev.seeds]
    assert np.allclose(ev.returns, ref)


def test_running_obs_norm_state_saved_and_restored():
    o = GymPolicyOracle("MountainCarContinuous-v0", LinearPolicy(), episodes=1, seed=2, obs_norm="running")
    X = params(o, 4)
    o.evaluate(X)
    assert o.obs_stats.count == 0  # statistics are frozen within a batch ...
    o.evaluate(X)
    assert o.obs_stats.count > 0  # ... and absorb it when the next batch opens
    state = pickle.loads(pickle.dumps(o.state_dict()))
    after = o.evaluate(X)
    fresh = GymPolicyOracle("MountainCarContinuous-v0", LinearPolicy(), episodes=1, seed=2, obs_norm="running")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.evaluate(X), after)
    assert fresh.episodes == o.episodes and fresh.env_steps == o.env_steps
    assert np.array_equal(fresh.obs_stats.mean, o.obs_stats.mean)
    frozen = GymPolicyOracle("MountainCarContinuous-v0", LinearPolicy(), episodes=1, obs_norm="frozen")
    frozen.set_obs_stats([-0.5, 0.0], [0.5, 0.05])
    frozen.evaluate(X)
    frozen.evaluate(X)
    assert np.allclose(frozen.obs_stats.mean, [-0.5, 0.0]) and np.allclose(frozen.obs_stats.std, [0.5, 0.05])


def test_pickled_copy_runs_the_next_batch_like_the_original():
    o = GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=2, seed=4, obs_norm="running")
    X = params(o, 2)
    o.evaluate(X)
    copy = pickle.loads(pickle.dumps(o))  # what a process-pool worker receives before the next batch
    assert copy._envs == {}
    # the worker copy evaluates without reserve(); it must use the seeds and statistics the
    # original opens with its next reserve()
    remote = copy.raw_evaluate(torch.as_tensor(X)).values
    assert torch.equal(remote, o.evaluate(X))


def test_episode_budget_stops_exactly():
    o = GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=2, max_episodes=10)
    X = params(o, 4)
    o.evaluate(X)  # 8 episodes
    with pytest.raises(BudgetExhaustedError, match="episode budget of 10"):
        o.evaluate(X[:2])  # 4 more would make 12
    assert o.episodes == 8 and o.nfev == 4  # nothing of the refused batch ran
    o(X[0])
    assert o.episodes == 10 and o.remaining == 0
    with pytest.raises(BudgetExhaustedError):
        o(X[0])


def test_env_step_budget_uses_the_worst_case_and_minimize_stops_cleanly():
    o = GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=1, max_env_steps=1200)
    X = params(o, 3)
    o.evaluate(X[:2])  # worst case 2 x 500 = 1000 <= 1200
    with pytest.raises(BudgetExhaustedError, match="env-step budget of 1200"):
        o.evaluate(X[:2])  # cannot promise 1000 more
    assert o.env_steps <= 1200
    m = GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=1, max_episodes=37)
    res = minimize(m, np.zeros(m.dim), estimator=RandomEstimator(mu=0.05, q=4, antithetic=True), lr=0.1,
                   budget=1000)
    assert m.episodes <= 37 and res.nfev == m.nfev and "budget" in res.message


def test_bad_inputs_name_the_value(monkeypatch):
    with pytest.raises(ConfigError, match="NoSuchEnv-v9"):
        GymPolicyOracle("NoSuchEnv-v9", LinearPolicy())
    with pytest.raises(ConfigError, match="episodes must be an int >= 1, got 0"):
        GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=0)
    with pytest.raises(ConfigError, match="obs_dim=5"):
        GymPolicyOracle("CartPole-v1", LinearPolicy(obs_dim=5))
    with pytest.raises(ConfigError, match="act_dim=3"):
        GymPolicyOracle("CartPole-v1", LinearPolicy(act_dim=3))
    with pytest.raises(ConfigError, match="obs_norm"):
        GymPolicyOracle("CartPole-v1", LinearPolicy(), obs_norm="batch")
    o = GymPolicyOracle("CartPole-v1", LinearPolicy())
    with pytest.raises(ConfigError, match="length 7, expected the oracle's dim 8"):
        o(np.zeros(7))
    with pytest.raises(ConfigError, match=r"\(K, 8\), got \(2, 9\)"):
        o.evaluate(np.zeros((2, 9)))
    with pytest.raises(ConfigError, match="length 9"):
        o.evaluate_policy(np.zeros(9))
    assert o.nfev == 0
    monkeypatch.setitem(sys.modules, "gymnasium", None)
    with pytest.raises(MissingDependencyError, match=r"pip install zoblackbox\[gym\]"):
        GymPolicyOracle("CartPole-v1", LinearPolicy())


def test_process_pool_gives_the_same_losses():
    from zoblackbox.schedule import ProcessPoolScheduler

    o = GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=2, seed=9)
    ref = GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=2, seed=9)
    est = RandomEstimator(mu=0.1, q=3, antithetic=True, seed=0)
    x = torch.as_tensor(params(o, 1)[0])
    plans: list[QueryPlan] = [est.plan(x), est.plan(x)]
    with ProcessPoolScheduler(n_workers=1) as pool:
        with pytest.warns(RuntimeWarning, match="other processes"):
            first = pool.run(o, plans[0])
        second = pool.run(o, plans[1])  # the next step: the worker copy follows the seeds
    assert torch.equal(first, ref.evaluate_plan(plans[0]))
    assert torch.equal(second, ref.evaluate_plan(plans[1]))
    assert o.episodes == ref.episodes == 24 and o.batches == 2


def test_a_short_optimization_improves_cartpole():
    o = GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=1, seed=0, obs_norm="running")
    x0 = np.full(o.dim, 0.01)
    before = o.evaluate_policy(x0, episodes=20, seed=50_000).mean
    est = RandomEstimator(mu=0.02, q=8, antithetic=True, top_b=4, fitness_shaping="std", seed=0)
    res = minimize(o, x0, estimator=est, optimizer="sgd", lr=2 * 0.02 * 0.02, budget=161)
    after = o.evaluate_policy(res.x, episodes=20, seed=50_000).mean
    assert after > before + 100, (before, after)
    assert o.episodes == 161
