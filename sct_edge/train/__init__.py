"""Training runs: the trainer, its data, the event stream it writes, the edge-device policy and plain progress."""
