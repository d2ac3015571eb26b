"""gainsurgery_lab: the experiments, outside the core package.

- :mod:`~gainsurgery_lab.forgetting`: the sequential-adaptation (forgetting)
  experiment, GAIN vs LoRA vs IA3 (results in docs/results/forgetting.md);
- :mod:`~gainsurgery_lab.probes`: knowledge probes (multiple-choice facts from registry
  packages) for the experiment's models;
- :mod:`~gainsurgery_lab.yesno`: CoQA yes/no items from BIG-bench (the earlier probe).

The domain text comes from the core, :mod:`gainsurgery.corpora` (``gainsurgery demo``
uses it too). The lab imports the core; the core never imports the lab.
Install with ``pip install "gainsurgery[experiments]"``.
"""
