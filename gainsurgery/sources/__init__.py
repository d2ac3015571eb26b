"""Where a BASE (and a gain file) comes from: a local folder, the HF cache, an embedded model, the Hub, a GGUF file.

- :mod:`~gainsurgery.sources.spec`: the BASE grammar: what an argument names, decided
  once into a typed :class:`~gainsurgery.sources.spec.BaseSpec` (it sits low, beside
  :mod:`gainsurgery.io`, so that :mod:`gainsurgery.hub.refs` shares its repo-id pattern);
- :mod:`~gainsurgery.sources.local`: a BASE that is a folder here (local, HF cache
  snapshot, embedded): what training and evaluation need, with no Hub code;
- :mod:`~gainsurgery.sources.base`: :func:`opened_base`, the one dispatch every
  command uses to open a checkpoint-folder BASE (local, embedded, Hub);
- :mod:`~gainsurgery.sources.embedded`, :mod:`~gainsurgery.sources.remote`: an embedded
  model, converted once; a Hub base read from its headers, fetched a shard at a time;
- :mod:`~gainsurgery.sources.gguf`: a GGUF BASE (a local, embedded or Hub ``.gguf`` file).

The names below are handed on from their modules on first use, so that importing
:mod:`gainsurgery.sources.spec` (which :mod:`gainsurgery.hub.refs` does) does not
import the Hub client, which imports :mod:`gainsurgery.hub.refs`.
"""

from __future__ import annotations

from gainsurgery.lazy_exports import lazy_exports

#: public name -> module that defines it (imported on first access).
_LAZY = {
    **{name: "gainsurgery.sources.base" for name in ("OpenedBase", "fetch_gain_file", "opened_base",
                                                     "resolve_gain_specs")},
    **{name: "gainsurgery.sources.local" for name in (
        "base_facts", "base_model_name", "is_embedded", "local_folder_of", "open_base", "resolve_base")},
    **{name: "gainsurgery.sources.spec" for name in (
        "EMBEDDED_PREFIX", "BaseSpec", "classify_base", "classify_base_spec", "hf_cache_repo")},
    "EMBEDDED_MODELS": "gainsurgery.sources.embedded",
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
