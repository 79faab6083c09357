"""The embedded demo: toy BLIP and LLaVA models trained on the synthetic scenes."""
