"""Plain PyTorch / Lightning / transformers code (no Dagster imports): the model zoo, objectives,
training and evaluation, usable from a notebook.  Filled in by the model stages."""
