"""Triton kernels for data2vec 2.0."""
