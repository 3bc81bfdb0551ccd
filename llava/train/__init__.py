"""Training entry points (LPM training: ``python -m llava.train.train_lpm``)."""
