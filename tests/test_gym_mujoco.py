"""MuJoCo locomotion through GymPolicyOracle: reward_shift, ARS's observation statistics, bad input."""

import builtins
import math

import numpy as np
import pytest
import torch

gym = pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from zoblackbox import ConfigError, MissingDependencyError, minimize
from zoblackbox.adapters.gym import GymPolicyOracle, LinearPolicy, ObsNormalizer
from zoblackbox.errors import CheckpointError
from zoblackbox.presets import ars_v2t

STEPS = 40  # a short time limit keeps every episode cheap


def hopper(**kw):
    kw.setdefault("max_episode_steps", STEPS)
    return GymPolicyOracle("Hopper-v5", LinearPolicy(), episodes=1, seed=3, **kw)


def plain_episode(env_id, W, seed, stats=None, limit=STEPS):
    """A hand-written gymnasium loop: returns (true return, length, observations acted on)."""
    env = gym.make(env_id, max_episode_steps=limit)
    obs, _ = env.reset(seed=seed)
    total, seen, done = 0.0, [], False
    while not done:
        o = np.asarray(obs, dtype=np.float64)
        seen.append(o)
        z = stats.normalize(o[None])[0] if stats is not None else o
        a = np.clip(W @ z, env.action_space.low, env.action_space.high).astype(env.action_space.dtype)
        obs, r, term, trunc, _ = env.step(a)
        total += float(r)
        done = term or trunc
    env.close()
    return total, len(seen), np.array(seen)


def test_reward_shift_changes_training_losses_not_held_out_returns():
    plain, shifted = hopper(), hopper(reward_shift=1.0)
    X = np.random.default_rng(0).normal(0, 0.2, (4, plain.dim))
    seed = plain.episode_seeds()[0]
    assert shifted.episode_seeds()[0] == seed
    lp, ls = plain.evaluate(X).numpy(), shifted.evaluate(X).numpy()
    for i in range(4):
        ret, length, _ = plain_episode("Hopper-v5", X[i].reshape(3, 11), seed)
        assert lp[i] == pytest.approx(-ret, rel=1e-12)
        assert ls[i] == pytest.approx(-(ret - 1.0 * length), rel=1e-12)  # the shift is per counted step
    assert shifted.env_steps == plain.env_steps
    ev_p, ev_s = plain.evaluate_policy(X[0], episodes=3, seed=7), shifted.evaluate_policy(X[0], episodes=3, seed=7)
    np.testing.assert_array_equal(ev_p.returns, ev_s.returns)  # the environment's true return
    assert ev_s.returns[0] == pytest.approx(plain_episode("Hopper-v5", X[0].reshape(3, 11), 7)[0], rel=1e-12)


def test_ars_observation_statistics_match_a_hand_written_ars_loop():
    """obs_norm='running' as ARS V2: statistics of every observation the training rollouts acted on,
    frozen within an iteration, absorbing it when the next one opens; held-out runs never add to them."""
    oracle = GymPolicyOracle("Swimmer-v5", LinearPolicy(), episodes=1, seed=5, obs_norm="running",
                             max_episode_steps=STEPS, reward_shift=0.5)
    rng = np.random.default_rng(1)
    ref = ObsNormalizer(oracle.actor.obs_dim)
    for it in range(3):
        X = rng.normal(0, 0.3, (4, oracle.dim))  # one ARS iteration: 2N = 4 rollouts
        seed = oracle.episode_seeds()[0]
        frozen = ref.copy()
        losses = oracle.evaluate(X).numpy()
        if it < 2:
            oracle.evaluate_policy(X[0], episodes=2, seed=99)  # a held-out check between iterations
        seen = []
        for i in range(4):
            ret, length, obs = plain_episode("Swimmer-v5", X[i].reshape(2, 8), seed,
                                             frozen if frozen.count else None)
            assert losses[i] == pytest.approx(-(ret - 0.5 * length), rel=1e-10, abs=1e-10)
            seen.append(obs)
        ref.update(np.concatenate(seen))
        # within the iteration the statistics are those of the previous iterations
        np.testing.assert_allclose(oracle.obs_stats.mean, frozen.mean, rtol=1e-12, atol=1e-12)
        assert oracle.obs_stats.count == frozen.count
    oracle.reserve(1)  # the next iteration opens: the third one's observations are absorbed
    assert oracle.obs_stats.count == ref.count == 3 * 4 * STEPS
    np.testing.assert_allclose(oracle.obs_stats.mean, ref.mean, rtol=1e-10)
    np.testing.assert_allclose(oracle.obs_stats.std, ref.std, rtol=1e-10)


def test_ars_preset_improves_swimmer_and_reports_true_returns():
    oracle = GymPolicyOracle("Swimmer-v5", LinearPolicy(), episodes=1, seed=0, obs_norm="running",
                             max_episode_steps=100, max_episodes=120)
    before = oracle.evaluate_policy(np.zeros(oracle.dim), episodes=4, seed=10).mean
    res = minimize(oracle, np.zeros(oracle.dim), budget=120, **ars_v2t(1, 1, 0.02, 0.01, seed=0))
    assert oracle.episodes == res.nfev <= 120  # f(x0) once, then 2 episodes per iteration
    after = oracle.evaluate_policy(res.x, episodes=4, seed=10).mean
    assert after > before + 1.0, (before, after)


def test_reward_shift_bad_values_are_refused_before_any_episode():
    for bad in (math.nan, math.inf, -math.inf, "1", None, True, [1.0]):
        with pytest.raises(ConfigError, match="reward_shift must be a finite number"):
            hopper(reward_shift=bad)
    assert hopper(reward_shift=np.float32(1.0)).reward_shift == 1.0


def test_reward_shift_is_part_of_the_saved_state():
    a = hopper(reward_shift=1.0)
    a.evaluate(np.zeros((2, a.dim)))
    state = a.state_dict()
    assert state["reward_shift"] == 1.0
    b = hopper(reward_shift=1.0)
    b.load_state_dict(state)
    assert b.nfev == 2
    with pytest.raises(CheckpointError, match="reward_shift"):
        hopper().load_state_dict(state)
    old = dict(state)
    del old["reward_shift"]  # a state written before the field existed had no shift
    hopper().load_state_dict(old)
    with pytest.raises(CheckpointError, match="reward_shift"):
        hopper(reward_shift=1.0).load_state_dict(old)
    assert "reward_shift=1.0" in repr(a)


def test_mujoco_task_without_mujoco_names_the_extra(monkeypatch):
    real_import = builtins.__import__

    def no_mujoco(name, *args, **kwargs):
        if name == "mujoco" or name.startswith("mujoco."):
            raise ImportError("No module named 'mujoco'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mujoco)
    with pytest.raises(MissingDependencyError, match=r"Hopper-v5 is a MuJoCo task.*pip install zoblackbox\[gym\]"):
        GymPolicyOracle("Hopper-v5", LinearPolicy())
    GymPolicyOracle("CartPole-v1", LinearPolicy())  # other tasks do not need it


class _ImageEnv(gym.Env):
    def __init__(self, shape=(4, 4)):
        self.observation_space = gym.spaces.Box(-1.0, 1.0, shape, dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)
        self.resets = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.resets += 1
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, True, {}


class _DictEnv(_ImageEnv):
    def __init__(self):
        super().__init__()
        self.observation_space = gym.spaces.Dict({"a": gym.spaces.Box(-1.0, 1.0, (3,))})


def test_observation_space_that_is_not_a_flat_box_is_refused(monkeypatch):
    gym.register("ZoTestImage-v0", entry_point=_ImageEnv, max_episode_steps=5)
    gym.register("ZoTestDict-v0", entry_point=_DictEnv, max_episode_steps=5)
    try:
        with pytest.raises(ConfigError, match=r"1-D Box observation space; ZoTestImage-v0 has Box\(-1.0, 1.0, \(4, 4\)"):
            GymPolicyOracle("ZoTestImage-v0", LinearPolicy())
        with pytest.raises(ConfigError, match="1-D Box observation space; ZoTestDict-v0 has Dict"):
            GymPolicyOracle("ZoTestDict-v0", LinearPolicy())
    finally:
        gym.registry.pop("ZoTestImage-v0", None)
        gym.registry.pop("ZoTestDict-v0", None)


def test_locomotion_tasks_bind_and_roll_out():
    for env_id, dims in (("Swimmer-v5", (2, 8)), ("HalfCheetah-v5", (6, 17)), ("Walker2d-v5", (6, 17)),
                         ("Ant-v5", (8, 105))):
        o = GymPolicyOracle(env_id, LinearPolicy(), max_episode_steps=5, reward_shift=1.0)
        assert (o.actor.act_dim, o.actor.obs_dim) == dims
        loss = o.evaluate(torch.zeros(2, o.dim, dtype=torch.float64))
        assert torch.isfinite(loss).all() and o.env_steps <= 10
        o.close()


def test_common_seeds_false_gives_every_query_its_own_start_state():
    crn = GymPolicyOracle("Swimmer-v5", LinearPolicy(), episodes=1, seed=2, max_episode_steps=STEPS)
    own = GymPolicyOracle("Swimmer-v5", LinearPolicy(), episodes=1, seed=2, max_episode_steps=STEPS,
                          common_seeds=False)
    X = np.repeat(np.random.default_rng(0).normal(0, 0.3, (1, crn.dim)), 3, axis=0)  # one point three times
    same, differ = crn.evaluate(X).numpy(), own.evaluate(X).numpy()
    assert np.all(same == same[0]) and len(set(differ.tolist())) == 3
    for i in range(3):  # query i of batch 0 runs SeedSequence([seed, 0, i])
        s = int(np.random.SeedSequence([2, 0, i]).generate_state(1)[0])
        assert differ[i] == pytest.approx(-plain_episode("Swimmer-v5", X[i].reshape(2, 8), s)[0], rel=1e-12)
    # each evaluate is a batch: positions restart at 0 with the next batch's seeds
    b = own.evaluate(X[:2]).numpy()
    s = int(np.random.SeedSequence([2, 1, 1]).generate_state(1)[0])
    assert b[1] == pytest.approx(-plain_episode("Swimmer-v5", X[1].reshape(2, 8), s)[0], rel=1e-12)
    assert b[0] != differ[0]
    state = own.state_dict()
    assert state["common_seeds"] is False and state["batch_pos"] == 2
    with pytest.raises(CheckpointError, match="common_seeds"):
        crn.load_state_dict(state)
    with pytest.raises(ConfigError, match="common_seeds must be a bool"):
        GymPolicyOracle("Swimmer-v5", LinearPolicy(), common_seeds="no")
    assert "common_seeds=False" in repr(own)
