"""`sct-edge eval STORE --text FILE`: perplexity over non-overlapping windows of a text."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from sct_edge.errors import SctError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="loss and perplexity of a store's model on a text file")
    p.add_argument("store", type=Path, help="store directory")
    p.add_argument("--text", type=Path, required=True, help="UTF-8 text file to evaluate on")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window (capped at the model's context)")
    p.add_argument("--batch", type=int, default=4, help="windows per forward pass")
    p.add_argument("--profile", default="steamdeck", help="profile that bounds memory (blocks are paged under it)")
    p.add_argument("--budget", help="override the profile's memory budget, e.g. 1GiB")
    p.add_argument("--json", action="store_true", help="print one JSON object (loss, ppl, tokens, windows)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from sct_edge.convert.tokenizer import tokenizer_from_json
    from sct_edge.engine.process import ProcessSettings, configure_process
    from sct_edge.engine.profile import load_profile
    from sct_edge.store.store import Store
    from sct_edge.train.data import eval_batches
    from sct_edge.train.trainer import inference_engine

    if not args.text.is_file():
        raise SctError(f"{args.text}: no such text file")
    try:
        text = args.text.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SctError(f"{args.text}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    store = Store.open(args.store)
    tokens = np.array(tokenizer_from_json(store.tokenizer_json()).encode(text), dtype=np.int64)
    seq = min(args.seq_len, store.config.max_seq_len)
    windows = list(eval_batches(tokens, seq, args.batch, name=str(args.text)))
    configure_process(ProcessSettings.for_profile(load_profile(args.profile, args.budget)))
    engine = inference_engine(store, args.profile, args.budget, seq)
    try:
        # evaluate() averages per batch; weight by windows so a short last batch counts as what it holds.
        total = sum(engine.evaluate([(x, y)]) * x.shape[0] for x, y in windows)
    finally:
        engine.close()
    n_windows = sum(x.shape[0] for x, _ in windows)
    loss = total / n_windows
    result = {"loss": loss, "ppl": math.exp(loss), "tokens": n_windows * seq, "windows": n_windows, "seq_len": seq}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.text}: loss {loss:.4f}, perplexity {result['ppl']:.2f} over {result['tokens']:,} tokens "
              f"({n_windows} windows of {seq})")
    return 0
