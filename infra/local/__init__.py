"""Local services for development, tests and benchmarks.

The implementation lives in :mod:`infra.local.services`. This package does not re-export it, so
that ``python -m infra.local.services`` runs without a runpy "found in sys.modules" warning.
"""
