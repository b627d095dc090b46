"""The Hub round trip, for imports written as ``dql_agent.integrations.hub``.

Pushing to and loading from the Hub is part of every model's own surface
(``model.push_to_hub``, ``DiffusionQL.load_from_hub``), so it lives in the core,
:mod:`dql_agent.hub`; evaluation is :mod:`dql_agent.evaluation`. Their public names are re-exported here.
"""

from dql_agent.evaluation import evaluate
from dql_agent.hub import (
    README_FILE,
    RESULTS_FILE,
    VIDEO_FILE,
    HubNotFoundError,
    HubUnreachableError,
    load_from_hub,
    make_model_card,
    push_to_hub,
    write_hub_folder,
)

__all__ = [
    "README_FILE",
    "RESULTS_FILE",
    "VIDEO_FILE",
    "HubNotFoundError",
    "HubUnreachableError",
    "evaluate",
    "load_from_hub",
    "make_model_card",
    "push_to_hub",
    "write_hub_folder",
]
