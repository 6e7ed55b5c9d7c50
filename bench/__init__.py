"""Benchmarks, sweeps and reports for the flows of :mod:`snf_core`."""
