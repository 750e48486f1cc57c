"""Where this process stands among the replicas: rank, world size and the process group torchrun set up.

`torchrun` (torch.distributed.run) starts one process per replica and tells each, through environment
variables, its global rank, the world size, its rank among the processes of its machine and where the
rendezvous is. sct-edge detects those variables; without them a run is the single-process run it always
was. The process group uses gloo on CPUs (loopback, Ethernet, Wi-Fi) and NCCL when the device is CUDA.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sct_edge.errors import SctError

RANK_PLACEHOLDER = "{rank}"
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class World:
    """This process's place among the replicas; `size == 1` is the ordinary single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def owner(self, index: int) -> int:
        """The rank that owns item `index` (a block's optimizer state and update): round robin."""
        return index % self.size

    def threads(self, cores: int) -> int:
        """Compute threads for this rank: the machine's cores divided among the ranks that share it."""
        return max(1, cores // self.local_size)


def detect_world(environ: dict[str, str] | None = None) -> World:
    """The world torchrun describes in the environment, or a single process when it does not."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return World()
    try:
        size, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        local_rank = int(env.get("LOCAL_RANK", rank))
        local_size = int(env.get("LOCAL_WORLD_SIZE", size))
    except ValueError:
        shown = ", ".join(f"{k}={env.get(k)}" for k in TORCHRUN_VARIABLES[:4])
        raise SctError(f"torchrun's environment is not numeric: {shown}") from None
    if not (0 <= rank < size and 0 <= local_rank < local_size <= size):
        raise SctError(f"torchrun's environment is inconsistent: RANK={rank} WORLD_SIZE={size} "
                       f"LOCAL_RANK={local_rank} LOCAL_WORLD_SIZE={local_size}")
    return World(rank=rank, size=size, local_rank=local_rank, local_size=local_size)


def expand_rank(path: Path | None, world: World) -> Path | None:
    """`{rank}` in a path replaced by the global rank: several replicas on one machine, one path for all."""
    if path is None or RANK_PLACEHOLDER not in str(path):
        return path
    return Path(str(path).replace(RANK_PLACEHOLDER, str(world.rank)))


def join_world(world: World, device_type: str, timeout_s: float) -> None:
    """Join the process group torchrun's rendezvous describes (gloo on CPU, NCCL on CUDA).

    `timeout_s` bounds every collective: a peer that disappears makes the others fail within it instead of
    waiting forever.
    """
    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        return
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = timedelta(seconds=timeout_s)
    try:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            # torchrun keeps one rendezvous store across restarts, where a restarted rank would find the
            # addresses the killed attempt's processes posted (pytorch#135712): each attempt gets its own prefix.
            # Across machines the restart count is per machine: there, set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world.size,
                                  is_master=False, timeout=timeout)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend=backend, store=dist.PrefixStore(f"sct-edge/attempt-{attempt}", store),
                                    rank=world.rank, world_size=world.size, timeout=timeout)
        else:
            dist.init_process_group(backend=backend, rank=world.rank, world_size=world.size, timeout=timeout)
    except (RuntimeError, ValueError) as error:
        raise SctError(f"rank {world.rank}: cannot join the {world.size} replicas ({backend}): "
                       f"{collective_failure(error)}") from None


def collective_failure(error: BaseException) -> str:
    """What a failed collective says, in one short line (gloo's source location and advice dropped)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^\[[^\]]*\]\s*", "", text)
    return text.split(". ")[0].rstrip(".")


def leave_world() -> None:
    """Tear the process group down (safe to call when none was joined)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
