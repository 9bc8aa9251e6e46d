"""Integrations with other libraries, imported explicitly (``torch_seqreptile`` imports none).

* :mod:`torch_seqreptile.integrations.transformers` — ``transformers.Trainer`` with Sequential
  Reptile (``SeqReptileTrainer``: single-task batches, slow-weight evaluation/saving), the MTL
  baselines (``SurgeryTrainer``: one loss per task, ``optimizer.backward(losses)``) and probe
  logging (``ProbeCallback``).
"""
