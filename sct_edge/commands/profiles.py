"""`sct-edge profiles [NAME]`: the shipped device profiles in a table, or one profile in full."""

from __future__ import annotations

import argparse
import json

from sct_edge.engine.profile import load_profile, shipped_profiles
from sct_edge.model.accounting import format_bytes


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("profiles", help="list the device budget profiles, or show one in full")
    parser.add_argument("name", nargs="?", help="a profile name or TOML path to show in full (default: list all)")
    parser.add_argument("--json", action="store_true", help="JSON instead of text (one object per profile)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.name is None:
        profiles = [load_profile(name) for name in shipped_profiles()]
        if args.json:
            for profile in profiles:
                print(json.dumps(profile.to_dict()))
            return 0
        print(f"{'profile':<12}{'device':<8}{'budget':>10}{'threads':>9}  {'compute':<10}{'state':<10}{'activations'}")
        for p in profiles:
            print(
                f"{p.name:<12}{p.device:<8}{format_bytes(p.memory_budget):>10}{p.threads:>9}  "
                f"{p.compute_dtype:<10}{p.state_dtype:<10}{p.activations}"
            )
        print("show one in full: sct-edge profiles NAME")
        return 0
    profile = load_profile(args.name)
    if args.json:
        print(json.dumps(profile.to_dict()))
        return 0
    data = profile.to_dict()
    print(f"profile {profile.name} ({profile.path})")
    for key, value in data.items():
        if key in ("name", "path"):
            continue
        if isinstance(value, dict):
            print(f"[{key}]")
            for sub, subvalue in value.items():
                print(f"  {sub:<22}{subvalue}")
        elif key == "memory_budget":
            print(f"{key:<24}{format_bytes(value)} ({value:,} bytes)")
        else:
            print(f"{key:<24}{value}")
    return 0
