"""Text generation: sampling on top of the engine's cached forward.

`Engine.forward` runs the prompt once into a KV cache, then one token at a time; blocks are paged exactly as
in training (resident ones cost nothing, paged ones are read ahead and released) and run in their spectral
form, so no dense matrix is built. This module only chooses tokens from the logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from sct_edge.engine.step import Engine


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """The next token from one position's logits (vocab,): greedy at temperature 0, else softmax sampling
    among the `top_k` most likely (all with None)."""
    if temperature <= 0:
        return int(logits.argmax())
    scaled = logits / temperature
    if top_k is not None and top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    return int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator))


@torch.no_grad()
def generate(
    engine: Engine,
    prompt: list[int],
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
    stop_ids: set[int] | None = None,
    on_token: Callable[[int], None] | None = None,
) -> list[int]:
    """Sample up to `max_new_tokens` after `prompt`; temperature 0 is greedy. `on_token(id)` streams them."""
    generator = torch.Generator().manual_seed(seed)
    cache = engine.new_cache()
    limit = engine.config.max_seq_len
    prompt = prompt[-(limit - max_new_tokens):] if len(prompt) + max_new_tokens > limit else prompt
    logits = engine.forward(torch.tensor([prompt]), cache, last_only=True)[0, -1]
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, generator)
        out.append(token)
        if on_token is not None:
            on_token(token)
        if stop_ids and token in stop_ids:
            break
        logits = engine.forward(torch.tensor([[token]]), cache, last_only=True)[0, -1]
    return out
