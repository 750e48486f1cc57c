"""The on-disk state of a model: memory-mapped safetensors shards, their manifest and the crash-safe commit
protocol."""
