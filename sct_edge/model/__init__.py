"""The model: configuration and presets, the spectral linear map, Stiefel retraction, the LLaMA-family
decoder and its parameter and byte accounting."""
