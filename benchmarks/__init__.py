"""Benchmarks: the join storm (``join_storm.py``) and its helpers.

Not part of the product: nothing under ``gateway/`` imports this package.
"""

from __future__ import annotations

__all__: list[str] = []
