"""Nothing lost: saves are atomic, NaN losses stop cleanly, actions repeat across processes.

Ctrl-C and callback errors during ``learn`` (resumable checkpoints) are in test_contract.py, for every algorithm.
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from dql_agent import DiffusionQL, OfflineBuffer
from tests.settings import TINY


def exploding_buffer() -> OfflineBuffer:
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(64, 2)).astype(np.float32)
    rewards = np.full(64, 3e38, np.float32)  # finite, but its square is not
    return OfflineBuffer(obs, rng.uniform(-1, 1, (64, 1)), rewards, obs, np.ones(64, bool))


@pytest.mark.bad_input("training", "clear error")
def test_nonfinite_loss_stops_before_touching_the_weights():
    model = DiffusionQL(exploding_buffer(), seed=0, device="cpu", **TINY)
    before = {k: v.clone() for k, v in model.policy.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"critic_loss is inf at gradient step 1"):
        model.learn(3)
    assert all(torch.equal(before[k], v) for k, v in model.policy.state_dict().items())
    skipping = DiffusionQL(exploding_buffer(), seed=0, device="cpu", nonfinite_loss="skip", **TINY)
    with pytest.warns(UserWarning, match="skipping the batch"):
        skipping.learn(3)
    assert skipping.num_timesteps == 3
    assert all(torch.isfinite(p).all() for p in skipping.policy.parameters())


@pytest.mark.bad_input("training", "clear error")
@pytest.mark.parametrize("nonfinite_loss", ["raise", "skip"])
def test_a_nan_actor_loss_says_the_critic_stepped_and_leaves_only_finite_weights(nonfinite_loss):
    # Zero last critic layers and zero rewards: the critic's loss and gradients are exactly 0 (a
    # finite step), and the actor's q_loss = -Q / |Q|.mean() is 0 / 0.
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(64, 2)).astype(np.float32)
    buffer = OfflineBuffer(obs, rng.uniform(-1, 1, (64, 1)), np.zeros(64), obs, np.zeros(64, bool))
    model = DiffusionQL(buffer, seed=0, device="cpu", nonfinite_loss=nonfinite_loss, **TINY)
    with torch.no_grad():
        for critic in (model.critic, model.critic_target):
            critic.q.weights[-1].zero_()
            critic.q.biases[-1].zero_()
    actor = {k: v.clone() for k, v in model.policy.actor.state_dict().items()}
    message = (
        r"actor_loss is nan at gradient step 1; "
        r"the critic's update of this step was applied \(finite\), the actor was not updated"
    )
    if nonfinite_loss == "raise":
        with pytest.raises(FloatingPointError, match=message):
            model.learn(1)
    else:
        with pytest.warns(UserWarning, match=message):
            model.learn(1)
    assert all(torch.isfinite(v).all() for v in model.policy.state_dict().values())
    assert all(torch.equal(actor[k], v) for k, v in model.policy.actor.state_dict().items())


def test_saved_files_follow_the_umask(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    expected = 0o666 & ~_umask()
    assert {(p.stat().st_mode & 0o777) for p in (tmp_path / "m").iterdir()} == {expected}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


PREDICT = textwrap.dedent("""
    import sys
    import numpy as np
    from dql_agent import DiffusionQL
    model = DiffusionQL.load(sys.argv[1], device="cpu")
    obs = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    print(model.predict(obs, deterministic=True)[0].tobytes().hex())
""")


def test_deterministic_actions_are_identical_across_processes(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "m")
    obs = np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)
    expected = tiny_model.predict(obs, deterministic=True)[0].tobytes().hex()
    runs = [
        subprocess.run(
            [sys.executable, "-c", PREDICT, str(tmp_path / "m")], capture_output=True, text=True, check=True
        ).stdout.strip()
        for _ in range(2)
    ]
    assert runs == [expected, expected]


def test_same_seed_same_evaluation_returns(pendulum_buffer):
    import gymnasium as gym
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.monitor import Monitor

    def run():
        model = DiffusionQL(pendulum_buffer, seed=4, device="cpu", **TINY).learn(10)
        env = Monitor(gym.make("Pendulum-v1"))
        env.reset(seed=123)
        return evaluate_policy(model, env, n_eval_episodes=2, return_episode_rewards=True)[0]

    assert run() == run()
