"""Cross-validated object-detection ensembles for Kaggle."""
