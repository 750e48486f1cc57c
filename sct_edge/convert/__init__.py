"""Model conversion: readers of GGUF and Hugging Face checkpoints, the importer into a spectral store, the
exporter, and tokenizers."""
