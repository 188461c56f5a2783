"""Tokenizer, datasets, packing, samplers, collators (nbs/1x)."""
