"""Activation-patching engines."""
