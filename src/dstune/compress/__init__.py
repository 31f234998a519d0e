"""Smaller models from the tuned one: structured pruning (dstune prune)."""
