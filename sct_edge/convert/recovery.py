"""Block-wise recovery after a calibrated conversion: train one converted block's spectral factors so that its
outputs match the dense block's, on the calibration inputs, before the next block is converted.

The inputs are the hidden states the converted blocks upstream produce and the targets are the dense model's
own hidden states after this block, so each block also makes up for the errors upstream of it (as BRECQ and
OmniQuant do for quantisation). The loss is the mean squared error over a random batch of calibration
sequences; the step is the trainer's own: AdamW (`sct_edge.engine.adamw`) on U, s and V with the learning rate
decaying linearly to 0, then the Stiefel retraction of U and V (`sct_edge.model.retraction`), so the factors
leave recovery orthonormal like any trained SCT layer. Norm gains and matrices kept dense are not trained.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from sct_edge.engine.adamw import OptimConfig, adamw_update, is_orthonormal_factor, is_spectral
from sct_edge.model.retraction import retract_
from sct_edge.model.transformer import Block, rope_tables


@dataclass
class RecoveryConfig:
    steps: int = 100
    lr: float = 2e-4  # AdamW's step on U, s and V (Adam moves each entry by about this much a step)
    batch_tokens: int = 2048  # tokens a step: whole calibration sequences, drawn at random
    seed: int = 0
    micro_tokens: int | None = None  # tokens a forward/backward at most (gradients accumulated); None: the batch


def recover_block(block: Block, inputs: Tensor, targets: Tensor, layer: int, config: RecoveryConfig) -> dict:
    """Train the spectral factors of `block` in place for `config.steps` steps towards block(inputs) = targets
    (both sequences x seq_len x dim, in RAM or memory-mapped); returns the steps taken and the first and last
    batch losses."""
    n_seq, seq_len = inputs.shape[:2]
    cos, sin = rope_tables(block.attn.config, torch.arange(seq_len))
    params = {name: p for name, p in block.named_parameters() if is_spectral(name)}
    if not params or config.steps <= 0:
        return {"steps": 0}
    exp_avg = {name: torch.zeros_like(p) for name, p in params.items()}
    exp_avg_sq = {name: torch.zeros_like(p) for name, p in params.items()}
    optim = OptimConfig(lr_spectral=config.lr, beta2=0.999, weight_decay=0.0)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + layer)
    batch = min(n_seq, max(1, config.batch_tokens // seq_len))
    micro = batch if config.micro_tokens is None else min(batch, max(1, config.micro_tokens // seq_len))
    losses = []
    for p in params.values():
        p.requires_grad_(True)
    try:
        for step in range(1, config.steps + 1):
            pick = torch.randperm(n_seq, generator=generator)[:batch]
            # the batch's mean squared error, a micro-batch at a time: the autograd graph of one micro-batch
            # at most is alive (the MLP's ffn-wide activations of `micro_tokens` tokens, not of the batch)
            grads, loss = None, 0.0
            for part in pick.split(micro):
                err = F.mse_loss(block(inputs[part], cos, sin), targets[part], reduction="sum") / (
                    pick.numel() * seq_len * inputs.shape[-1])
                g = torch.autograd.grad(err, list(params.values()))
                grads = g if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
                loss += float(err.detach())
            losses.append(loss)
            with torch.no_grad():
                adamw_update(
                    {name: p.data for name, p in params.items()},
                    dict(zip(params, grads, strict=True)),
                    exp_avg,
                    exp_avg_sq,
                    step,
                    optim,
                    lr_scale=1.0 - (step - 1) / config.steps,
                )
                retract_([p.data for name, p in params.items() if is_orthonormal_factor(name)])
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return {"steps": config.steps, "first_loss": losses[0], "last_loss": losses[-1]}
