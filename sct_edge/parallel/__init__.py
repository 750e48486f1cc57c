"""Training one model on several devices: torch.distributed replicas of a store, launched by torchrun.

`world` finds the process group torchrun set up, `exchange` moves one block's gradients to the block's
owner and its updated weights back while the next block's backward runs, `agreement` makes the replicas
start from the same committed step and content, and `diloco` is the low-communication mode for slow links.
"""
