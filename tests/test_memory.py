"""The accounting reproduces the published figures exactly."""

import json
from pathlib import Path

import pytest

from sct_edge.model.accounting import GB, MB, count_params, mlp_layer_table, published_numbers, train_bytes
from sct_edge.model.config import RankPolicy, get_preset

# The mission's reference file (its name predates the rename); the package keeps a copy of it.
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "reference" / "seed_numbers.json"


@pytest.fixture(scope="module")
def published_figures() -> dict:
    return published_numbers(SHARED if SHARED.exists() else None)


def test_packaged_published_numbers_match_shared_reference():
    if not SHARED.exists():
        pytest.skip("shared/ reference not beside this checkout")
    assert published_numbers() == json.loads(SHARED.read_text())


def test_sct_70b_published_counts(published_figures):
    ref = published_figures["sct_70b_class"]
    count = count_params(get_preset("sct-70b").with_ranks(RankPolicy.uniform(32)))
    assert count.published_dense_equivalent == ref["dense_equivalent_params"] == 77_846_282_240
    assert count.published_spectral == ref["spectral_params_rank32"] == 452_216_320
    assert round(train_bytes(count.published_dense_equivalent) / GB, 1) == ref["dense_adam_gb"] == 1245.5
    assert round(train_bytes(count.published_spectral) / GB, 2) == ref["sct_adam_gb_rank32"] == 7.24
    assert round(count.published_dense_equivalent / count.published_spectral) == ref["compression_rank32"] == 172
    # The Steam Deck's "7,235.5 MB" is the same parameter count × 16 bytes.
    steam_deck = published_figures["steam_deck_step_s"]
    assert round(train_bytes(count.published_spectral) / MB, 1) == steam_deck["memory_mb_estimated"]


def test_llama3_70b_dense_parameters():
    assert count_params(get_preset("llama3-70b")).dense_total == 70_553_706_496


def test_per_mlp_layer_table(published_figures):
    rows = mlp_layer_table(rank=32)
    for row, ref in zip(rows, published_figures["per_mlp_layer_rank32_mb"], strict=True):
        assert (row.n_in, row.n_out) == (ref["in"], ref["out"])
        assert round(row.dense_train_bytes / MB, 1 if ref["dense_adam_mb"] < 100 else 0) == ref["dense_adam_mb"]
        assert round(row.sct_train_bytes / MB, 1) == ref["sct_mb"]
        assert round(row.compression) == ref["compression"]


def test_counts_match_instantiated_model():
    """The formulas agree with the parameters a real model allocates, dense and spectral, tied and untied."""
    from sct_edge.model.transformer import Transformer

    for name in ("tiny", "smollm2-135m"):
        config = get_preset(name)
        if name == "smollm2-135m":
            ranks = RankPolicy(attn=16, mlp=24, embed=40, head=None, overrides={"layers.2.mlp.up": 7})
            config = config.with_ranks(ranks)
        model = Transformer(config, device="meta")
        assert sum(p.numel() for p in model.parameters()) == count_params(config).stored_total
        dense = Transformer(config, spectral=False, device="meta")
        assert sum(p.numel() for p in dense.parameters()) == count_params(config).dense_total
