"""Datasets: find a local copy, else download from the canonical source, cache and verify."""

from lipschitz.data.files import DatasetUnavailable, fetch, resolve_data_dir

__all__ = ["DatasetUnavailable", "fetch", "resolve_data_dir"]
