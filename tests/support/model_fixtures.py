"""Tiny models built in code (random weights + a tokenizer trained in a second)."""
