"""Data readers, embedded default data sets and the loader that makes masks in its workers."""
