"""Budget profiles: the shipped TOMLs, size strings, every kind of bad profile, the --budget override, the CLI."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest
import torch

from sct_edge.cli import main
from sct_edge.engine.profile import load_profile, parse_size, profile_dirs, resolve_device, shipped_profiles
from sct_edge.errors import SctError

SHIPPED = profile_dirs()[0]
GiB, MiB = 2**30, 2**20


def test_shipped_profiles_load():
    assert shipped_profiles() == ["ci", "m4pro", "rogally", "steamdeck"]
    deck = load_profile("steamdeck")
    assert (deck.device, deck.memory_budget, deck.threads) == ("cpu", 10 * GiB, 4)
    assert deck.battery.pause_below_percent < deck.battery.resume_above_percent
    assert "k10temp" in deck.thermal.sensors
    m4 = load_profile("m4pro")
    assert (m4.device, m4.memory_budget) == ("auto", 32 * GiB)
    ci = load_profile("ci")
    assert (ci.memory_budget, ci.threads) == (1 * GiB, 2)
    ally = load_profile("rogally")
    assert (ally.compute_dtype, ally.state_dtype, ally.memory_budget) == ("bfloat16", "float32", 10 * GiB)


def test_shipped_profiles_document_every_key():
    """Each key of each shipped file has a comment in the block of lines above it."""
    for path in SHIPPED.glob("*.toml"):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if "=" not in line or line.lstrip().startswith("#"):
                continue
            block = []
            for previous in reversed(lines[:number]):
                if not previous.strip() or previous.startswith("["):
                    break
                block.append(previous)
            assert any(p.lstrip().startswith("#") for p in block), f"{path.name}: '{line}' has no comment above it"


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("10GiB", 10 * GiB),
        ("512MiB", 512 * MiB),
        ("1.5GB", 1_500_000_000),
        ("4096", 4096),
        ("1 kib", 1024),
        ("2TB", 2 * 10**12),
        ("0.5GiB", GiB // 2),
        ("7B", 7),
        ("3KB", 3000),
    ],
)
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "-1GiB", "10XB", "1e9", "ten GiB", "1.2.3GB"])
def test_parse_size_rejects(text):
    with pytest.raises(SctError):
        parse_size(text)


def write_variant(tmp_path: Path, edit) -> Path:
    """A copy of steamdeck.toml with `edit(data)` applied, written back as TOML."""
    data = tomllib.loads((SHIPPED / "steamdeck.toml").read_text())
    edit(data)
    path = tmp_path / "variant.toml"
    path.write_text(to_toml(data))
    return path


def to_toml(data: dict) -> str:
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        return json.dumps(v)

    top = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    tables = [
        f"[{k}]\n" + "\n".join(f"{kk} = {value(vv)}" for kk, vv in v.items())
        for k, v in data.items()
        if isinstance(v, dict)
    ]
    return "\n".join(top) + "\n\n" + "\n\n".join(tables) + "\n"


def test_a_path_works_like_a_name(tmp_path):
    path = write_variant(tmp_path, lambda d: d.update(threads=3))
    profile = load_profile(str(path))
    assert profile.name == "variant" and profile.threads == 3 and profile.path == path
    assert load_profile(path).threads == 3


BAD = [
    ("unknown top key", lambda d: d.update(colour="red"), "colour"),
    ("unknown battery key", lambda d: d["battery"].update(shutdown_at=5), "battery.shutdown_at"),
    ("unknown thermal key", lambda d: d["thermal"].update(fan="max"), "thermal.fan"),
    ("missing key", lambda d: d.pop("threads"), "threads is missing"),
    ("missing table", lambda d: d.pop("thermal"), "thermal is missing"),
    ("table as value", lambda d: d.update(battery=3), "battery"),
    ("threads as string", lambda d: d.update(threads="4"), "threads must be an integer"),
    ("threads as bool", lambda d: d.update(threads=True), "threads must be an integer"),
    ("zero threads", lambda d: d.update(threads=0), "threads must be at least 1"),
    ("budget zero", lambda d: d.update(memory_budget="0GiB"), "memory_budget must be more than 0"),
    ("budget as number", lambda d: d.update(memory_budget=10), "memory_budget must be a size string"),
    ("budget garbage", lambda d: d.update(memory_budget="lots"), "memory_budget is not a size"),
    ("unknown device", lambda d: d.update(device="tpu"), "device must be one of"),
    ("unknown compute dtype", lambda d: d.update(compute_dtype="float16"), "compute_dtype must be one of"),
    ("unknown state dtype", lambda d: d.update(state_dtype="int8"), "state_dtype must be one of"),
    ("unknown activations", lambda d: d.update(activations="swap"), "activations must be one of"),
    ("negative prefetch", lambda d: d.update(prefetch_depth=-1), "prefetch_depth must be at least 0"),
    ("zero commit_every", lambda d: d.update(commit_every=0), "commit_every must be at least 1"),
    ("percent above 100", lambda d: d["battery"].update(pause_below_percent=120), "battery.pause_below_percent"),
    ("resume below pause", lambda d: d["battery"].update(resume_above_percent=10), "battery.resume_above_percent"),
    ("plugged not bool", lambda d: d["battery"].update(resume_when_plugged="yes"), "true or false"),
    ("sensors not a list", lambda d: d["thermal"].update(sensors="k10temp"), "thermal.sensors"),
    ("throttle threads above threads", lambda d: d["thermal"].update(throttle_threads=16), "thermal.throttle_threads"),
    ("pause below throttle", lambda d: d["thermal"].update(pause_above_c=50.0), "thermal.pause_above_c"),
    ("resume above throttle", lambda d: d["thermal"].update(resume_below_c=95.0), "thermal.resume_below_c"),
    ("temperature as string", lambda d: d["thermal"].update(throttle_above_c="hot"), "must be a number"),
]


@pytest.mark.parametrize(("case", "edit", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_profiles_name_file_and_key(tmp_path, case, edit, expected):
    path = write_variant(tmp_path, edit)
    with pytest.raises(SctError) as error:
        load_profile(path)
    message = str(error.value)
    assert str(path) in message and expected in message and "\n" not in message


def test_invalid_toml_and_missing_file(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("device = \n")
    with pytest.raises(SctError, match="broken.toml: not valid TOML"):
        load_profile(path)
    with pytest.raises(SctError, match="does not exist"):
        load_profile(tmp_path / "absent.toml")
    with pytest.raises(SctError, match=r"unknown profile 'nope' \(shipped: ci, m4pro, rogally, steamdeck\)"):
        load_profile("nope")


def test_budget_override():
    assert load_profile("steamdeck", "512MiB").memory_budget == 512 * MiB
    assert load_profile("ci", "1.5GB").memory_budget == 1_500_000_000
    with pytest.raises(SctError, match="--budget"):
        load_profile("ci", "0GiB")
    with pytest.raises(SctError, match="--budget"):
        load_profile("ci", "big")


def test_usable_threads_never_exceed_the_cores(tmp_path):
    cores = len(os.sched_getaffinity(0))
    many = load_profile(write_variant(tmp_path, lambda d: d.update(threads=cores + 3)))
    assert many.threads == cores + 3  # the profile still says what the device has
    assert many.usable_threads() == cores
    assert many.usable_threads(1) == 1
    assert load_profile("ci").usable_threads() == min(2, cores)


def test_resolve_device(tmp_path):
    assert resolve_device(load_profile("ci")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device(load_profile("m4pro")).type == expected
    if not torch.cuda.is_available():
        with pytest.raises(SctError, match="device cuda is not available"):
            resolve_device(load_profile(write_variant(tmp_path, lambda d: d.update(device="cuda"))))


def test_profiles_command(capsys):
    assert main(["profiles"]) == 0
    listing = capsys.readouterr().out
    for name in ("steamdeck", "m4pro", "ci"):
        assert name in listing
    assert "10.0 GiB" in listing
    assert main(["profiles", "steamdeck"]) == 0
    shown = capsys.readouterr().out
    assert "memory_budget" in shown and "10,737,418,240 bytes" in shown and "[thermal]" in shown
    assert main(["profiles", "ci", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["memory_budget"] == GiB
    assert main(["profiles", "nope"]) == 2
    assert "unknown profile 'nope'" in capsys.readouterr().err
