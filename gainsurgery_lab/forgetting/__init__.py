"""The forgetting–adaptation front: sequential adaptation, fair across learning rates.

- :mod:`.data`: domains (built-in or the user's own files) split by document into
  train / dev / test;
- :mod:`.methods`: the compared methods, their lr grids and staging variants;
- :mod:`.runner`: runs, stages, fronts, seeds and yes/no, resumable;
- :mod:`.stats`: paired bootstrap over documents, interpolation, McNemar;
- :mod:`.analysis`: tables, fronts and plots from the stored per-window NLLs.
"""
