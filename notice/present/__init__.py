"""Presentation: figures and the offline HTML report."""
