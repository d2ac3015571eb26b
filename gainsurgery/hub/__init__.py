"""The Hugging Face Hub: repo references, one explicit client, errors, publishing, model cards.

- :mod:`~gainsurgery.hub.refs`: ``ORG/NAME[@REV]`` and ``ORG/NAME[@REV]:path`` references;
- :mod:`~gainsurgery.hub.client`: :class:`~gainsurgery.hub.client.HubClient`, an
  explicit ``HfApi(endpoint=..., token=...)`` built once from a
  :class:`~gainsurgery.hub.client.HubConfig` resolved at the edge (CLI or API call);
  every Hub request goes through it;
- :mod:`~gainsurgery.hub.errors`: Hub failures -> one-line :class:`~gainsurgery.errors.HubError`;
- :mod:`~gainsurgery.hub.integrity`: every byte taken from the Hub checked against the hash it lists;
- :mod:`~gainsurgery.hub.publish`: completeness checks and one-commit uploads;
- :mod:`~gainsurgery.hub.cards`: model cards for merged folders and gain files.

Reading a Hub *base* (headers by range request, shards on demand) is a base source:
see :mod:`gainsurgery.sources.remote`.
"""
