"""The forgetting–adaptation front: sequential adaptation, fair across learning rates.

Settings and plan:

- :mod:`.config`: the settings (what makes two folders comparable) and a run's key;
- :mod:`.data`: domains (built-in or the user's own files) split by document into
  train / dev / test, training text that shares a 13-gram with a held-out window dropped;
- :mod:`.methods`: the compared methods, their lr grids and staging variants;
- :mod:`.selection`: the lr choice over seeds and its tie rule;
- :mod:`.plan`: which runs come next (grids, extensions, seeds).

Running (resumable):

- :mod:`.runner`: the folder and the schedule;
- :mod:`.stages`: a run's stages trained, merged, scored and recorded;
- :mod:`.scoring`, :mod:`.probing`: NLLs, yes/no, knowledge probes;
- :mod:`.alpha`: the α-front, finished runs dialled to s^α after training;
- :mod:`.records`: every record read back through one checked boundary.

Report (from the records alone):

- :mod:`.stats`: paired bootstrap over documents, seeds, interpolation, McNemar;
- :mod:`.analysis`: every number; :mod:`.curves`: the matched curves and the α-front
  against the lr-front; :mod:`.report`: tables and plots.
"""
