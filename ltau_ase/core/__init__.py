"""Torch-free core of LTAU: error logs, per-atom error distributions, the kNN estimator,
calibration metrics and the estimator file format. Imports numpy, scipy and faiss only."""
