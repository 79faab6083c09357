"""Activation patching: the hooks and site keys every engine uses, the corruptions of the image embeddings,
the reference engine (the oracle), the exact fast engines, exact query/key patching, the attribution screen,
and the experiment loop the workflow runs (`engines.get_engine` picks an engine by name)."""
