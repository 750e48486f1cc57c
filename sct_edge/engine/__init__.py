"""The step engine: the memory plan a device profile allows, the pager that moves blocks through RAM, the
streamed training step, evaluation and the cached forward for generation, and the process settings they need."""
