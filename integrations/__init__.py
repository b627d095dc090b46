"""Glue between dql_agent and other stacks (SB3, Minari, the Hugging Face Hub, video).

Shipped as ``dql_agent.integrations``; each module imports its third-party package lazily or at
its own top level, never from ``dql_agent``'s core modules.
"""
