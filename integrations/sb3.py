"""Stable-Baselines3 glue, for users of SB3 and rl-zoo3.

The core speaks SB3's protocol itself (:mod:`dql_agent.sb3`: callbacks, logger, env wrapping) and
reads SB3 replay buffers (:mod:`dql_agent.readers.sb3`, ``OfflineBuffer.from_sb3``); their public
functions are re-exported here.
"""

from dql_agent.readers.sb3 import replay_buffer_to_transitions
from dql_agent.sb3 import TimestepProgressBar, make_callback, wrap_env

__all__ = ["TimestepProgressBar", "make_callback", "replay_buffer_to_transitions", "wrap_env"]
