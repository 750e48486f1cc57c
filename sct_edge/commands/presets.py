"""`sct-edge presets`: the named architectures with their dense and spectral sizes."""

from __future__ import annotations

import argparse
import json

from sct_edge.model.accounting import GB, count_params, train_bytes
from sct_edge.model.config import PRESETS, RankPolicy


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("presets", help="list the model presets with dense and spectral sizes")
    parser.add_argument("--rank", type=int, default=None,
                        help="show spectral sizes at this rank for every component (default: each preset's own policy)")
    parser.add_argument("--json", action="store_true", help="one JSON object per preset instead of a table")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rows = []
    for name, config in PRESETS.items():
        if args.rank is not None:
            config = config.with_ranks(RankPolicy.uniform(min(args.rank, config.dim)))
        config.validate()
        count = count_params(config)
        rows.append({
            "name": name, "layers": config.n_layers, "dim": config.dim, "ffn": config.ffn_dim,
            "heads": config.n_heads, "kv_heads": config.n_kv_heads, "vocab": config.vocab_size,
            "ranks": {c: getattr(config.ranks, c) for c in ("attn", "mlp", "embed", "head")},
            "dense_params": count.dense_total, "stored_params": count.stored_total,
            "dense_train_bytes": train_bytes(count.dense_total), "sct_train_bytes": train_bytes(count.stored_total),
        })
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    header = f"{'preset':<14}{'layers':>7}{'dim':>7}{'heads':>8}{'ranks a/m/e/h':>18}{'dense params':>17}" \
             f"{'stored params':>16}{'dense+Adam':>13}{'SCT+Adam':>11}"
    print(header)
    for r in rows:
        ranks = "/".join("-" if v is None else str(v) for v in r["ranks"].values())
        print(f"{r['name']:<14}{r['layers']:>7}{r['dim']:>7}{r['heads']:>5}/{r['kv_heads']:<2}{ranks:>18}"
              f"{r['dense_params']:>17,}{r['stored_params']:>16,}"
              f"{r['dense_train_bytes'] / GB:>10,.1f} GB{r['sct_train_bytes'] / GB:>8,.2f} GB")
    print("ranks: attention / MLP / embedding / LM head ('-' = dense); Adam bytes: 16 a parameter (fp32)")
    return 0
