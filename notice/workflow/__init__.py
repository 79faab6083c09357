"""The workflow's machinery: runtime helpers for scripts, GPU leases, shards, the Hugging Face hub, typed tables."""
