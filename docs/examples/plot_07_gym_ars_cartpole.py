"""
A CartPole policy with Augmented Random Search
==============================================

``zoblackbox.adapters.gym.GymPolicyOracle`` turns a gymnasium environment and a policy with
a flat parameter vector into an oracle, ``loss(x) = -mean return``; any estimator and driver then
works on it. Here ARS V2-t (Mania, Guy & Recht 2018; the :func:`zoblackbox.ars_v2t` preset: 8
antithetic directions, the best 4 pairs kept, steps divided by the returns' standard deviation,
running observation normalization) trains a linear CartPole policy. The ask/tell loop records the
training returns; every few steps the current policy is scored on held-out episodes (not counted
as training episodes).
"""

import matplotlib.pyplot as plt
import numpy as np

from zoblackbox import AskTell, ars_v2t
from zoblackbox.adapters.gym import GymPolicyOracle, LinearPolicy

oracle = GymPolicyOracle("CartPole-v1", LinearPolicy(), episodes=1, seed=0, obs_norm="running")
engine = AskTell(np.zeros(oracle.dim), budget=400, **ars_v2t(n_directions=8, top_b=4, step_size=0.02, noise=0.03))
print(f"linear policy: {oracle.dim} parameters")

train_episodes, train_returns, eval_at, eval_returns = [], [], [], []
while not engine.done:
    X = engine.ask()
    losses = oracle.evaluate(X).numpy()  # one episode per row
    engine.tell(losses)
    train_episodes.append(oracle.episodes)
    train_returns.append(-losses.mean())
    if engine.nit % 5 == 0 or engine.done:
        held_out = oracle.evaluate_policy(engine.x, episodes=10, seed=10_000_000)
        eval_at.append(oracle.episodes)
        eval_returns.append(held_out.mean)

print(f"{oracle.episodes} training episodes, {oracle.env_steps:,} environment steps")
print(f"held-out return of the final policy: {eval_returns[-1]:.0f} (500 is the maximum)")

# %%
# Return against training episodes: the mean over each step's 16 episodes, and the held-out score.
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(train_episodes, train_returns, alpha=0.6, label="training episodes (mean per step)")
ax.plot(eval_at, eval_returns, "o-", label="held-out episodes (10 per point)")
ax.set_xlabel("training episodes")
ax.set_ylabel("return")
ax.set_title("ARS V2-t, linear policy, CartPole-v1")
ax.legend(loc="lower right")
fig.tight_layout()
plt.show()
