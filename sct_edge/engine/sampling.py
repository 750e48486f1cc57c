"""Text generation over a store: a KV cache per block, blocks paged exactly as in training.

Each new token walks the blocks in order; resident blocks cost nothing, paged ones are read (ahead, by the
reader thread) and released. No dense matrix is built: the blocks run in their spectral form.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sct_edge.engine.step import PhaseClock, StreamingStep
from sct_edge.model.transformer import KVCache, rope_tables
from sct_edge.store.store import block_shard


def _next_logits(engine: StreamingStep, tokens: Tensor, start: int, caches: list[KVCache]) -> Tensor:
    clock = PhaseClock()
    cos, sin = rope_tables(engine.config, torch.arange(start, start + tokens.shape[1]))
    embed = engine.residency.get("embed", clock)
    h = engine._embed(embed, tokens.to(engine.device))
    for i in range(engine.n_layers):
        for j in range(i + 1, min(engine.n_layers, i + 1 + engine.prefetch_depth)):
            engine.residency.prefetch(block_shard(j))
        weights = engine.residency.get(block_shard(i), clock)
        h = engine._block_cached(i, weights, h, (cos.to(h.device), sin.to(h.device)), caches[i])
        engine.residency.put(block_shard(i), weights, modified=False)
    head = engine.residency.get("head", clock)
    return engine._logits(head, embed, h[:, -1:])[0, -1].float()


@torch.no_grad()
def generate(
    engine: StreamingStep,
    prompt: list[int],
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
    stop_ids: set[int] | None = None,
    on_token=None,
) -> list[int]:
    """Sample up to `max_new_tokens` after `prompt`; temperature 0 is greedy. `on_token(id)` streams them."""
    generator = torch.Generator().manual_seed(seed)
    caches = [KVCache() for _ in range(engine.n_layers)]
    limit = engine.config.max_seq_len
    prompt = prompt[-(limit - max_new_tokens):] if len(prompt) + max_new_tokens > limit else prompt
    logits = _next_logits(engine, torch.tensor([prompt]), 0, caches)
    out: list[int] = []
    for _ in range(max_new_tokens):
        if temperature <= 0:
            token = int(logits.argmax())
        else:
            scaled = logits / temperature
            if top_k is not None and top_k < scaled.numel():
                kth = torch.topk(scaled, top_k).values[-1]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            token = int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=generator))
        out.append(token)
        if on_token is not None:
            on_token(token)
        if stop_ids and token in stop_ids:
            break
        logits = _next_logits(engine, torch.tensor([[token]]), len(prompt) + len(out) - 1, caches)
    return out
