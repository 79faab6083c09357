"""Model adapters, one per architecture family."""
