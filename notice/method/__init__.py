"""The method: distractor words, sample selection, corrupted pairs, metrics, significant and universal heads, head functions, attention patterns."""
