"""Whole-model distillation after a calibrated conversion: train every block's spectral factors together so that
the converted model's next-token distributions match the dense model's on the calibration text.

Block-wise recovery (`sct_edge.convert.recovery`) fits each block to the dense block's outputs on its own; what
it cannot undo is the error the blocks above it carry down the residual stream. Distillation trains all blocks
on the loss that matters at the end: the mean KL divergence from the dense model's next-token distribution to
the converted model's, over the calibration sequences. The teacher is kept as its final hidden states only,
which the conversion's dense stream ends with (`convert_blocks` returns them): no second pass over the dense
model, and nothing vocabulary-wide kept per token, since the teacher's logits are recomputed a chunk at a time
through the same final norm and head (`sct_edge.model.loss.distill_loss_backward`).

The steps are the training engine's own (`sct_edge.engine.step.Engine`) on the store the import has just
written, so blocks are paged under the import's memory budget exactly as `sct-edge run` pages them: AdamW on
U, s and V with a linear warm-up and a cosine decay to 0, then the Stiefel retraction. Norm gains, embedding
and head keep their imported values (their learning rate is 0), because the teacher's logits go through them
too. Afterwards the AdamW moments are zeroed, so a fine-tune of the store starts from fresh optimizer state as
after any import.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from sct_edge.engine.adamw import OptimConfig
from sct_edge.engine.plan import MemoryPlan, make_plan
from sct_edge.engine.profile import Profile, resolve_device
from sct_edge.engine.step import Engine
from sct_edge.model.config import ModelConfig
from sct_edge.store.shard_names import optim_shard
from sct_edge.store.store import Store
from sct_edge.train.schedule_defaults import lr_scale


@dataclass
class DistillConfig:
    steps: int = 100
    # AdamW's on U, s and V, as fine-tuning's (`schedule_defaults.FINE_TUNING`): on SmolLM2 at ratio 1.0, 32,768
    # calibration tokens, 100 steps took the KL from 0.214 to 0.084 nats a token at 2e-5, to only 0.165 at 1e-4.
    lr: float = 2e-5
    batch_tokens: int = 1024  # tokens a step: whole calibration sequences, drawn at random
    warmup: int = 10  # steps of linear warm-up: Adam's first steps on a converged start overshoot without it
    seed: int = 0


def distill_plan(config: ModelConfig, profile: Profile, n_sequences: int, seq_len: int,
                 distill: DistillConfig) -> MemoryPlan:
    """The engine's memory plan for distilling a model of `config` (SctError when the profile's budget cannot
    hold its step, naming the smallest budget that can)."""
    return make_plan(config, profile, _batch_size(n_sequences, seq_len, distill), seq_len, 1, "lm")


def _batch_size(n_sequences: int, seq_len: int, distill: DistillConfig) -> int:
    """Whole calibration sequences a step: `batch_tokens` of them, at least one, at most all."""
    return min(n_sequences, max(1, distill.batch_tokens // seq_len))


def distill_store(
    store: Store,
    tokens: Tensor,
    teacher: Tensor,
    distill: DistillConfig,
    profile: Profile,
    on_progress: Callable[[str, int, int], None] | None = None,
) -> dict:
    """Train the spectral factors of the locked, committed `store` for `distill.steps` steps towards the teacher
    whose final hidden states on the calibration `tokens` (sequences x seq_len) are `teacher` (sequences x
    seq_len x dim), then zero the moments. The caller commits. Returns the steps and the first and last batch
    losses (mean KL divergence in nats a token)."""
    n_seq, seq_len = tokens.shape
    batch = _batch_size(n_seq, seq_len, distill)
    plan = distill_plan(store.config, profile, n_seq, seq_len, distill)
    optim = OptimConfig(lr_spectral=distill.lr, lr_dense=0.0)
    generator = torch.Generator().manual_seed(distill.seed)
    losses = []
    started = time.perf_counter()
    with Engine(store, plan, optim, resolve_device(profile)) as engine:
        for step in range(1, distill.steps + 1):
            pick = torch.randperm(n_seq, generator=generator)[:batch]
            result = engine.train_step([(tokens[pick], teacher[pick])], step,
                                       lr_scale(step, distill.steps, distill.warmup, 0.0))
            losses.append(result.loss)
            if on_progress is not None:
                on_progress("distilling", step, distill.steps)
        engine.flush()
    for name in store.weight_shard_names():
        store.write_zeros(optim_shard(name))
    return {"steps": distill.steps, "first_loss": losses[0], "last_loss": losses[-1],
            "seconds": time.perf_counter() - started, "resident_blocks": plan.resident_blocks,
            "predicted_peak_bytes": plan.predicted_peak_bytes}
