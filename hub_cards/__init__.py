"""Model card templates, shipped as package data (``dql_agent.hub_cards``).

``model_card.md`` is a Jinja template rendered by ``huggingface_hub.ModelCard.from_template`` in
:mod:`dql_agent.integrations.hub`; load it with ``importlib.resources``.
"""
