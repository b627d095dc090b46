"""Action chunks and observation histories in a dataset, as Q-chunking trains on them.

A *chunk* starting at row i holds the actions of rows i .. i+h-1 of i's episode (episodes end at a
terminal or a timeout, and at the dataset's last row). Its learning signal is the h-step backup

    R = sum_{k < L} gamma^k r_{i+k},    y = R + gamma^L (1 - terminal) Q'(s_{i+L}, a'),

where L <= h is how many of the chunk's steps lie inside the episode. A chunk that runs past its
episode's end is *padded* with the episode's last action and *masked*: ``action_mask`` marks the
padded positions 0, the behaviour-cloning loss ignores them, the reward sum stops at the end, and
the bootstrap comes from the state after the last real step, discounted by gamma^L (no bootstrap
when that step is terminal). A chunk inside its episode has L = h: the bootstrap uses gamma^h
from the state after the chunk.

A *history* of k observations ending at row j is the observations of rows j-k+1 .. j, each row
before the episode's first replaced by the first (the first observation repeats at an episode's
start). The next state's history ends with row i+L-1's next observation.

With h = 1 and k = 1 nothing here runs: the one-step path is the papers' and stays bit for bit.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

from dql_agent.observations import take_rows


class EpisodeIndex(NamedTuple):
    """For every row, the first and the last row of its episode (long tensors on the data's device)."""

    start: torch.Tensor  # (N,)
    end: torch.Tensor  # (N,)


class Chunking(NamedTuple):
    """How a training view samples: chunks of ``horizon`` actions, histories of ``history``
    observations, the discount of the h-step backup, and the dataset's episode bounds."""

    horizon: int
    history: int
    gamma: float
    episodes: EpisodeIndex


def episode_index(terminals: torch.Tensor, timeouts: torch.Tensor) -> EpisodeIndex:
    """Episode bounds from the flags: an episode ends at a terminal or a timeout, or at the last row."""
    ends = (terminals | timeouts).cpu().numpy().copy()
    ends[-1] = True
    end_rows = np.flatnonzero(ends)
    rows = np.arange(len(ends))
    which = np.searchsorted(end_rows, rows)  # the episode of each row: its end is the next end at or after it
    end = end_rows[which]
    start = np.where(which > 0, end_rows[np.maximum(which - 1, 0)] + 1, 0)
    device = terminals.device
    return EpisodeIndex(torch.as_tensor(start, device=device), torch.as_tensor(end, device=device))


def history_rows(rows: torch.Tensor, start: torch.Tensor, history: int) -> torch.Tensor:
    """(B,) rows -> (B, k): rows j-k+1 .. j, each clamped to the episode's first row ``start``."""
    offsets = torch.arange(1 - history, 1, device=rows.device)
    return torch.maximum(rows[:, None] + offsets, start[:, None])


def with_history(observations: Any, rows: torch.Tensor) -> Any:
    """Observations (a tensor or a tree) at (B, k) rows: each leaf (B, k, *shape)."""
    return take_rows(observations, rows)


def chunk_transitions(
    source: Any, episodes: EpisodeIndex, idx: torch.Tensor, horizon: int, history: int, gamma: float
) -> dict[str, Any]:
    """The chunked transitions starting at rows ``idx`` (B,) of ``source`` (its observations,
    actions, rewards, next_observations and terminals tensors): the fields of a ``Batch``.

    Observations are (B, k, ...) histories when ``history`` > 1, else (B, ...) as one-step batches
    hold them; actions are the chunks flattened, (B, h * act_dim); ``discounts`` (B,) is gamma^L
    and ``action_mask`` (B, h * act_dim) is 1 on the chunk's real steps, 0 on the padding.
    """
    start, end = episodes.start[idx], episodes.end[idx]
    steps = idx[:, None] + torch.arange(horizon, device=idx.device)  # (B, h)
    valid = steps <= end[:, None]
    steps = torch.minimum(steps, end[:, None])  # padding repeats the episode's last step
    length = valid.sum(dim=1)  # L
    last = idx + length - 1  # the chunk's last real row
    powers = gamma ** torch.arange(horizon, device=idx.device, dtype=torch.float32)
    rewards = (source.rewards[steps] * valid * powers).sum(dim=1)
    actions = source.actions[steps]  # (B, h, A)
    mask = valid[:, :, None].expand_as(actions).reshape(len(idx), -1).float()
    terminal = source.terminals[last]
    if history == 1:
        observations = take_rows(source.observations, idx)
        next_observations = take_rows(source.next_observations, last)
    else:
        observations = with_history(source.observations, history_rows(idx, start, history))
        # the next state's history: rows last-k+2 .. last of the observations, then last's next observation
        before = with_history(source.observations, history_rows(last, start, history - 1))
        after = take_rows(source.next_observations, last)
        next_observations = _append(before, after)
    return {
        "observations": observations,
        "actions": actions.reshape(len(idx), -1),
        "rewards": rewards,
        "next_observations": next_observations,
        "not_dones": (~terminal).float(),
        "discounts": gamma ** length.float(),
        "action_mask": mask,
    }


def _append(histories: Any, latest: Any) -> Any:
    """(B, k-1, ...) histories and (B, ...) latest observations -> (B, k, ...), per leaf of a tree."""
    if isinstance(histories, dict):
        return {key: _append(histories[key], latest[key]) for key in histories}
    return torch.cat([histories, latest[:, None]], dim=1)
