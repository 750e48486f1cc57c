"""The memory plan: its activation formula against autograd, residency, paging, I/O and the budget floor."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from sct_edge.engine.malloc import NO_TRIM
from sct_edge.engine.plan import (
    HEAP_SLACK_TENSORS,
    RUNTIME_OVERHEAD_BYTES,
    block_saved_elements,
    make_plan,
    minimum_budget,
)
from sct_edge.engine.process import STEP_MALLOC
from sct_edge.engine.profile import load_profile, parse_size
from sct_edge.errors import SctError
from sct_edge.model import accounting
from sct_edge.model.accounting import CHUNK_LOGIT_BYTES, chunk_tokens_for, count_params
from sct_edge.model.config import ModelConfig, RankPolicy, get_preset
from sct_edge.model.transformer import Block, rope_tables

GiB, MiB = 2**30, 2**20


def profile(budget: str = "100GiB", **changes):
    return dataclasses.replace(load_profile("ci", budget), **changes)


def small_config(**changes) -> ModelConfig:
    base = dict(
        name="small",
        vocab_size=300,
        dim=64,
        n_layers=6,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=160,
        max_seq_len=64,
        ranks=RankPolicy(attn=8, mlp=12, embed=16, head=None),
    )
    return ModelConfig(**{**base, **changes})


def autograd_saved_bytes(config: ModelConfig, batch: int, seq: int, layer: int = 0) -> int:
    """Bytes of the distinct non-parameter storages autograd saves in one real block forward."""
    block = Block(config, layer)
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            storages[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    x = torch.randn(batch, seq, config.dim, requires_grad=True)
    cos, sin = rope_tables(config, torch.arange(seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, cos, sin)
    return sum(storages.values())


@pytest.mark.parametrize(
    "config",
    [
        small_config(),  # causal, grouped KV heads, spectral attention and MLP
        small_config(n_kv_heads=4),  # full multi-head
        small_config(ranks=RankPolicy(attn=None, mlp=None)),  # dense block
        small_config(ranks=RankPolicy(attn=8, mlp=None, overrides={"layers.0.attn.k": 3})),
        small_config(n_kv_heads=4, attention="additive"),  # the seeds' o(q + k + v)
    ],
    ids=["gqa-spectral", "mha-spectral", "dense", "mixed-override", "additive-attention"],
)
@pytest.mark.parametrize(("batch", "seq"), [(1, 8), (3, 5)])
@pytest.mark.parametrize("sliced", [False, True], ids=["plain-mlp", "sliced-mlp"])
def test_block_formula_matches_autograd(config, batch, seq, sliced, monkeypatch):
    if sliced:  # every size runs the spectral MLP in FFN slices (model/swiglu.py)
        monkeypatch.setattr(accounting, "SLICE_FROM_BYTES", 1)
    assert block_saved_elements(config, 0, batch, seq) * 4 == autograd_saved_bytes(config, batch, seq)


@pytest.mark.parametrize(
    "config",
    [
        small_config(),
        small_config(ranks=RankPolicy(attn=None, mlp=None)),
        small_config(ranks=RankPolicy(attn=8, mlp=12, overrides={"layers.0.attn.k": None})),  # k dense
        small_config(n_kv_heads=4, attention="additive"),
    ],
    ids=["gqa-spectral", "dense", "dense-k", "additive-attention"],
)
@pytest.mark.parametrize("sliced", [False, True], ids=["plain-mlp", "sliced-mlp"])
def test_the_memo_the_plan_counts_is_the_memo_a_block_records(config, sliced, monkeypatch):
    if sliced:
        monkeypatch.setattr(accounting, "SLICE_FROM_BYTES", 1)
    from sct_edge.engine.plan import block_memo_tensors
    from sct_edge.model.memo import BlockMemo

    memo = BlockMemo()
    cos, sin = rope_tables(config, torch.arange(5))
    with torch.no_grad():
        Block(config, 0)(torch.randn(3, 5, config.dim), cos, sin, None, memo)
    recorded = [t.numel() for part in (memo.attention, memo.qkv_in, memo.o_in, memo.mlp) for t in part or ()]
    assert sorted(recorded) == sorted(block_memo_tensors(config, 0, 3, 5))


def test_everything_resident_under_a_huge_budget():
    config = small_config()
    plan = make_plan(config, profile("100GiB"), batch=2, seq=16)
    assert plan.resident_blocks == config.n_layers and not plan.paging
    assert plan.inflight_blocks == 0 and plan.prefetch_depth == 0
    assert plan.io_read_bytes_per_step == plan.io_write_bytes_per_step == plan.io_bytes_per_step == 0
    count = count_params(config)
    assert plan.block_params == max(count.block_stored)
    assert plan.block_weight_bytes == 4 * plan.block_params and plan.block_moment_bytes == 8 * plan.block_params
    assert plan.store_bytes == 12 * (sum(count.block_stored) + count.embed.stored + count.head.stored + config.dim)
    assert plan.boundary_activation_bytes == (config.n_layers + 1) * 2 * 16 * config.dim * 4
    # 32 tokens fit one loss chunk: its logits, log-softmax and their gradient, and one head gradient.
    assert plan.logits_bytes == 2 * 16 * config.vocab_size * 4 * 3 + 4 * (count.head.stored or count.embed.stored)
    assert plan.predicted_peak_bytes == (
        RUNTIME_OVERHEAD_BYTES
        + plan.embed_head_bytes
        + plan.boundary_activation_bytes
        + plan.boundary_grad_bytes
        # the loss and a block's backward are never alive at once
        + max(plan.logits_bytes, plan.block_grad_bytes + plan.block_working_set_bytes)
        + config.n_layers * plan.block_resident_bytes
    )


@pytest.mark.parametrize("batch,seq,paged,threads,expected", [
    (1, 8, True, 2, 1),  # paged, few tokens: the I/O thread gets a core
    (2, 32, True, 4, 3),
    (1, 65, True, 2, 2),  # past SMALL_STEP_TOKENS the compute is worth the whole team
    (1, 8, False, 2, 2),  # nothing paged: no I/O thread to make room for
    (1, 8, True, 1, 1),
])
def test_a_small_paged_step_leaves_a_core_to_the_io_thread(batch, seq, paged, threads, expected):
    config = get_preset("llama3-8b").with_ranks(RankPolicy.uniform(64))
    full = make_plan(config, profile("100GiB"), batch, seq)
    budget = full.predicted_peak_bytes - (10 * full.block_resident_bytes if paged else 0)
    plan = make_plan(config, profile(f"{budget}B"), batch, seq)
    assert plan.pages_blocks == paged
    assert plan.compute_threads(threads) == expected


def test_a_tight_budget_pages_and_costs_io():
    config = get_preset("llama3-8b").with_ranks(RankPolicy.uniform(64))
    full = make_plan(config, profile("100GiB"), 1, 8)
    budget = full.predicted_peak_bytes - 10 * full.block_resident_bytes
    plan = make_plan(config, profile(f"{budget}B"), 1, 8)
    assert plan.paging and 0 < plan.resident_blocks < config.n_layers
    assert plan.inflight_blocks == load_profile("ci").prefetch_depth + 2
    assert plan.predicted_peak_bytes <= budget
    # One more resident block would not fit beside the in-flight window.
    assert plan.predicted_peak_bytes + plan.block_resident_bytes > budget
    paged = config.n_layers - plan.resident_blocks
    params = plan.block_params  # uniform rank: every block is the same size
    assert plan.io_read_bytes_per_step == paged * (4 * params + 12 * params)
    assert plan.io_write_bytes_per_step == paged * 12 * params
    assert plan.io_seconds_per_step == pytest.approx(
        plan.io_read_bytes_per_step / 1.2e9 + plan.io_write_bytes_per_step / 2.1e9
    )
    assert list(plan.resident_layers) == list(range(plan.resident_blocks))


def test_too_small_budget_names_a_minimum_that_works():
    config = get_preset("sct-70b")
    with pytest.raises(SctError) as error:
        make_plan(config, profile("64MiB", name="steamdeck"), 1, 8)
    message = str(error.value)
    assert re.search(
        r"^budget 64\.0 MiB is below the \d+ MiB sct-70b needs for one block at batch 1 × seq 8 "
        r"\(profile steamdeck\); try --budget \d+MiB$",
        message,
    ), message
    suggested = parse_size(message.rsplit("--budget ", 1)[1])
    minimum = minimum_budget(config, profile(), 1, 8)
    assert minimum <= suggested < minimum + 64 * MiB
    at_minimum = make_plan(config, profile(f"{minimum}B"), 1, 8)
    assert (at_minimum.resident_blocks, at_minimum.inflight_blocks, at_minimum.prefetch_depth) == (0, 1, 0)
    assert at_minimum.predicted_peak_bytes == minimum
    assert any("prefetch depth 0" in note for note in at_minimum.notes)
    make_plan(config, profile(f"{suggested}B"), 1, 8)
    with pytest.raises(SctError, match="try --budget"):
        make_plan(config, profile(f"{minimum - 1}B"), 1, 8)


def test_prefetch_window_shrinks_before_the_plan_fails():
    config = get_preset("llama3-8b")
    minimum = minimum_budget(config, profile(), 1, 8)
    block = make_plan(config, profile(), 1, 8).block_resident_bytes
    plan = make_plan(config, profile(f"{minimum + 1 * block}B", prefetch_depth=3), 1, 8)
    assert (plan.resident_blocks, plan.inflight_blocks, plan.prefetch_depth) == (0, 2, 0)
    plan = make_plan(config, profile(f"{minimum + 4 * block}B", prefetch_depth=3), 1, 8)
    assert (plan.resident_blocks, plan.inflight_blocks, plan.prefetch_depth) == (0, 5, 3) and not plan.notes


def test_micro_batches_scale_activations_not_io():
    config = get_preset("llama3-8b")
    full = make_plan(config, profile(), 2, 32, micro_batches=4)
    budget = f"{full.predicted_peak_bytes - 8 * full.block_resident_bytes}B"
    one = make_plan(config, profile(budget), 2, 32, micro_batches=1)
    four = make_plan(config, profile(budget), 2, 32, micro_batches=4)
    assert four.boundary_activation_bytes == 4 * one.boundary_activation_bytes
    assert four.boundary_grad_bytes == 4 * one.boundary_grad_bytes
    assert four.logits_bytes == one.logits_bytes  # one micro-batch reaches the head at a time
    assert four.resident_blocks <= one.resident_blocks
    paged_one = one.io_bytes_per_step / (config.n_layers - one.resident_blocks)
    paged_four = four.io_bytes_per_step / (config.n_layers - four.resident_blocks)
    assert paged_one == paged_four


def test_activation_modes():
    config = get_preset("llama3-8b")
    recompute = make_plan(config, profile("100GiB"), 1, 64)
    keep = make_plan(config, profile("100GiB", activations="keep"), 1, 64)
    spill = make_plan(config, profile("100GiB", activations="spill"), 1, 64)
    saved = block_saved_elements(config, 0, 1, 64) * 4
    boundary = 64 * config.dim * 4
    assert keep.kept_activation_bytes == config.n_layers * (saved - boundary)
    assert keep.block_working_set_bytes == recompute.block_working_set_bytes - saved
    assert keep.predicted_peak_bytes > recompute.predicted_peak_bytes
    assert spill.boundary_activation_bytes == 2 * boundary < recompute.boundary_activation_bytes
    assert spill.predicted_peak_bytes < recompute.predicted_peak_bytes
    spilled = config.n_layers * boundary
    assert (spill.io_read_bytes_per_step, spill.io_write_bytes_per_step) == (spilled, spilled)
    # keep under paging: only resident blocks keep graphs, paged ones recompute.
    budget = keep.predicted_peak_bytes - 5 * (keep.block_resident_bytes + saved - boundary)
    paged_keep = make_plan(config, profile(f"{budget}B", activations="keep"), 1, 64)
    assert 0 < paged_keep.resident_blocks < config.n_layers
    assert paged_keep.kept_activation_bytes == paged_keep.resident_blocks * (saved - boundary)
    assert paged_keep.block_working_set_bytes == recompute.block_working_set_bytes


def test_auto_activations_keep_exactly_when_everything_fits_with_kept_graphs():
    config = get_preset("llama3-8b")
    keep = make_plan(config, profile("100GiB", activations="keep"), 1, 64)
    fits = make_plan(config, profile(f"{keep.predicted_peak_bytes}B", activations="auto"), 1, 64)
    assert (fits.activations, fits.activations_auto) == ("keep", True)
    assert fits.predicted_peak_bytes == keep.predicted_peak_bytes and "activations keep (auto)" in fits.describe()[0]
    short = make_plan(config, profile(f"{keep.predicted_peak_bytes - 1}B", activations="auto"), 1, 64)
    recompute = make_plan(config, profile(f"{keep.predicted_peak_bytes - 1}B"), 1, 64)
    assert short.activations == "recompute" and recompute.kept_blocks == 0
    # One byte short of every graph: all but one block keep theirs, on top of the recompute working set, and
    # the one that recomputes leaves a memo for it: attention output and log-sum-exp, and the rank-32 x·U of q,
    # k, v and o, each cache-line aligned (this MLP is not sliced).
    per_graph = keep.kept_activation_bytes // config.n_layers
    assert short.kept_blocks == config.n_layers - 1 and short.kept_layers == range(1, config.n_layers)
    assert short.memo_layers == range(1)
    assert short.memo_bytes == 64 * (config.dim + config.n_heads + 4 * 32) * 4 + 6 * 64
    assert short.predicted_peak_bytes == (recompute.predicted_peak_bytes + short.kept_blocks * per_graph
                                          + short.memo_bytes)
    assert short.predicted_peak_bytes <= keep.predicted_peak_bytes - 1
    assert "kept forward graphs of the last 31 blocks" in "\n".join(short.describe())
    assert not make_plan(config, profile("100GiB"), 1, 64).activations_auto


def test_kept_graphs_beside_heap_served_tensors_are_counted_with_the_heap_factor():
    import math

    from sct_edge.engine.plan import KEPT_GRAPH_HEAP_FACTOR

    config = get_preset("llama3-8b").with_ranks(RankPolicy.uniform(128))
    keep = make_plan(config, profile("100GiB", activations="keep"), 4, 512)
    per_graph = keep.kept_activation_bytes // config.n_layers
    plan = make_plan(config, profile("10GiB", activations="auto"), 4, 512)
    assert plan.heap_slack_bytes > 0 and 0 < plan.kept_blocks < config.n_layers
    assert plan.kept_activation_bytes == plan.kept_blocks * math.ceil(per_graph * KEPT_GRAPH_HEAP_FACTOR)
    one_more = plan.kept_activation_bytes // plan.kept_blocks
    assert plan.predicted_peak_bytes <= 10 * GiB < plan.predicted_peak_bytes + one_more


def test_auto_activations_spill_when_the_boundaries_do_not_fit_in_ram():
    config = get_preset("llama3-8b")
    recompute_minimum = minimum_budget(config, profile(activations="recompute"), 4, 512)
    spill_minimum = minimum_budget(config, profile(activations="spill"), 4, 512)
    assert spill_minimum < recompute_minimum
    assert minimum_budget(config, profile(activations="auto"), 4, 512) == spill_minimum
    fits = make_plan(config, profile(f"{recompute_minimum}B", activations="auto"), 4, 512)
    assert fits.activations == "recompute" and fits.io_read_bytes_per_step > 0
    short = make_plan(config, profile(f"{recompute_minimum - 1}B", activations="auto"), 4, 512)
    spill = make_plan(config, profile(f"{recompute_minimum - 1}B", activations="spill"), 4, 512)
    assert (short.activations, short.activations_auto) == ("spill", True)
    assert short.predicted_peak_bytes == spill.predicted_peak_bytes <= recompute_minimum - 1
    with pytest.raises(SctError, match="try --budget"):
        make_plan(config, profile(f"{spill_minimum - 1}B", activations="auto"), 4, 512)


def test_dtypes_and_hidden_sum_workload():
    config = get_preset("sct-70b")
    bf16 = make_plan(config, profile("100GiB", state_dtype="bfloat16", compute_dtype="bfloat16"), 1, 8)
    fp32 = make_plan(config, profile("100GiB"), 1, 8)
    assert bf16.block_moment_bytes * 2 == fp32.block_moment_bytes
    assert bf16.boundary_activation_bytes == fp32.boundary_activation_bytes  # the residual stream stays float32
    assert any("bfloat16" in note for note in bf16.notes)
    additive = dataclasses.replace(config, attention="additive")
    hidden_sum = make_plan(additive, profile("100GiB"), 1, 8, workload="hidden-sum")
    assert hidden_sum.embed_head_bytes == hidden_sum.logits_bytes == 0
    assert hidden_sum.store_bytes == 12 * count_params(config).published_spectral


def test_to_dict_and_describe():
    plan = make_plan(get_preset("llama3-8b"), profile("3GiB"), 1, 8)
    data = plan.to_dict()
    for key in (
        "resident_blocks",
        "prefetch_depth",
        "inflight_blocks",
        "predicted_peak_bytes",
        "store_bytes",
        "io_read_bytes_per_step",
        "io_write_bytes_per_step",
        "io_bytes_per_step",
        "io_seconds_per_step",
        "block_weight_bytes",
        "block_moment_bytes",
        "block_grad_bytes",
        "embed_head_bytes",
        "boundary_activation_bytes",
        "block_working_set_bytes",
        "logits_bytes",
        "runtime_overhead_bytes",
        "budget_bytes",
        "headroom_bytes",
        "paging",
        "notes",
    ):
        assert key in data, key
    lines = plan.describe()
    assert any(line.lstrip().startswith("resident blocks:") for line in lines)
    assert any("predicted peak RSS" in line for line in lines)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch": 0}, "batch must be a positive integer"),
        ({"seq": 10**6}, "longer than"),
        ({"micro_batches": 0}, "micro_batches"),
        ({"workload": "chat"}, "workload must be one of"),
    ],
)
def test_bad_plan_inputs(kwargs, match):
    args = {"batch": 1, "seq": 8, **kwargs}
    with pytest.raises(SctError, match=match):
        make_plan(get_preset("tiny"), profile(), **args)


def test_the_logits_working_set_is_one_loss_chunk_not_the_whole_batch():
    config = get_preset("llama3-8b").with_ranks(RankPolicy.uniform(128))
    short = make_plan(config, profile("100GiB"), batch=1, seq=64)
    long = make_plan(config, profile("100GiB"), batch=4, seq=2048)
    chunk = chunk_tokens_for(config.vocab_size)
    head = count_params(config).head.stored
    assert short.logits_bytes == 64 * config.vocab_size * 12 + 4 * head
    assert long.logits_bytes == chunk * config.vocab_size * 12 + 4 * head < 4 * 2048 * config.vocab_size * 12
    bf16 = make_plan(config, profile("100GiB", compute_dtype="bfloat16"), batch=4, seq=2048)
    assert bf16.logits_bytes == chunk * config.vocab_size * 14 + 6 * head  # bf16 logits, the head cast once


def test_hidden_state_tensors_come_from_the_heap_only_when_nothing_is_paged_and_the_slack_fits():
    config = get_preset("llama3-8b").with_ranks(RankPolicy.uniform(128))
    hidden = 4 * 512 * config.dim * 4  # 32 MiB: at glibc's largest default mmap threshold
    roomy = make_plan(config, profile("10GiB"), batch=4, seq=512)
    assert not roomy.paging
    # Twice the larger of a hidden state and a loss chunk's logits (128 MiB), so that both come from the heap.
    assert roomy.heap_tensor_limit == 2 * CHUNK_LOGIT_BYTES == roomy.malloc.mmap_bytes
    assert roomy.malloc.trim_bytes == NO_TRIM  # what the next block would fault in again stays in the heap
    assert roomy.heap_slack_bytes == HEAP_SLACK_TENSORS * hidden
    assert any("malloc heap slack" in line for line in roomy.describe())
    # The slack is counted in the peak, and it never costs a resident block: a budget with room for every
    # block but not for the slack keeps the default threshold instead.
    tight = make_plan(config, profile(str(roomy.predicted_peak_bytes - 1)), batch=4, seq=512)
    assert not tight.paging and tight.heap_slack_bytes == 0 and tight.malloc == STEP_MALLOC
    assert tight.predicted_peak_bytes == roomy.predicted_peak_bytes - roomy.heap_slack_bytes
    paged = make_plan(config, profile("3GiB"), batch=4, seq=512)
    assert paged.paging and paged.heap_slack_bytes == 0 and paged.malloc == STEP_MALLOC
    small = make_plan(config, profile("10GiB"), batch=1, seq=512)  # 8 MiB tensors: on the heap already
    assert small.heap_slack_bytes == 0 and small.malloc == STEP_MALLOC


def test_clipping_holds_every_gradient_only_when_every_block_is_resident_and_they_fit():
    config = small_config()
    count = count_params(config)
    plain = make_plan(config, profile("100GiB"), batch=2, seq=16)
    assert not plain.clip and not plain.holds_gradients and plain.held_gradient_bytes == 0
    clipped = make_plan(config, profile("100GiB"), batch=2, seq=16, clip=True)
    # One block's gradients are in the plan already; holding adds the others'.
    held = 4 * (sum(count.block_stored) - max(count.block_stored))
    assert clipped.holds_gradients and clipped.held_gradient_bytes == held > 0
    assert clipped.predicted_peak_bytes == plain.predicted_peak_bytes + held
    assert any("held for clipping" in line for line in clipped.describe())
    # No room for them: the plan keeps every block resident and measures the norm with a second backward.
    tight = make_plan(config, profile(f"{clipped.predicted_peak_bytes - 1}B"), batch=2, seq=16, clip=True)
    assert not tight.paging and not tight.holds_gradients and tight.held_gradient_bytes == 0
    assert tight.predicted_peak_bytes == plain.predicted_peak_bytes
    assert any("a first backward pass measures" in line for line in tight.describe())
    # Paged blocks leave RAM between the passes: never held. Across replicas the exchange owns the gradients.
    budget = plain.predicted_peak_bytes - 2 * plain.block_resident_bytes
    paged = make_plan(config, profile(f"{budget}B"), batch=2, seq=16, clip=True)
    assert paged.paging and not paged.holds_gradients
    assert not make_plan(config, profile("100GiB"), batch=2, seq=16, clip=True, replicas=2).holds_gradients


def test_auto_gives_every_recomputed_block_a_memo_before_any_block_keeps_its_graph():
    from sct_edge.engine.plan import block_memo_tensors
    from sct_edge.model.accounting import MEMO_ALIGN_BYTES

    config = get_preset("llama3-8b").with_ranks(RankPolicy.uniform(128))
    # Attention output and log-sum-exp, x·U of q, k, v and o, and (the MLP in slices at 2,048 tokens) gate's,
    # up's and down's rank-wide tensors.
    tensors = block_memo_tensors(config, 0, 4, 512)
    assert tensors == [4 * 512 * n for n in (config.dim, config.n_heads, *[128] * 7)]
    per_memo = sum(tensors) * 4 + 9 * MEMO_ALIGN_BYTES  # nine tensors in the step's arena, each cache-line aligned
    recompute = make_plan(config, profile("10GiB", activations="recompute"), 4, 512)
    assert recompute.memo_blocks == 0 and recompute.memo_bytes == 0  # asked for plain recompute: no memos
    auto = make_plan(config, profile("10GiB", activations="auto"), 4, 512)
    assert auto.heap_slack_bytes > 0 and 0 < auto.kept_blocks < config.n_layers
    assert auto.memo_layers == range(config.n_layers - auto.kept_blocks)
    assert auto.memo_bytes == auto.memo_blocks * per_memo
    assert "memos of" in "\n".join(auto.describe())
    # Room for 16 memos and no graph: the first 16 blocks get memos, the others recompute in full.
    half = make_plan(config, profile(f"{recompute.predicted_peak_bytes + 16 * per_memo + 1}B", activations="auto"),
                     4, 512)
    assert (half.memo_blocks, half.kept_blocks) == (16, 0)
    assert half.predicted_peak_bytes == recompute.predicted_peak_bytes + 16 * per_memo


def test_blocks_with_nothing_to_record_get_no_memo_and_auto_still_keeps_graphs():
    # Additive attention runs no attention kernel, and at 64 tokens the MLP is not in slices: nothing to record.
    config = small_config(attention="additive", n_kv_heads=4)
    keep = make_plan(config, profile("100GiB", activations="keep"), 1, 64)
    short = make_plan(config, profile(f"{keep.predicted_peak_bytes - 1}B", activations="auto"), 1, 64)
    assert short.activations == "recompute" and short.kept_blocks == config.n_layers - 1
    assert (short.memo_blocks, short.memo_bytes) == (0, 0)
    assert "memos of" not in "\n".join(short.describe())
