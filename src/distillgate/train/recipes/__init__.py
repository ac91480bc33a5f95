"""Training recipes, one readable file each: ``sft`` and ``kd``."""
