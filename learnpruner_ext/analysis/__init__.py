"""Analyses of pruning decisions (issue 21): computations only; the command lines live in ``llava.eval``."""
