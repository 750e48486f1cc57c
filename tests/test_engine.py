"""The engine's public API: its streamed step equals the in-memory reference step, evaluation and generation
match the in-memory model, and a budget that fits everything reads once."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from sct_edge.engine.adamw import OptimConfig
from sct_edge.engine.plan import MemoryPlan, make_plan
from sct_edge.engine.profile import load_profile
from sct_edge.engine.reference import InMemoryStep
from sct_edge.engine.sampling import generate
from sct_edge.engine.step import Engine
from sct_edge.errors import SctError
from sct_edge.events import BlockEvent, PhaseEvent
from sct_edge.model.config import ModelConfig, RankPolicy
from sct_edge.model.memo import ReplayedAttention
from sct_edge.model.transformer import Transformer
from sct_edge.store.shard_names import block_index, block_shard, optim_shard, param_prefix
from sct_edge.store.store import Store


def multi_block(**overrides) -> ModelConfig:
    base = dict(name="multi", vocab_size=80, dim=32, n_layers=5, n_heads=4, n_kv_heads=2, ffn_dim=48,
                max_seq_len=64, ranks=RankPolicy(attn=4, mlp=6, embed=5, head=7))
    base.update(overrides)
    return ModelConfig(**base)


CONFIGS = {
    "multi": multi_block(),
    "multi-tied-dense-embed": multi_block(tie_embeddings=True, ranks=RankPolicy(attn=8, mlp=3, embed=None)),
    "multi-some-dense": multi_block(ranks=RankPolicy(attn=None, mlp=6, embed=5, head=None,
                                                     overrides={"layers.2.mlp.up": 2})),
}


def plan_for(config: ModelConfig, workload: str = "lm", activations: str = "recompute",
             resident_blocks: int | None = None, prefetch_depth: int | None = None) -> MemoryPlan:
    """The ci profile's plan for `config`, with the residency a test needs in place of the one the budget allows."""
    plan = make_plan(config, dataclasses.replace(load_profile("ci"), activations=activations), 2, 7, 1, workload)
    if resident_blocks is not None:
        plan = dataclasses.replace(plan, resident_blocks=resident_blocks)
    if prefetch_depth is not None:
        plan = dataclasses.replace(plan, prefetch_depth=prefetch_depth)
    return plan


def batches(config: ModelConfig, n: int, seed: int, workload: str = "lm", batch: int = 2, seq: int = 7):
    g = torch.Generator().manual_seed(seed)
    if workload == "hidden-sum":
        return [(torch.randn(batch, seq, config.dim, generator=g), None) for _ in range(n)]
    return [(torch.randint(0, config.vocab_size, (batch, seq), generator=g),
             torch.randint(0, config.vocab_size, (batch, seq), generator=g)) for _ in range(n)]


def assert_store_matches(store: Store, model: Transformer, reference: InMemoryStep, workload: str) -> None:
    params = dict(model.named_parameters())
    moments = reference.moments()
    worst = 0.0
    for name in store.weight_shard_names():
        if workload == "hidden-sum" and block_index(name) is None:
            continue
        prefix = param_prefix(name)
        weights, state = store.read(name), store.read(optim_shard(name))
        for key, value in weights.items():
            full = prefix + key
            torch.testing.assert_close(value, params[full].detach(), rtol=0, atol=1e-5,
                                       msg=lambda m, name=full: f"{name}: {m}")
            m1, m2 = moments[full]
            # Moments scale with the gradient (the hidden-sum loss is a plain sum: gradients in the hundreds), so
            # they are held to 1e-5 relative, weights to 1e-5 absolute.
            torch.testing.assert_close(state[f"{key}.exp_avg"], m1, rtol=1e-5, atol=1e-5, msg=full)
            torch.testing.assert_close(state[f"{key}.exp_avg_sq"], m2, rtol=1e-5, atol=1e-5, msg=full)
            worst = max(worst, (value - params[full]).abs().max().item())
        del weights, state
        store.release(name)
        store.release(optim_shard(name))
    assert worst < 1e-5


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("clip", [None, 0.05])
def test_streamed_step_equals_in_memory_reference_when_every_block_is_paged(tmp_path, config_name, clip):
    config = CONFIGS[config_name]
    optim = OptimConfig(lr_spectral=0.05, lr_dense=0.01, weight_decay=0.1, max_grad_norm=clip)
    store = Store.create(tmp_path / "store", config, seed=7)
    # A budget so small that no block stays resident: every block is paged in and out.
    profile = dataclasses.replace(load_profile("ci"), prefetch_depth=1)
    minimum = None
    try:
        make_plan(config, dataclasses.replace(profile, memory_budget=1), 2, 7, 3)
    except SctError as error:
        minimum = error
    assert minimum is not None
    plan = make_plan(config, dataclasses.replace(profile, memory_budget=profile.memory_budget), 2, 7, 3)
    engine = Engine(store, dataclasses.replace(plan, resident_blocks=0, prefetch_depth=plan.prefetch_depth or 1), optim)
    model = Transformer(config, seed=7)
    reference = InMemoryStep(model, optim)
    for step in (1, 2):
        micro = batches(config, 3, seed=step)
        result = engine.train_step(micro, step)
        expected_loss = reference.step(micro)
        assert result.loss == pytest.approx(expected_loss, abs=1e-5)
        assert result.bytes_written > 0
    engine.flush()
    engine.close()
    store.commit(2, {})
    assert_store_matches(Store.open(tmp_path / "store"), model, reference, "lm")


class BlockCalls:
    """Counts an engine's block forwards: the forward pass and backward's recomputes alike."""

    def __init__(self, engine: Engine) -> None:
        self.count = 0
        run_block = engine._block

        def counting_block(*args, **kwargs):
            self.count += 1
            return run_block(*args, **kwargs)

        engine._block = counting_block


class ReplayCount:
    """Counts attention replayed from block memos (`sct_edge/model/memo.py`) instead of recomputed."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        replay = ReplayedAttention.apply

        def counting_replay(*args):
            self.count += 1
            return replay(*args)

        monkeypatch.setattr(ReplayedAttention, "apply", counting_replay)


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("activations", ["recompute", "keep"])
def test_clipping_with_every_gradient_held_is_one_backward_and_equals_the_reference(tmp_path, config_name,
                                                                                    activations):
    config = CONFIGS[config_name]
    optim = OptimConfig(lr_spectral=0.05, lr_dense=0.01, weight_decay=0.1, max_grad_norm=0.05)
    store = Store.create(tmp_path / "store", config, seed=7)
    profile = dataclasses.replace(load_profile("ci"), activations=activations)
    plan = make_plan(config, profile, 2, 7, 2, clip=True)
    assert plan.holds_gradients and plan.resident_blocks == config.n_layers
    engine = Engine(store, plan, optim)
    calls = BlockCalls(engine)
    model = Transformer(config, seed=7)
    reference = InMemoryStep(model, optim)
    for step in (1, 2):
        micro = batches(config, 2, seed=step)
        calls.count = 0
        result = engine.train_step(micro, step)
        # Forward once per block and micro-batch, and (recomputing) once more in the single backward pass.
        assert calls.count == config.n_layers * 2 * (1 if activations == "keep" else 2)
        assert result.loss == pytest.approx(reference.step(micro), abs=1e-5)
        assert result.grad_norm > 0.05  # the clip bites
    engine.flush()
    engine.close()
    store.commit(2, {})
    assert_store_matches(Store.open(tmp_path / "store"), model, reference, "lm")


@pytest.mark.parametrize("config_name", ["multi", "multi-tied-dense-embed"])
def test_auto_keeps_the_last_graphs_the_budget_has_room_for_and_equals_the_reference(tmp_path, monkeypatch,
                                                                                      config_name):
    config = CONFIGS[config_name]
    optim = OptimConfig(lr_spectral=0.05, lr_dense=0.01, weight_decay=0.1)
    store = Store.create(tmp_path / "store", config, seed=7)
    ci = load_profile("ci")
    recompute = make_plan(config, dataclasses.replace(ci, activations="recompute"), 2, 7, 2)
    keep = make_plan(config, dataclasses.replace(ci, activations="keep"), 2, 7, 2)
    per_graph = keep.kept_activation_bytes // config.n_layers
    budget = recompute.predicted_peak_bytes + 2 * per_graph + per_graph // 2  # room for two graphs, not three
    plan = make_plan(config, dataclasses.replace(ci, activations="auto", memory_budget=budget), 2, 7, 2)
    assert (plan.activations, plan.kept_blocks) == ("recompute", 2) and config.n_layers > 2
    assert plan.kept_layers == range(config.n_layers - 2, config.n_layers)
    # Every other block leaves a memo for its recompute, counted before the graphs.
    assert plan.memo_layers == range(config.n_layers - 2) and plan.memo_bytes > 0
    assert plan.predicted_peak_bytes == recompute.predicted_peak_bytes + 2 * per_graph + plan.memo_bytes <= budget
    engine = Engine(store, plan, optim)
    calls = BlockCalls(engine)
    replays = ReplayCount(monkeypatch)
    model = Transformer(config, seed=7)
    reference = InMemoryStep(model, optim)
    for step in (1, 2):
        micro = batches(config, 2, seed=step)
        calls.count = 0
        result = engine.train_step(micro, step)
        # Forward of every block and micro-batch, and backward recomputes all but the two kept blocks.
        assert calls.count == 2 * config.n_layers + 2 * (config.n_layers - 2)
        assert replays.count == 2 * (config.n_layers - 2) * step  # from the memos, for each micro-batch
        assert result.loss == pytest.approx(reference.step(micro), abs=1e-5)
    engine.flush()
    engine.close()
    store.commit(2, {})
    assert_store_matches(Store.open(tmp_path / "store"), model, reference, "lm")


@pytest.mark.parametrize("config_name", ["multi", "multi-tied-dense-embed"])
def test_bfloat16_compute_runs_the_products_in_bfloat16_and_equals_the_bfloat16_reference(tmp_path, config_name):
    config = CONFIGS[config_name]
    optim = OptimConfig(lr_spectral=1e-3, lr_dense=1e-3)
    micro = batches(config, 2, seed=1)
    losses = {}
    for dtype in ("float32", "bfloat16"):
        store = Store.create(tmp_path / dtype, config, seed=7)
        profile = dataclasses.replace(load_profile("ci"), compute_dtype=dtype)
        engine = Engine(store, make_plan(config, profile, 2, 7, 2), optim)
        model = Transformer(config, seed=7)
        reference = InMemoryStep(model, optim, compute_dtype=dtype)
        losses[dtype] = engine.train_step(micro, 1).loss
        assert losses[dtype] == pytest.approx(reference.step(micro), rel=1e-4)
        engine.flush()
        engine.close()
        store.commit(1, {})
        params = dict(model.named_parameters())
        for name in store.weight_shard_names():
            for key, value in store.read(name).items():
                torch.testing.assert_close(value, params[param_prefix(name) + key].detach(), rtol=0, atol=1e-4)
    # The same step in bfloat16 arithmetic: close to float32's loss, and not it.
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)
    assert losses["bfloat16"] != pytest.approx(losses["float32"], rel=1e-6)


@pytest.mark.parametrize("activations", ["recompute", "keep", "spill"])
def test_hidden_sum_workload_streamed_equals_reference(tmp_path, activations):
    config = multi_block(attention="additive", n_kv_heads=4)
    optim = OptimConfig(lr_spectral=0.02)
    store = Store.create(tmp_path / "store", config, seed=3)
    engine = Engine(store, plan_for(config, "hidden-sum", activations, resident_blocks=2, prefetch_depth=2), optim)
    model = Transformer(config, seed=3)
    reference = InMemoryStep(model, optim, workload="hidden-sum")
    micro = batches(config, 2, seed=1, workload="hidden-sum")
    assert engine.train_step(micro, 1).loss == reference.step(micro)
    engine.flush()
    store.commit(1, {})
    assert_store_matches(Store.open(tmp_path / "store"), model, reference, "hidden-sum")
    # Later steps start from factors retracted by CholeskyQR2 vs Householder (equal to ~1e-7), so the seed
    # loss (a plain sum in the hundreds) agrees to float32 precision, not bit for bit.
    for step in (2, 3):
        micro = batches(config, 2, seed=step, workload="hidden-sum")
        assert engine.train_step(micro, step).loss == pytest.approx(reference.step(micro), rel=1e-5)
    engine.close()


@pytest.mark.parametrize("clip", [None, 0.05])
def test_spill_moves_boundary_activations_through_disk_and_matches_the_reference(tmp_path, clip):
    config = multi_block()
    optim = OptimConfig(lr_spectral=0.05, max_grad_norm=clip)
    store = Store.create(tmp_path / "store", config, seed=4)
    engine = Engine(store, plan_for(config, activations="spill", resident_blocks=config.n_layers, prefetch_depth=0),
                    optim)
    model = Transformer(config, seed=4)
    reference = InMemoryStep(model, optim)
    micro = batches(config, 3, seed=5)
    first_read = sum(store.shard_bytes(n) for n in store.shard_names())
    result = engine.train_step(micro, 1)
    assert result.loss == pytest.approx(reference.step(micro), abs=1e-5)
    # Everything is resident: the only I/O after the first read is block inputs, out in forward and back
    # in backward (twice with clipping's norm pass), as the plan predicts.
    plan = make_plan(config, dataclasses.replace(load_profile("ci"), activations="spill"), 2, 7, 3)
    spilled = engine.spill.bytes_written
    assert plan.io_write_bytes_per_step == config.n_layers * 3 * 2 * 7 * config.dim * 4
    assert plan.io_write_bytes_per_step <= spilled < plan.io_write_bytes_per_step + config.n_layers * 1024
    assert result.bytes_written == spilled
    assert result.bytes_read == first_read + spilled * (2 if clip else 1)
    assert result.phase_s["spill"] > 0
    spill_dir = engine.spill.path
    assert spill_dir.parent == tmp_path and spill_dir.name.startswith(".store.spill-")
    engine.flush()
    store.commit(1, {})
    assert_store_matches(Store.open(tmp_path / "store"), model, reference, "lm")
    engine.close()
    assert not spill_dir.exists()


def test_a_full_disk_while_spilling_is_a_clean_error_and_the_store_stays_committed(small_tmpfs):
    config = multi_block()
    store = Store.create(small_tmpfs / "store", config)
    before = {name: store.read(name) for name in store.shard_names()}
    engine = Engine(store, plan_for(config, activations="spill", resident_blocks=config.n_layers, prefetch_depth=0))
    with open(small_tmpfs / "filler", "wb") as filler, pytest.raises(OSError, match="No space left"):
        while True:
            filler.write(b"\0" * 65536)
            filler.flush()
    with pytest.raises(SctError, match=r"^activation spill .*/0\.safetensors: no space left on device$"):
        engine.train_step(batches(config, 1, seed=1), 1)
    engine.close()
    assert not engine.spill.path.exists()
    with Store.open(small_tmpfs / "store") as reopened:
        assert reopened.step == 0
        for name, tensors in before.items():
            for key, value in reopened.read(name).items():
                assert torch.equal(value, tensors[key]), (name, key)


def test_all_resident_reads_each_shard_once_and_then_never(tmp_path):
    config = multi_block()
    store = Store.create(tmp_path / "store", config)
    plan = make_plan(config, load_profile("ci"), 2, 7, 2)
    assert plan.resident_blocks == config.n_layers
    engine = Engine(store, plan, OptimConfig())
    reads: list[str] = []
    original = store.read
    store.read = lambda name: reads.append(name) or original(name)
    first = engine.train_step(batches(config, 2, seed=1), 1)
    assert sorted(reads) == sorted(store.shard_names())  # every shard exactly once
    assert first.bytes_read == sum(store.shard_bytes(n) for n in store.shard_names())
    reads.clear()
    second = engine.train_step(batches(config, 2, seed=2), 2)
    assert reads == [] and second.bytes_read == 0 and second.bytes_written == 0
    engine.close()


def test_paged_blocks_are_read_once_for_forward_and_once_for_backward(tmp_path):
    config = multi_block()
    store = Store.create(tmp_path / "store", config)
    engine = Engine(store, plan_for(config, resident_blocks=2, prefetch_depth=1), OptimConfig())
    reads: list[str] = []
    original = store.read
    store.read = lambda name: reads.append(name) or original(name)
    engine.train_step(batches(config, 4, seed=1), 1)  # four micro-batches, still one read per pass
    for i in range(config.n_layers):
        expected = 1 if i < 2 else 2
        assert reads.count(block_shard(i)) == expected, i
        assert reads.count(optim_shard(block_shard(i))) == 1
    engine.close()


def in_memory_loss(model: Transformer, windows: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    with torch.no_grad():
        losses = [F.cross_entropy(model(x).flatten(0, 1), y.flatten()) for x, y in windows]
    return float(torch.stack(losses).mean())


def greedy_full_sequence(model: Transformer, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding with no cache: every token is the argmax of a full-sequence forward."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("config_name", ["multi", "multi-tied-dense-embed"])
@pytest.mark.parametrize("paged", [False, True])
def test_evaluation_generation_and_training_go_through_the_public_api(tmp_path, config_name, paged):
    config = CONFIGS[config_name]
    optim = OptimConfig(lr_spectral=0.05, lr_dense=0.01)
    store = Store.create(tmp_path / "store", config, seed=7)
    plan = plan_for(config, resident_blocks=1, prefetch_depth=1) if paged else plan_for(config)
    assert plan.paging == paged
    model = Transformer(config, seed=7)
    windows = batches(config, 2, seed=11)
    prompt = [3, 1, 4, 1, 5, 9, 2]
    with Engine(store, plan, optim) as engine:
        assert engine.evaluate(windows) == pytest.approx(in_memory_loss(model, windows), abs=1e-5)
        tokens = windows[0][0]
        with torch.no_grad():
            torch.testing.assert_close(engine.forward(tokens), model(tokens), rtol=0, atol=1e-5)
        # The cached forward continues a sequence: its last logits equal the full sequence's.
        cache = engine.new_cache()
        engine.forward(torch.tensor([prompt[:-1]]), cache)
        last = engine.forward(torch.tensor([prompt[-1:]]), cache, last_only=True)
        assert cache.length == len(prompt) and last.shape == (1, 1, config.vocab_size)
        torch.testing.assert_close(last[0, -1], engine.forward(torch.tensor([prompt]))[0, -1], rtol=0, atol=1e-5)
        assert generate(engine, prompt, max_new_tokens=12, temperature=0) == greedy_full_sequence(model, prompt, 12)

        reference = InMemoryStep(model, optim)
        micro = batches(config, 2, seed=12)
        assert engine.train_step(micro, 1).loss == pytest.approx(reference.step(micro), abs=1e-5)
        # Evaluation and generation see the updated weights, resident or written back.
        assert engine.evaluate(windows) == pytest.approx(in_memory_loss(model, windows), abs=1e-5)
        assert generate(engine, prompt, max_new_tokens=12, temperature=0) == greedy_full_sequence(model, prompt, 12)
        engine.flush()
    store.commit(1, {})
    assert_store_matches(Store.open(tmp_path / "store"), model, reference, "lm")


def test_an_engine_refuses_a_plan_made_for_another_model(tmp_path):
    store = Store.create(tmp_path / "store", multi_block())
    with pytest.raises(ValueError, match="the plan is for 3 blocks, the store's model has 5"):
        Engine(store, plan_for(multi_block(n_layers=3)))


@pytest.mark.parametrize("activations", ["recompute", "spill"])
def test_a_step_announces_the_phases_it_runs_and_evaluation_announces_none(tmp_path, activations):
    config = multi_block()
    store = Store.create(tmp_path / "store", config)
    events = []
    plan = plan_for(config, activations=activations, resident_blocks=2, prefetch_depth=1)
    with Engine(store, plan, OptimConfig(), on_event=events.append) as engine:
        engine.train_step(batches(config, 2, seed=1), 1)
        phases = [(e.phase, e.block) for e in events if isinstance(e, PhaseEvent)]
        assert {e.step for e in events if isinstance(e, PhaseEvent)} == {1}
        # Forward is announced once, or again after each block's spill; backward per block, as the update
        # phases come between; the head and the embedding run on no block.
        spill = activations == "spill"
        n = config.n_layers
        expected = [p for i in range(n) for p in (("forward", i), ("spill", i))] if spill else [("forward", 0)]
        head_or_embed = [("backward", None), ("optimizer", None), ("retraction", None)]
        expected += head_or_embed
        for i in reversed(range(n)):
            expected += [("spill", i)] * spill + [("backward", i), ("optimizer", i), ("retraction", i)]
        expected += head_or_embed
        assert phases == expected
        computed = [e.block for e in events if isinstance(e, BlockEvent) and e.state == "computing"]
        assert computed == list(range(n)) + list(reversed(range(n)))
        events.clear()
        engine.evaluate(batches(config, 1, seed=2))
        assert events and not any(isinstance(e, PhaseEvent) for e in events)
