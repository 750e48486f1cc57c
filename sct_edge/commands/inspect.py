"""`sct-edge inspect STORE`: what a store holds: model config, committed step, rank policy, every shard with its
size, the bytes on disk and what the same model would take dense; plus the import report when there is one.

Opening does the store's cheap checks only (manifest, sizes, headers); `sct-edge verify` checksums everything.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from sct_edge.model.accounting import count_params, format_bytes
from sct_edge.model.config import COMPONENTS
from sct_edge.store.store import Store


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("inspect", help="show a store's model, step, shards and sizes")
    parser.add_argument("store", metavar="STORE", help="store directory")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.set_defaults(func=run)


def describe(store: Store) -> dict:
    """Everything `inspect` shows, as JSON data."""
    manifest = store.manifest
    config = store.config
    count = count_params(config)
    moment_bytes = store.state_dtype.itemsize
    referenced = {entry["file"] for entry in manifest["shards"].values()} | {manifest["tokenizer"]["file"]}
    on_disk, stale = 0, []
    for item in os.scandir(store.path):
        if item.is_file(follow_symlinks=False):
            on_disk += item.stat().st_size
            if item.name.endswith((".safetensors", ".tmp")) and item.name not in referenced:
                stale.append(item.name)
    shards = [
        {
            "name": name,
            "kind": entry["kind"],
            "version": entry["version"],
            "file": entry["file"],
            "tensors": len(entry["tensors"]),
            "bytes": entry["bytes"],
        }
        for name, entry in manifest["shards"].items()
    ]
    try:
        tokenizer_kind = json.loads(store.tokenizer_json()).get("kind", "unknown")
    except ValueError:
        tokenizer_kind = "unreadable"
    return {
        "path": str(store.path),
        "format_version": manifest["format_version"],
        "written_by": manifest["written_by"],
        "created": manifest["created"],
        "config": config.to_dict(),
        "seed": manifest["seed"],
        "tokenizer": {"kind": tokenizer_kind, **manifest["tokenizer"]},
        "step": store.step,
        "generation": store.generation,
        "state": store.state,
        "state_dtype": manifest["state_dtype"],
        "shards": shards,
        "store_bytes": store.committed_bytes(),
        "disk_bytes": on_disk,
        "stale_files": stale,
        "stored_params": count.stored_total,
        "dense_params": count.dense_total,
        # fp32 weights plus the two AdamW moments in the store's state dtype, as this store keeps them
        "dense_bytes": count.dense_total * (4 + 2 * moment_bytes),
        "import_report": store.extra.get("import_report"),
        "import": store.extra.get("import"),
    }


def run(args: argparse.Namespace) -> int:
    with Store.open(Path(args.store)) as store:
        info = describe(store)
    if args.json:
        print(json.dumps(info))
        return 0
    c = info["config"]
    ranks = c["ranks"]
    tied = "tied" if c["tie_embeddings"] else "untied"
    print(
        f"store      {info['path']} (format {info['format_version']}, {info['written_by']}, created {info['created']})"
    )
    print(
        f"model      {c['name']}: {c['n_layers']} layers, dim {c['dim']}, ffn {c['ffn_dim']}, heads "
        f"{c['n_heads']}/{c['n_kv_heads']} kv, vocab {c['vocab_size']}, {tied} embeddings, {c['attention']} "
        f"attention"
    )
    rank_text = ", ".join(f"{k} {'dense' if ranks[k] is None else ranks[k]}" for k in COMPONENTS)
    extras = []
    if ranks["energy"] is not None:
        extras.append(f"energy {ranks['energy']}")
    if ranks["overrides"]:
        extras.append(f"{len(ranks['overrides'])} per-matrix overrides")
    print(f"ranks      {rank_text}" + (f" ({', '.join(extras)})" if extras else ""))
    print(
        f"tokenizer  {info['tokenizer']['kind']} ({info['tokenizer']['file']}, "
        f"{format_bytes(info['tokenizer']['bytes'])})"
    )
    state_keys = ", ".join(info["state"]) or "none"
    print(f"step       {info['step']} (commit {info['generation']}); trainer state: {state_keys}")
    print(f"optimizer  AdamW moments in {info['state_dtype']}; seed {info['seed']}")
    print()
    print(f"  {'shard':<18}{'kind':<9}{'version':>8}{'tensors':>9}{'size':>12}")
    for row in info["shards"]:
        print(
            f"  {row['name']:<18}{row['kind']:<9}{row['version']:>8}{row['tensors']:>9}{format_bytes(row['bytes']):>12}"
        )
    print()
    print(
        f"store      {len(info['shards'])} shards, {format_bytes(info['store_bytes'])} committed; "
        f"{format_bytes(info['disk_bytes'])} in the directory"
        + (
            f" ({len(info['stale_files'])} leftover files, removed when training resumes)"
            if info["stale_files"]
            else ""
        )
    )
    ratio = info["dense_bytes"] / info["store_bytes"]
    print(
        f"dense      {info['dense_params']:,} parameters dense vs {info['stored_params']:,} stored: "
        f"{format_bytes(info['dense_bytes'])} as fp32 weights + {info['state_dtype']} moments, "
        f"{ratio:,.1f}x the store"
    )
    report = info["import_report"]
    if report:
        print()
        print_import_report(report)
    if info["import"]:
        print_import_method(info["import"])
    return 0


def print_import_method(method: dict) -> None:
    """How the import converted: the method, its calibration, each block's output error before and after
    recovery (as a fraction of what the dense block adds to the residual stream), and the distillation."""
    print()
    print(f"import     {method['method']}" + "".join(f"; note: {n}" for n in method.get("notes", [])))
    calib = method.get("calibration")
    if calib:
        files = ", ".join(f"{f['path']} (sha256 {f['sha256'][:12]})" for f in calib["files"])
        print(f"calibrated {calib['tokens']:,} tokens ({calib['sequences']} x {calib['seq_len']}) of {files}; "
              f"{calib['statistics']} statistics")
        recovery = method.get("recovery")
        steps = "none" if recovery is None else f"{recovery['steps']} steps a block, lr {recovery['lr']:g}"
        print(f"recovery   {steps}")
        print(f"  {'block':<8}{'error before':>14}{'error after':>14}")
        for b in method.get("blocks", []):
            print(f"  {b['block']:<8}{b['error_before']:>14.6f}{b['error_after']:>14.6f}")
        distilled = method.get("distillation")
        if distilled:
            print(f"distilled  {distilled['steps']} steps of {distilled['batch_tokens']} tokens, lr "
                  f"{distilled['lr']:g}: KL divergence to the dense model {distilled['first_loss']:.4f} -> "
                  f"{distilled['last_loss']:.4f} nats a token, {distilled['seconds']:.1f} s")


def print_import_report(report: list[dict]) -> None:
    """The importer's per-matrix table: one row per matrix with its rank, kept (weight) energy and relative
    error, and for a calibrated import the output energy kept on the calibration text."""
    columns = ["shape", "rank", "kept_energy", "rel_error", "svd"]
    if any("output_energy" in row for row in report):  # calibrated: the energy kept of outputs and of weights
        columns.insert(2, "output_energy")
    width = max(len("matrix"), *(len(row["matrix"]) for row in report)) + 2
    print("import report")
    print(f"  {'matrix':<{width}}" + "".join(f"{c:>14}" for c in columns))
    for row in report:
        cells = "".join(f"{_cell(row.get(c)):>14}" for c in columns)
        print(f"  {row['matrix']:<{width}}{cells}")


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list):
        return " x ".join(str(v) for v in value)
    return "-" if value is None else str(value)
