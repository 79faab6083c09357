"""The `make bench` layout of each family: its real checkpoint's architecture (scaled for a CPU, or at real size),
random weights, one SIP sample; the family table names each family's module."""
