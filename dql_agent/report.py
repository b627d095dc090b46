"""The library's voice: what a user asked to see, or should see before a long step, goes through the
``dql_agent`` logger, and to stdout when the program set up no logging.

Nothing else in the library prints. A program that configures logging (``logging.basicConfig``,
the CLI) decides where the lines go; one that does not still sees them, once each.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("dql_agent")


def report(text: str) -> None:
    """``text`` at INFO on the ``dql_agent`` logger; on stdout when no handler is set up anywhere."""
    handler = None
    if not logger.hasHandlers():
        handler = logging.StreamHandler(sys.stdout)
        logger.addHandler(handler)
    level = logger.level
    if not logger.isEnabledFor(logging.INFO):
        logger.setLevel(logging.INFO)
    try:
        logger.info(text)
    finally:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)
