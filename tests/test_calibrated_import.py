"""Calibrated conversion: output-aware truncation, ranks spread by size, sequential statistics, block-wise
recovery and whole-model distillation (`sct_edge.convert.output_aware`, `calibration`, `recovery`,
`distillation`, and `sct-edge import --calibrate`)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TOY_CORPUS
from test_import_export import TEXT, hf_config, hf_weights, reference_logits, store_logits, write_hf_dir

from sct_edge.cli import main
from sct_edge.convert.calibration import STAGES, CalibrationConfig, calibration_text, convert_blocks
from sct_edge.convert.distillation import DistillConfig
from sct_edge.convert.exporter import in_memory_model
from sct_edge.convert.importer import ImportPolicy, import_model, open_source
from sct_edge.convert.output_aware import (
    CovarianceRoot,
    RankCandidate,
    allocate_ranks,
    output_aware_factors,
    output_spectrum,
    uniform_rank,
)
from sct_edge.convert.recovery import RecoveryConfig
from sct_edge.engine.profile import load_profile
from sct_edge.errors import SctError
from sct_edge.model.config import RankPolicy
from sct_edge.model.retraction import orthonormality_error
from sct_edge.model.transformer import Transformer, dense_config, rope_tables
from sct_edge.store.shard_names import optim_shard
from sct_edge.store.store import Store, block_shard

gguf = pytest.importorskip("gguf")

CALIB_TEXT = " ".join(
    f"{sentence} Item {i} of the list is {i * 37 % 101}." for i in range(60) for sentence in TOY_CORPUS[:3]
)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: a second torch thread only adds wake-up latency (tens of times slower on a busy machine);
    conftest's autouse fixture restores the thread count afterwards."""
    torch.set_num_threads(1)


@pytest.fixture
def model_dir(tmp_path, toy_bpe):
    config = hf_config(toy_bpe.get_vocab_size())
    weights = hf_weights(config)
    data = write_hf_dir(tmp_path / "hf-model", config, weights, toy_bpe)
    (tmp_path / "calib.txt").write_text(CALIB_TEXT)
    return tmp_path / "hf-model", weights, data


def calibration(tmp_path, **kwargs) -> CalibrationConfig:
    return CalibrationConfig(paths=[tmp_path / "calib.txt"], tokens=1024, seq_len=32, **kwargs)


def anisotropic_inputs(n_in: int, n_tokens: int, seed: int = 0) -> torch.Tensor:
    """in x tokens with a decaying spread per direction, as real activations have."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n_in, n_in, generator=g, dtype=torch.float64))
    scales = torch.logspace(1, -2, n_in, dtype=torch.float64)
    return basis @ (scales[:, None] * torch.randn(n_in, n_tokens, generator=g, dtype=torch.float64))


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w.to(torch.float64) - w_hat.to(torch.float64)) @ x).norm())


def dense_of(f) -> torch.Tensor:
    return (f.V.to(torch.float64) * f.s.to(torch.float64)) @ f.U.to(torch.float64).T


# ------------------------------------------------------------------------------------------ closed form


@pytest.mark.parametrize("shape", [(12, 9), (9, 12)])  # wider output (SVD of W S), narrower (eigh of W C Wᵀ)
@pytest.mark.parametrize("n_tokens", [60, 5])  # C full rank, then singular
def test_closed_form_is_the_optimum_and_beats_plain_svd(shape, n_tokens):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g, dtype=torch.float64)
    x = anisotropic_inputs(shape[1], n_tokens)
    k = 3
    spectrum = output_spectrum(w, CovarianceRoot(x @ x.T))
    f = output_aware_factors(w, spectrum, k)
    ours = output_error(w, dense_of(f), x)

    # the optimum by another road: Eckart-Young on W X, mapped back by the pseudo-inverse of X
    a, sigma, bt = torch.linalg.svd(w @ x, full_matrices=False)
    optimum = float(sigma[k:].pow(2).sum().sqrt())
    via_pinv = ((a[:, :k] * sigma[:k]) @ bt[:k]) @ torch.linalg.pinv(x)
    assert output_error(w, via_pinv, x) == pytest.approx(optimum, rel=1e-6)
    assert ours == pytest.approx(optimum, rel=1e-5, abs=1e-6)
    assert f.output_energy == pytest.approx(1 - optimum**2 / float((w @ x).norm() ** 2), abs=1e-6)
    assert f.weight_energy == pytest.approx(float(dense_of(f).norm() ** 2 / w.norm() ** 2), rel=1e-5)

    # brute force: alternating least squares on rank-k products A B from random starts finds nothing better
    best = float("inf")
    for seed in range(2):
        a_ = torch.randn(shape[0], k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        for _ in range(300):
            b_ = torch.linalg.lstsq(a_, w @ x).solution @ torch.linalg.pinv(x)  # best B for this A
            a_ = torch.linalg.lstsq((b_ @ x).T, (w @ x).T).solution.T  # best A for this B
        best = min(best, output_error(w, a_ @ b_, x))
    assert ours <= best * (1 + 1e-6) + 1e-9
    assert best == pytest.approx(optimum, rel=1e-4, abs=1e-6)

    plain = torch.linalg.svd(w, full_matrices=False)
    plain_w = (plain.U[:, :k] * plain.S[:k]) @ plain.Vh[:k]
    assert ours < output_error(w, plain_w, x)


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (16, 16)])
def test_factors_are_orthonormal(shape):
    g = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=g)
    for n_tokens in (100, 7):  # the second makes C singular
        x = anisotropic_inputs(shape[1], n_tokens)
        spectrum = output_spectrum(w, CovarianceRoot(x @ x.T))
        for k in (1, 5, min(shape)):
            f = output_aware_factors(w, spectrum, k)
            assert f.U.shape == (shape[1], k) and f.V.shape == (shape[0], k) and f.s.shape == (k,)
            assert orthonormality_error(f.U) < 1e-6 and orthonormality_error(f.V) < 1e-6
            assert bool((f.s[:-1] >= f.s[1:]).all()) and bool((f.s >= 0).all())


def test_ranks_are_spread_by_output_error_per_stored_number():
    flat = torch.full((32,), 1 / 32, dtype=torch.float64)  # every direction matters as much
    steep = torch.tensor([0.9] + [0.1 / 31] * 31, dtype=torch.float64)  # one direction carries 90 %
    candidates = [RankCandidate("flat", (32, 32), flat), RankCandidate("steep", (32, 32), steep)]
    budget = 2 * 32 * 32 // 2  # half the dense numbers
    ranks = allocate_ranks(candidates, budget)
    assert sum(r * 65 for r in ranks.values()) <= budget
    assert budget - sum(r * 65 for r in ranks.values()) < 65  # nothing that fits is left unspent
    floor = uniform_rank((32, 32), 0.5) // 2
    assert ranks["steep"] == floor and ranks["flat"] > ranks["steep"]
    with pytest.raises(SctError, match="does not cover the rank floors"):
        allocate_ranks(candidates, 10)


# ----------------------------------------------------------------------------------- through the model


def test_full_rank_calibrated_import_reproduces_the_dense_logits(tmp_path, model_dir, toy_bpe):
    directory, weights, data = model_dir
    result = import_model(directory, tmp_path / "store", ImportPolicy(full_rank=True),
                          calibration=calibration(tmp_path, recovery=None))
    ids = toy_bpe.encode(TEXT).ids
    reference = reference_logits(weights, data, ids)
    logits = store_logits(tmp_path / "store", ids)
    assert (logits - reference).abs().max() < 1e-4 * reference.abs().max()
    blocks = [row for row in result.report if row["matrix"].startswith("layers.")]
    assert {row["svd"] for row in blocks} == {"output-aware"}
    assert all(row["output_energy"] == pytest.approx(1.0, abs=1e-9) for row in blocks)
    assert all(b["error_before"] < 1e-5 for b in result.blocks)


def whole_model_covariances(model: Transformer, tokens: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """Σ x xᵀ of the input of each block's q, o, gate and down, by hooks on a model held whole in RAM."""
    found: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for layer, block in enumerate(model.layers):
        for stage, names in STAGES:
            part, name = names[0].split(".")

            def hook(module, args, key=(layer, stage)):
                flat = args[0].detach().to(torch.float64).flatten(0, 1)
                found[key] = found.get(key, 0) + flat.T @ flat

            hooks.append(getattr(getattr(block, part), name).register_forward_pre_hook(hook))
    with torch.no_grad():
        model(tokens)
    for h in hooks:
        h.remove()
    return found


@pytest.mark.parametrize("sequential", [True, False])
def test_streamed_statistics_equal_a_whole_model_reference(tmp_path, model_dir, sequential):
    """What the factors were computed from, block by block, equals a reference taken by hooks on a whole model in
    RAM: the input covariance C of q/k/v, o and gate/up, and for down (ffn wider than dim) its output Gram
    W C Wᵀ, built from the outputs without C ever being formed."""
    directory, _, _ = model_dir
    source = open_source(directory)
    tokens = calibration_text([tmp_path / "calib.txt"], source.tokenizer, 512, 32).tokens
    streamed, factors = {}, {}

    def keep(result):
        for r in result.matrices:
            factors[r.path] = (r.U, r.s, r.V)

    teacher = convert_blocks(source, tokens, lambda path, spectrum, shape: 5, sequential=sequential, on_block=keep,
                             on_statistics=lambda layer, stage, stats: streamed.__setitem__((layer, stage), stats))

    dense = Transformer(dense_config(source.config), spectral=False, device="meta")
    dense.load_state_dict(dict(source.tensors()), assign=True)
    with torch.no_grad():  # what it returns is the dense model's last hidden states: distillation's teacher
        h = dense.embed(tokens)
        for block in dense.layers:
            h = block(h, *rope_tables(dense.config, torch.arange(tokens.shape[1])))
    torch.testing.assert_close(teacher, h, rtol=1e-5, atol=1e-5)
    converted = Transformer(source.config.with_ranks(RankPolicy(attn=5, mlp=5, embed=None, head=None)), device="meta")
    state = {name: t for name, t in source.tensors() if not any(name == f"{p}.weight" for p in factors)}
    for path, (U, s, V) in factors.items():
        state.update({f"{path}.U": U, f"{path}.s": s, f"{path}.V": V})
    converted.load_state_dict(state, assign=True)
    reference = whole_model_covariances(converted if sequential else dense, tokens)
    assert set(reference) == set(streamed)
    for (layer, stage), c in reference.items():
        stats = streamed[(layer, stage)]
        if stage == "down_in":  # 48 inputs, 32 outputs: measured on its outputs, C never formed
            assert stats.covariance is None and set(stats.grams) == {"mlp.down"}
            w = source.tensor(f"layers.{layer}.mlp.down.weight").to(torch.float64)  # the dense W it measured
            got, want = stats.grams["mlp.down"], w @ c @ w.T
        else:
            assert not stats.grams
            got, want = stats.covariance, c
        assert got.dtype == torch.float64
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())), (layer, stage)
    if sequential:  # block 1's statistics differ from the dense model's: it is fitted to block 0's errors
        dense_c = whole_model_covariances(dense, tokens)
        assert not torch.allclose(streamed[(1, "attn_in")].covariance, dense_c[(1, "attn_in")], rtol=1e-3)
        w = source.tensor("layers.1.mlp.down.weight").to(torch.float64)
        dense_gram = w @ dense_c[(1, "down_in")] @ w.T
        assert not torch.allclose(streamed[(1, "down_in")].grams["mlp.down"], dense_gram, rtol=1e-3)


def test_recovery_lowers_every_block_error_and_keeps_the_factors_orthonormal(tmp_path, model_dir):
    directory, _, _ = model_dir
    result = import_model(directory, tmp_path / "store", ImportPolicy(rank=6),
                          calibration=calibration(tmp_path, recovery=RecoveryConfig(steps=40, lr=3e-3)))
    assert len(result.blocks) == 2
    for block in result.blocks:
        assert block["error_after"] < 0.9 * block["error_before"]
        assert block["last_loss"] < block["first_loss"]
    with Store.open(tmp_path / "store") as store:
        shard = store.read(block_shard(0))
        imported = store.extra["import"]
    for key, t in shard.items():
        if key.endswith((".U", ".V")):
            assert orthonormality_error(t) < 1e-5, key
    assert imported["method"] == "output-aware" and imported["calibration"]["tokens"] == 1024
    assert imported["calibration"]["statistics"] == "sequential" and imported["recovery"]["steps"] == 40
    assert len(imported["calibration"]["files"][0]["sha256"]) == 64


def kl_to_dense(store_path, source, tokens: torch.Tensor) -> float:
    """Mean KL(p_dense ‖ p_store) a token over the sequences `tokens`, the whole models in RAM."""
    dense = Transformer(dense_config(source.config), spectral=False, device="meta")
    dense.load_state_dict(dict(source.tensors()), assign=True)
    with Store.open(store_path) as store, torch.no_grad():
        student = in_memory_model(store)(tokens).flatten(0, 1).log_softmax(-1)
        teacher = dense(tokens).flatten(0, 1).log_softmax(-1)
    return float((teacher.exp() * (teacher - student)).sum(-1).mean())


def test_distillation_trains_the_factors_towards_the_dense_model_and_leaves_the_rest(tmp_path, model_dir):
    directory, _, _ = model_dir
    source = open_source(directory)
    distill = DistillConfig(steps=60, lr=1e-2, batch_tokens=128, warmup=3)
    results = {}
    for name, d in (("converted", None), ("distilled", distill)):
        results[name] = import_model(directory, tmp_path / name, ImportPolicy(rank=6), calibration=calibration(
            tmp_path, recovery=None, distill=d, profile=load_profile("ci")))
    tokens = calibration_text([tmp_path / "calib.txt"], source.tokenizer, 1024, 32).tokens
    before, after = (kl_to_dense(tmp_path / name, source, tokens) for name in ("converted", "distilled"))
    assert after < 0.7 * before, (before, after)
    # The engine's loss is the KL divergence of the batch it drew: its first equals the undistilled model's.
    first = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(0))[:4]
    record = results["distilled"].distillation
    assert record["first_loss"] == pytest.approx(kl_to_dense(tmp_path / "converted", source, tokens[first]), rel=1e-4)
    assert record["last_loss"] < record["first_loss"] and record["steps"] == 60
    with Store.open(tmp_path / "converted") as old, Store.open(tmp_path / "distilled") as new:
        assert new.step == 0 and new.extra["import"]["distillation"]["steps"] == 60
        for name in new.weight_shard_names():
            was, now = old.read(name), new.read(name)
            for key, t in now.items():
                if key.endswith((".U", ".s", ".V")):
                    assert not torch.equal(t, was[key]), (name, key)  # every factor trained
                    if not key.endswith(".s"):
                        assert orthonormality_error(t) < 1e-5, (name, key)
                else:
                    assert torch.equal(t, was[key]), (name, key)  # norms, embedding and head as imported
            for key, t in new.read(optim_shard(name)).items():
                assert not t.any(), (name, key)  # a fine-tune starts from fresh moments


def test_a_budget_too_small_to_distill_is_refused_before_the_conversion(tmp_path, model_dir):
    directory, _, _ = model_dir
    before = sorted(p.name for p in tmp_path.iterdir())
    phases = []
    with pytest.raises(SctError, match=r"hf-model: distillation: budget 1\.00 MiB is below the .* try --budget"):
        import_model(directory, tmp_path / "store", ImportPolicy(rank=6), calibration=calibration(
            tmp_path, distill=DistillConfig(steps=2), profile=load_profile("ci", "1MiB")),
            on_progress=lambda phase, done, total: phases.append(phase))
    assert not phases  # no block was converted
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_calibrated_import_keeps_more_of_the_model_than_plain_svd(tmp_path, model_dir, toy_bpe):
    directory, weights, data = model_dir
    ids = toy_bpe.encode(CALIB_TEXT[-400:]).ids[:60]
    reference = reference_logits(weights, data, ids)
    errors = {}
    for name, calib in (("plain", None), ("calibrated", calibration(tmp_path, recovery=None))):
        import_model(directory, tmp_path / name, ImportPolicy(params_ratio=0.5), calibration=calib)
        errors[name] = float((store_logits(tmp_path / name, ids) - reference).norm())
    assert errors["calibrated"] < errors["plain"]


# ------------------------------------------------------------------------------------ ranks by size, CLI


def test_params_ratio_and_size_budgets(tmp_path, model_dir):
    directory, _, _ = model_dir
    result = import_model(directory, tmp_path / "ratio", ImportPolicy(params_ratio=0.6),
                          calibration=calibration(tmp_path, recovery=None))
    blocks = [row for row in result.report if row["matrix"].startswith("layers.")]
    stored = sum(r["rank"] * (sum(r["shape"]) + 1) for r in blocks)
    dense = sum(r["shape"][0] * r["shape"][1] for r in blocks)
    assert 0.6 * dense - max(sum(r["shape"]) + 1 for r in blocks) < stored <= 0.6 * dense
    for r in blocks:  # the floor: at least half the uniform rank
        assert r["rank"] >= uniform_rank(tuple(r["shape"]), 0.6) // 2

    with Store.open(tmp_path / "ratio") as store:
        target = store.committed_bytes()
    import_model(directory, tmp_path / "size", ImportPolicy(size=target))
    with Store.open(tmp_path / "size") as store:
        size = store.committed_bytes()
    assert 0.9 * target < size <= target
    with pytest.raises(SctError, match="--size 200,000 bytes is too small"):
        import_model(directory, tmp_path / "small", ImportPolicy(size=200_000))


def test_cli_calibrated_import_and_inspect(tmp_path, model_dir, capsys):
    directory, _, _ = model_dir
    store = tmp_path / "store"
    argv = ["import", str(directory), str(store), "--params-ratio", "0.8", "--calibrate", str(tmp_path / "calib.txt"),
            "--calib-tokens", "512", "--calib-seq-len", "32", "--recover-steps", "5", "--distill-steps", "3",
            "--threads", "1", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "calibrated on 512 tokens" in out and "after 5 recovery steps" in out
    assert "distilled 3 steps: KL divergence to the dense model" in out
    assert main(["inspect", str(store)]) == 0
    out = capsys.readouterr().out
    assert "output_energy" in out and "output-aware" in out and "block" in out
    assert "distilled  3 steps of 1024 tokens" in out
    assert main(["inspect", str(store), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["import"]["method"] == "output-aware" and len(info["import"]["blocks"]) == 2


def test_bad_input_is_one_line_and_leaves_nothing(tmp_path, model_dir, capsys):
    directory, _, _ = model_dir
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "short.txt").write_text("Too short.")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("keep me")
    base = ["import", str(directory), "--quiet"]
    cases = [
        (["--rank", "4", "--calibrate", str(tmp_path / "missing.txt")], "missing.txt: no such calibration text file"),
        (["--rank", "4", "--calibrate", str(tmp_path / "empty.txt")], "empty.txt: the calibration text is empty"),
        (["--rank", "4", "--calibrate", str(tmp_path / "short.txt")], "whole sequences of 64, fewer than the 256"),
        (["--params-ratio", "0", "--calibrate", str(tmp_path / "calib.txt")], "--params-ratio must be in (0, 1]"),
        (["--params-ratio", "1.2"], "--params-ratio must be in (0, 1]"),
        (["--rank", "4", "--recover-steps", "3"], "--recover-steps needs --calibrate"),
        (["--rank", "4", "--distill-steps", "3"], "--distill-steps needs --calibrate"),
        (["--rank", "4", "--calibrate", str(tmp_path / "calib.txt"), "--distill-steps", "-1"],
         "--distill-steps must be 0 or more"),
        (["--rank", "4", "--calibrate", str(tmp_path / "calib.txt"), "--distill-steps", "2", "--distill-lr", "0"],
         "--distill-lr must be positive"),
        (["--dense", "--calibrate", str(tmp_path / "calib.txt"), "--calib-tokens", "512", "--distill-steps", "2"],
         "every attention and MLP matrix stays dense here"),
    ]
    for flags, message in cases:
        assert main(base[:2] + [str(tmp_path / "new")] + base[2:] + flags) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sct-edge: error: ") and message in err and "\n" not in err, err
    assert main(base[:2] + [str(tmp_path / "taken")] + base[2:] + ["--rank", "4", "--calibrate",
                                                                  str(tmp_path / "calib.txt")]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.txt", "empty.txt", "hf-model", "short.txt", "taken"]
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["notes.txt"]


def test_calibration_text_is_whole_sequences_with_digests(tmp_path, model_dir):
    import hashlib

    directory, _, _ = model_dir
    source = open_source(directory)
    text = calibration_text([tmp_path / "calib.txt"], source.tokenizer, 100, 32)
    assert text.tokens.shape == (3, 32) and text.n_tokens == 96
    ids = source.tokenizer.encode(CALIB_TEXT)
    last = len(ids) - 32
    assert [row.tolist() for row in text.tokens] == [ids[:32], ids[last // 2 : last // 2 + 32], ids[last:]]
    assert text.files[0]["sha256"] == hashlib.sha256(CALIB_TEXT.encode()).hexdigest()


def test_calibration_sequences_come_from_every_file(tmp_path, model_dir):
    """Two files share the sequences equally; a file too short for its share gives the rest to the other."""
    directory, _, _ = model_dir
    source = open_source(directory)
    (tmp_path / "short.txt").write_text("A short text, room for one sequence.")
    short_ids = source.tokenizer.encode((tmp_path / "short.txt").read_text())
    long_ids = source.tokenizer.encode(CALIB_TEXT)
    seq = len(short_ids)
    assert len(long_ids) // seq >= 5
    text = calibration_text([tmp_path / "calib.txt", tmp_path / "short.txt"], source.tokenizer, 4 * seq, seq)
    rows = [row.tolist() for row in text.tokens]
    assert rows[3] == short_ids  # the short file's one sequence; the long one takes the other three
    assert rows[0] == long_ids[:seq] and rows[2] == long_ids[-seq:]
    assert [f["path"] for f in text.files] == [str(tmp_path / "calib.txt"), str(tmp_path / "short.txt")]


@pytest.mark.parametrize("total,capacities,expected", [
    (6, [10, 10, 10], [2, 2, 2]),
    (7, [10, 10, 10], [3, 2, 2]),
    (7, [1, 10, 0], [1, 6, 0]),
    (5, [2, 2, 1], [2, 2, 1]),
])
def test_equal_shares(total, capacities, expected):
    from sct_edge.convert.calibration import equal_shares

    assert equal_shares(total, capacities) == expected


@pytest.mark.parametrize("length,seq_len,count", [(100, 10, 10), (101, 10, 3), (37, 5, 7), (64, 64, 1)])
def test_spread_starts_do_not_overlap_and_reach_the_end(length, seq_len, count):
    from sct_edge.convert.calibration import spread_starts

    starts = spread_starts(length, seq_len, count)
    assert len(starts) == count and starts[0] == 0
    assert all(b - a >= seq_len for a, b in zip(starts[:-1], starts[1:], strict=True))
    assert count == 1 or starts[-1] == length - seq_len


def test_jsonl_calibration_reads_examples_as_run_does(tmp_path, model_dir):
    from test_import_export import TEMPLATE

    directory, _, _ = model_dir
    source = open_source(directory)
    chat = {"messages": [{"role": "user", "content": "What is the capital of France?"},
                         {"role": "assistant", "content": "Paris."}]}
    (tmp_path / "calib.jsonl").write_text("\n".join(json.dumps(chat) for _ in range(40)) + "\n")
    text = calibration_text([tmp_path / "calib.jsonl"], source.tokenizer, 64, 64, TEMPLATE)
    decoded = source.tokenizer.decode(text.tokens[0].tolist(), skip_special_tokens=False)
    assert decoded.startswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(SctError, match="bad.jsonl:2"):
        calibration_text([tmp_path / "bad.jsonl"], source.tokenizer, 64, 32, TEMPLATE)


@pytest.mark.realmodel
def test_smollm2_block_keeps_its_outputs_better_than_plain_svd(tmp_path, smollm2_gguf):
    """On the real model's first block and real English text, every matrix's output error at the rank that stores
    60 % of its dense numbers is below the plain SVD's at the same rank, by the covariance the import measured."""
    from pydoc_data.topics import topics

    from sct_edge.convert.importer import first_layers
    from sct_edge.model.spectral import truncated_svd

    (tmp_path / "calib.txt").write_text(topics["assignment"] + topics["compound"], encoding="utf-8")
    source = first_layers(open_source(smollm2_gguf), 1)
    tokens = calibration_text([tmp_path / "calib.txt"], source.tokenizer, 1024, 128).tokens
    covariances, ours = {}, {}

    def keep(result):
        ours.update({r.path: (r.U, r.s, r.V) for r in result.matrices})

    convert_blocks(source, tokens, lambda path, spectrum, shape: uniform_rank(shape, 0.6), on_block=keep,
                   on_statistics=lambda layer, stage, stats: covariances.__setitem__(stage, stats.covariance))
    # down is measured on its outputs (its C is never formed): take its C from hooks on the converted block
    ranks = {path.split(".", 2)[2]: U.shape[1] for path, (U, _, _) in ours.items()}
    converted = Transformer(source.config.with_ranks(RankPolicy(attn=None, mlp=None, embed=None, head=None,
                                                                overrides={f"layers.0.{k}": r
                                                                           for k, r in ranks.items()})),
                            device="meta")
    state = {name: t for name, t in source.tensors() if not any(name == f"{p}.weight" for p in ours)}
    for path, (U, s, V) in ours.items():
        state.update({f"{path}.U": U, f"{path}.s": s, f"{path}.V": V})
    converted.load_state_dict(state, assign=True)
    assert covariances["down_in"] is None
    covariances["down_in"] = whole_model_covariances(converted, tokens)[(0, "down_in")]
    stage_of = {name: stage for stage, names in STAGES for name in names}
    for path, (U, s, V) in ours.items():
        w = source.tensor(f"{path}.weight").to(torch.float64)
        c = covariances[stage_of[path.split(".", 2)[2]]]

        def error(w_hat, w=w, c=c):
            d = w - w_hat.to(torch.float64)
            return float(torch.trace(d @ c @ d.T))

        pU, ps, pV = truncated_svd(w, rank=U.shape[1])
        assert error((V * s) @ U.T) < 0.9 * error((pV * ps) @ pU.T), path


# ------------------------------------------------------------------------------------ memory: Grams, spilling


@pytest.mark.parametrize("shape", [(9, 24), (24, 9), (16, 16)])  # narrow (down), wide (gate/up), square
def test_output_gram_path_equals_the_covariance_path(shape):
    """Σ (W a)(W a)ᵀ over float32 chunks is W C Wᵀ, and the spectrum and factors from it are the C path's."""
    from sct_edge.convert.calibration import StageStatistics, measured_on_outputs
    from sct_edge.convert.output_aware import gram_spectrum, weight_norm2

    g = torch.Generator().manual_seed(3)
    w = torch.randn(shape, generator=g)
    x = anisotropic_inputs(shape[1], 200).float().T.reshape(8, 25, shape[1])  # sequences x seq_len x in
    c, gram = 0, 0
    for part in x.split(3):  # the chunked float32 GEMMs with float64 totals, as staged_forward takes them
        flat = part.flatten(0, 1)
        c = c + (flat.T @ flat).to(torch.float64)
        y = flat @ w.T
        gram = gram + (y.T @ y).to(torch.float64)
    w64 = w.to(torch.float64)
    assert torch.allclose(gram, w64 @ c @ w64.T, rtol=1e-5, atol=1e-5 * float(gram.abs().max()))
    assert measured_on_outputs([shape]) == (shape[0] < shape[1])
    assert StageStatistics().covariance is None
    k = 4
    via_c = output_spectrum(w, CovarianceRoot(c))
    via_gram = gram_spectrum(gram, weight_norm2(w))
    assert torch.allclose(via_gram.sigma[:k], via_c.sigma[:k], rtol=1e-5)
    a, b = output_aware_factors(w, via_c, k), output_aware_factors(w, via_gram, k)
    assert torch.allclose(dense_of(a), dense_of(b), atol=1e-4 * float(w.abs().max()))
    assert a.output_energy == pytest.approx(b.output_energy, abs=1e-6)
    assert via_c.weight_norm2 == pytest.approx(float((w64**2).sum()), rel=1e-12)


def test_a_spilled_import_equals_the_in_ram_import_and_leaves_nothing(tmp_path, model_dir):
    from sct_edge.convert.calibration import memory_plan

    directory, _, _ = model_dir
    calib = dict(recovery=RecoveryConfig(steps=3, lr=3e-3))
    before = sorted(p.name for p in tmp_path.iterdir())
    ram = import_model(directory, tmp_path / "ram", ImportPolicy(params_ratio=0.5),
                       calibration=calibration(tmp_path, spill=False, **calib))
    # a budget with room for the model but not for its activation streams: they go to disk
    source = open_source(directory)
    plan = memory_plan(source.config, 1024, 32, None)
    disk = import_model(directory, tmp_path / "disk", ImportPolicy(params_ratio=0.5),
                        calibration=calibration(tmp_path, budget=plan.fixed + plan.streams // 2, **calib))
    assert ram.calibration_memory["spilled"] is False and disk.calibration_memory["spilled"] is True
    assert [b["error_after"] for b in disk.blocks] == [b["error_after"] for b in ram.blocks]
    with Store.open(tmp_path / "ram") as a, Store.open(tmp_path / "disk") as b:
        for name in [block_shard(0), block_shard(1)]:
            ta, tb = a.read(name), b.read(name)
            assert set(ta) == set(tb)
            for key in ta:
                assert torch.equal(ta[key], tb[key]), (name, key)
        assert b.extra["import"]["calibration"]["memory"]["spilled"] is True
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*before, "disk", "ram"])  # no staging, no spill


def test_spilled_streams_are_file_backed_and_unlinked(tmp_path):
    from sct_edge.convert.calibration import Activations

    streams = Activations(tmp_path / "spill")
    t = streams.empty((3, 4, 5))
    t[:] = 2.0
    assert float(t.sum()) == 120.0 and streams.spilled
    assert list((tmp_path / "spill").iterdir()) == []  # the mapping holds the data, the name is gone
    (tmp_path / "a-file").write_text("not a directory")
    with pytest.raises(SctError, match="cannot spill 0 MiB of activations there"):
        Activations(tmp_path / "a-file" / "spill").empty((2, 2))


def test_a_budget_too_small_is_one_line_and_leaves_nothing(tmp_path, model_dir, capsys):
    directory, _, _ = model_dir
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = ["import", str(directory), str(tmp_path / "store"), "--rank", "4", "--calibrate",
            str(tmp_path / "calib.txt"), "--calib-tokens", "512", "--calib-seq-len", "32", "--recover-steps", "0",
            "--quiet"]
    assert main([*argv, "--budget", "100MiB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sct-edge: error: ") and "\n" not in err, err
    assert str(directory) in err and "memory budget of 0.10 GiB is too small" in err
    assert main([*argv, "--budget", "lots"]) == 2
    assert "--budget 'lots' is not a size" in capsys.readouterr().err
    assert main(argv[:5] + ["--budget", "3GiB"]) == 2  # no --calibrate
    assert "--budget needs --calibrate" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert main([*argv, "--profile", "ci", "--threads", "1"]) == 0  # the ci profile's budget is enough here
    assert "activations in RAM" in capsys.readouterr().out


def test_sigterm_during_an_import_leaves_nothing_behind(tmp_path, model_dir):
    """SIGTERM unwinds like Ctrl-C: the staging directory and the half-made store go, one line, exit 143."""
    directory, _, _ = model_dir
    before = sorted(p.name for p in tmp_path.iterdir())
    # Recovery long enough that the signal lands in the middle of the conversion.
    argv = [sys.executable, "-m", "sct_edge", "import", str(directory), str(tmp_path / "store"), "--rank", "4",
            "--calibrate", str(tmp_path / "calib.txt"), "--calib-tokens", "512", "--calib-seq-len", "32",
            "--recover-steps", "1000000", "--threads", "1", "--quiet"]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".store.import-*")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, child.communicate()
    child.send_signal(signal.SIGTERM)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 143, err
    assert err.strip() == "sct-edge: terminated"
    assert sorted(p.name for p in tmp_path.iterdir()) == before
