"""Deterministic synthetic VQA benchmark (toy world) for LearnPruner experiments.

API lives in :mod:`toyworld.generate` (``generate``, ``sample_scene``,
``draw_scene``, ``make_question``); it is not re-exported here so that
``python -m toyworld.generate`` runs cleanly.
"""
