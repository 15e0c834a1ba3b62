"""The few-labels methods (issue 18): detectors that learn from the good training images
and a few labelled defects of the test images (the few-labels protocol,
:mod:`stages.few_labels`, decides which; the evaluate stage scores the held-out part only).

- :class:`SupervisedCNNFamily` (``SupervisedCNN``): a backbone with the document's
  two-layer head, trained with weighted cross-entropy, AdamW and a one-cycle schedule,
  early stopping;
- :class:`SimCLRProbeFamily` (``SimCLRProbe``): SimCLR pretraining on the good images
  (lightly's NT-Xent loss, projection head and view transform), then a logistic-regression
  probe on the labelled images' embeddings.

What they share (the backbone encoder, its hyperparameters and checks, the resumable,
seeded epoch loop with early stopping) is in :mod:`.base` and :mod:`.training`.
"""

from stages.methods.labelled.base import LabelledFamily, LabelledHyper
from stages.methods.labelled.simclr_probe import SimCLRProbeFamily
from stages.methods.labelled.supervised_cnn import SupervisedCNNFamily

__all__ = ["LabelledFamily", "LabelledHyper", "SimCLRProbeFamily", "SupervisedCNNFamily"]
