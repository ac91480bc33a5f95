"""distillgate: governed model-distillation research.

The policy gateway, decision log, dataset builder, student training and evaluation live in sub-packages; see
docs/ and the README for the tour.
"""

__version__ = "0.1.0"
