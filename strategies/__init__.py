"""Parallel strategies: one small file each, behind the `Strategy` protocol in strategies/base.py.

strategies/ depends on nothing in launcher/: a strategy gets a `StrategyConfig` (strategies/config.py)
and a `RankContext`. What runs with what is one table, strategies/catalog.py; the registry of
implementations is strategies/registry.py. Importing this package imports neither torch nor DeepSpeed.
"""
