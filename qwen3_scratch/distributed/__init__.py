"""Parallel plans: FSDP2, TP, PP, EP, CP (nbs/2x)."""
