"""Our own LLaVA-compatible model / train / eval / serve tree, built on transformers' native LLaVA classes."""
