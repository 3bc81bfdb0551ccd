"""Deterministic synthetic VQA benchmark (toy world) for LearnPruner experiments.

API lives in :mod:`learnpruner_ext.toy.generate` (``generate``, ``sample_scene``,
``draw_scene``, ``make_question``); it is not re-exported here so that
``python -m learnpruner_ext.toy.generate`` runs cleanly.
"""
