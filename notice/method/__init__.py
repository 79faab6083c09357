"""The method around patching: distractor words, sample selection, corrupted pairs, metrics,
significant and universal heads, attention patterns and head functions."""
