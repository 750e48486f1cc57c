"""sct-edge: train LLaMA-family models on edge devices with Spectral Compact Training.

Every weight matrix is kept as W = U diag(s) Vᵀ, its factors and AdamW state live as shards of a
memory-mapped safetensors store, and a scheduler pages blocks through RAM under a device budget.
"""

__version__ = "0.1.0"
