"""The embedded demo: toy models of the two fusion kinds (cross-attention, image tokens in a decoder)
trained on the synthetic scenes; the families' own parts are `notice/adapters/*_toy.py`."""
