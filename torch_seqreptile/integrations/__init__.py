"""Integrations with other libraries, imported explicitly (``torch_seqreptile`` imports none).

* :mod:`torch_seqreptile.integrations.transformers` — ``transformers.Trainer`` with Sequential
  Reptile, single-task batches, slow-weight evaluation/saving and probe logging.
"""
