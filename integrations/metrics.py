"""The metrics hook, for imports written as ``dql_agent.integrations.metrics``.

``MetricsCallback`` is used by the core (``train_seeds(eval_env=...)``) and lives in
:mod:`dql_agent.metrics`.
"""

from dql_agent.metrics import MetricsCallback

__all__ = ["MetricsCallback"]
