"""Ground floor: the typed tables every stage reads and writes, their shards, model files in the Hugging Face cache."""
