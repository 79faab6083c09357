"""Circuits: edge attribution (EAP, EAP-IG) over token groups and exact faithfulness (docs/method.md, §12)."""
