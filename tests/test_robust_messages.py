"""Messages for mistakes that gave a traceback or were silently ignored: ``--threads 0``, a Hub id
that is a path (``../../etc``) or code, rl-zoo3's ``enjoy -f`` on a folder that is not there, and a
callback that swaps ``model.policy`` during ``learn``."""

from __future__ import annotations

import subprocess
import sys

import pytest
from stable_baselines3.common.callbacks import BaseCallback

from dql_agent import DiffusionQL, train_seeds
from dql_agent.hub import check_repo_id, make_model_card, push_to_hub, write_hub_folder
from tests.adversarial import assert_one_line_error, cli
from tests.settings import TINY

ENV = "Pendulum-v1"
CLI_ERROR = ("cli", "clear error")
HUB_ERROR = ("hub", "clear error")


def bad(category_outcome: tuple[str, str], *values: object, **kwargs: object):  # one counted case
    return pytest.param(*values, marks=pytest.mark.bad_input(*category_outcome), **kwargs)


# --threads -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "command, value",
    [
        bad(CLI_ERROR, "train", "0", id="train-zero"),
        bad(CLI_ERROR, "train", "-2", id="train-negative"),
        bad(CLI_ERROR, "demo", "0", id="demo-zero"),
        bad(CLI_ERROR, "demo", "many", id="demo-text"),
    ],
)
def test_threads_below_one_is_one_line(tmp_path, command, value):
    args = ["data.npz", "-o", "out"] if command == "train" else ["-o", "out"]
    result = cli(command, *args, "--threads", value, cwd=tmp_path)
    assert_one_line_error(result, "--threads", "an int >= 1", value)
    assert not (tmp_path / "out").exists()


# Hub ids -------------------------------------------------------------------------------------------
HOSTILE_IDS = [
    bad(HUB_ERROR, "../../etc", id="path-up"),
    bad(HUB_ERROR, "me/../../etc", id="path-inside"),
    bad(HUB_ERROR, 'me/x"); import os; os.system("id', id="code-in-quotes"),
    bad(HUB_ERROR, "me/name\nimport os", id="newline"),
    bad(HUB_ERROR, "me/" + "x" * 97, id="too-long"),
    bad(HUB_ERROR, "a/b/c", id="three-parts"),
]


@pytest.mark.parametrize("repo_id", HOSTILE_IDS)
def test_a_hub_id_that_is_not_one_is_refused_before_the_folder_is_written(tiny_model, tmp_path, repo_id):
    with pytest.raises(ValueError) as caught:
        write_hub_folder(tiny_model, tmp_path / "hub", repo_id=repo_id, install="pip install dql_agent")
    assert "repo_id must be a Hub repo id" in str(caught.value) and repr(repo_id) in str(caught.value)
    assert not (tmp_path / "hub").exists()


@pytest.mark.bad_input(*HUB_ERROR)
def test_push_refuses_a_bad_id_before_any_request(tiny_model):
    # HF_HUB_OFFLINE is set for the tests: a push that got as far as the network would say so instead.
    with pytest.raises(ValueError, match=r"repo_id must be a Hub repo id .*got '\.\./\.\./etc'"):
        push_to_hub(tiny_model, "../../etc", install="pip install dql_agent")


@pytest.mark.bad_input(*HUB_ERROR)
def test_the_card_refuses_an_id_it_would_write_into_its_code(tiny_model):
    with pytest.raises(ValueError, match="repo_id must be a Hub repo id"):
        make_model_card(tiny_model, repo_id='me/x")\nimport os\n("', install="pip install dql_agent")
    with pytest.raises(TypeError, match=r"repo_id must be a Hub repo id 'owner/name', got 5 \(int\)"):
        check_repo_id(5)


@pytest.mark.bad_input("hub", "correct behaviour")
def test_a_good_id_is_written_into_the_card_as_given(tiny_model, tmp_path):
    folder = write_hub_folder(tiny_model, tmp_path / "hub", repo_id="me/dql-pendulum.v1", install="pip install x")
    assert 'load_from_hub("me/dql-pendulum.v1")' in (folder / "README.md").read_text()
    assert check_repo_id("dql-pendulum") == "dql-pendulum"  # the owner may be left to the Hub


@pytest.mark.bad_input(*CLI_ERROR)
def test_cli_push_local_dir_with_a_path_as_id_is_one_line(tiny_model, tmp_path):
    tiny_model.save(tmp_path / "model")
    result = cli("push", "model", "../../etc", "--local-dir", "out", "--episodes", "0", cwd=tmp_path)
    assert_one_line_error(result, "repo_id", "'../../etc'")
    assert not (tmp_path / "out").exists()


# rl-zoo3 -------------------------------------------------------------------------------------------
def zoo_main(*args: str):
    from dql_agent.integrations import zoo

    return zoo.main(["enjoy", "--algo", "dql", "--env", ENV, "--no-render", "-n", "10", *args])


@pytest.mark.bad_input(*CLI_ERROR)
def test_zoo_enjoy_on_a_missing_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        zoo_main("-f", str(tmp_path / "nowhere"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: -f/--folder") and "nowhere: no such folder" in err[0] and "save_to_zoo" in err[0]


@pytest.mark.bad_input(*CLI_ERROR)
def test_zoo_enjoy_on_a_folder_without_the_algorithm_is_one_line(tmp_path, capsys):
    (tmp_path / "logs" / "sac").mkdir(parents=True)
    with pytest.raises(SystemExit) as exit_:
        zoo_main("-f", str(tmp_path / "logs"))
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "holds no dql/ folder of runs" in err[0], err


@pytest.mark.parametrize(
    "extra, fragment",
    [
        bad(CLI_ERROR, ["--exp-id", "5"], "Pendulum-v1_5 folder was not found", id="missing-exp-id"),
        bad(CLI_ERROR, [], "No model found for dql on Pendulum-v1", id="run-folder-without-zip"),
    ],
)
def test_zoo_enjoy_errors_rl_zoo3_asserts_are_one_line(tmp_path, extra, fragment):
    """rl-zoo3's own checks (an assert, a ValueError), in a fresh process: importing rl_zoo3
    patches gymnasium for the whole process."""
    pytest.importorskip("rl_zoo3")
    (tmp_path / "logs" / "dql" / "Pendulum-v1_1").mkdir(parents=True)
    command = [sys.executable, "-m", "dql_agent.integrations.zoo", "enjoy", "--algo", "dql", "--env", ENV]
    command += ["-f", "logs", "--no-render", "-n", "10", *extra]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    err = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert len(err) == 1 and err[0].startswith("error: rl-zoo3 enjoy: ") and fragment in err[0], err


# a callback that swaps the policy ------------------------------------------------------------------
class SwapPolicy(BaseCallback):
    """Replace ``model.policy`` with ``other`` at timestep ``at`` (0: when training starts)."""

    def __init__(self, other: object, at: int) -> None:
        super().__init__()
        self.other, self.at = other, at

    def _on_training_start(self) -> None:
        if self.at == 0:
            self.model.policy = self.other

    def _on_step(self) -> bool:
        if self.num_timesteps == self.at:
            self.model.policy = self.other
        return True


@pytest.mark.parametrize(
    "at",
    [bad(("training", "clear error"), 3, id="during-a-step"), bad(("training", "clear error"), 0, id="at-start")],
)
def test_a_callback_that_swaps_the_policy_stops_learn_and_the_policy_is_given_back(pendulum_buffer, at):
    model = DiffusionQL(pendulum_buffer, seed=0, device="cpu", **TINY)
    original, other = model.policy, DiffusionQL(pendulum_buffer, seed=1, device="cpu", **TINY).policy
    with pytest.raises(RuntimeError, match=rf"callback \(SwapPolicy\) replaced model\.policy .* timestep {max(at, 1)}"):
        model.learn(6, callback=SwapPolicy(other, at))
    assert model.policy is original  # what a save after the error writes is the trained one
    assert model.num_timesteps == max(at, 1)
    model.learn(2, reset_num_timesteps=False)  # and training goes on with it
    assert model.num_timesteps == max(at, 1) + 2


@pytest.mark.bad_input("training", "clear error")
def test_a_swap_in_a_stack_of_seeds_names_the_replica(pendulum_buffer):
    other = DiffusionQL(pendulum_buffer, seed=5, device="cpu", **TINY).policy
    with pytest.raises(RuntimeError, match=r"replaced agents\[1\]\.policy"):
        train_seeds(pendulum_buffer, [0, 1], 4, device="cpu", callback=[None, SwapPolicy(other, 2)], **TINY)
