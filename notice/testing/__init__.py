"""Offline fixtures: a tiny random model of every family with a processor that loads back like the real
checkpoint's, built from configs without a download (the family table names each family's builder)."""
