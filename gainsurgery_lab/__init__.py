"""gainsurgery_lab: the experiments and the corpus fetching, outside the core package.

- :mod:`~gainsurgery_lab.corpora`: real text for eight adaptation domains (and
  CoQA yes/no questions), fetched from package registries and cached;
- :mod:`~gainsurgery_lab.forgetting`: the sequential-adaptation (forgetting)
  experiment, GAIN vs LoRA vs IA3 (results in docs/results/forgetting.md).

The lab imports the core (:mod:`gainsurgery`); the core never imports the lab,
except the demo (an application, like the CLI), which fetches its domain text
with :mod:`~gainsurgery_lab.corpora`. Install with ``pip install "gainsurgery[experiments]"``.
"""
