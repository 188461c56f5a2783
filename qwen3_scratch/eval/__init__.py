"""Generation and evaluation (nbs/6x)."""
