"""Rollout videos, for imports written as ``dql_agent.integrations.video``.

Recording is part of the core (a pushed model's ``replay.mp4``): :mod:`dql_agent.video`.
"""

from dql_agent.video import Predictor, record_video, render_headless

__all__ = ["Predictor", "record_video", "render_headless"]
