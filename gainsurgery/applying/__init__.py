"""Applying gain files to a checkpoint: one pipeline, plan -> stream -> verify -> provenance, three sinks.

- :mod:`~gainsurgery.applying.options`: :class:`ApplyOptions`, every option of an
  apply, declared once and checked when made;
- :mod:`~gainsurgery.applying.pipeline`: :func:`apply`, the one orchestration
  (BASE classified once, options checked against it and OUT, a sink chosen);
- :mod:`~gainsurgery.applying.steps`: the steps the sinks share (plan, judge what was
  streamed, verify, card);
- :mod:`~gainsurgery.applying.gains`: loading, stacking and fingerprint-checking gains;
- the sinks: :mod:`~gainsurgery.applying.folder_sink` (OUT, a folder),
  :mod:`~gainsurgery.applying.hub_sink` (no OUT: straight to a Hub repo, through
  :mod:`~gainsurgery.applying.hub_stream`) and :mod:`~gainsurgery.applying.gguf_sink`
  (a GGUF BASE: OUT, a GGUF file);
- :mod:`~gainsurgery.applying.result`: :class:`ApplyResult`, what every sink returns.

The pure pieces (plan, scaling kernel, streaming, verification, provenance) are
:mod:`gainsurgery.merge`. Users call :func:`gainsurgery.api.apply`. The package is
not named ``apply``: a submodule ``gainsurgery.apply`` would shadow the function
``gainsurgery.apply`` once imported.

The package re-exports nothing: callers import from the module that holds a name,
so that importing :mod:`~gainsurgery.applying.options` (which the command line does
to check its flags) does not import the streaming machinery and numpy.
"""
