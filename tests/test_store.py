"""The spectral store: streamed init, bit-exact round trips, commits, zero-copy views, released pages, locking,
integrity errors on every kind of bad input, and a real full disk."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sct_edge.cli import main as cli_main
from sct_edge.errors import SctError
from sct_edge.model.config import ModelConfig, RankPolicy, get_preset
from sct_edge.model.transformer import Transformer
from sct_edge.store.atomic import AtomicFile, atomic_write
from sct_edge.store.shard_names import (
    block_index,
    block_shard,
    optim_shard,
    param_prefix,
    parse_shard_file,
    shard_file_name,
)
from sct_edge.store.shardfile import crc32_combine, crc32_zeros
from sct_edge.store.store import MANIFEST, Store, initial_tensors


def tiny() -> ModelConfig:
    return get_preset("tiny")


def snapshot(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (size, crc32) of every file in a directory."""
    return {p.name: (p.stat().st_size, zlib.crc32(p.read_bytes())) for p in sorted(path.iterdir()) if p.is_file()}


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16 if t.element_size() == 2 else torch.int32)


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(bits(a[key]), bits(b[key])), key


def snapshot_tensors(store: Store) -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for name in store.shard_names():
        out[name] = {k: v.clone() for k, v in store.read(name).items()}
        store.release(name)
    return out


@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "store"
    Store.create(path, tiny(), seed=1).close()
    return path


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / "lock").unlink(missing_ok=True)
    return dst


# ----------------------------------------------------------------------------------------- creation


@pytest.mark.parametrize(
    "config",
    [
        tiny(),
        dataclasses.replace(tiny(), tie_embeddings=True, ranks=RankPolicy(attn=8, mlp=None, embed=16, head=None)),
        dataclasses.replace(tiny(), ranks=RankPolicy(attn=None, mlp=12, embed=24, head=20)),
    ],
    ids=["tiny", "tied-spectral-embed", "mixed"],
)
def test_streamed_init_equals_transformer(tmp_path, config):
    with Store.create(tmp_path / "s", config, seed=7) as store:
        model = Transformer(config, seed=7).state_dict()
        seen = set()
        for name in store.weight_shard_names():
            for key, tensor in store.read(name).items():
                full = param_prefix(name) + key
                assert torch.equal(bits(tensor), bits(model[full])), full
                seen.add(full)
            store.release(name)
        assert seen == set(model)
        for name in store.shard_names():
            if store.kind(name) == "optim":
                assert all(not t.any() for t in store.read(name).values())
                store.release(name)


def test_create_refuses_non_empty_directory(tmp_path):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with pytest.raises(SctError, match="already exists and is not empty"):
        Store.create(tmp_path / "s", tiny())
    assert snapshot(tmp_path / "s") == {"notes.txt": (4, zlib.crc32(b"mine"))}


def test_create_failing_midway_removes_what_it_wrote(tmp_path):
    config = tiny()

    def source(name: str) -> dict[str, torch.Tensor]:
        tensors = initial_tensors(config, 0, name)
        if name == "block.002":
            tensors["mlp.up.U"] = torch.zeros(3, 3)
        return tensors

    with pytest.raises(SctError, match=r"initial tensor mlp.up.U of shard block.002 has shape \[3, 3\]"):
        Store.create(tmp_path / "s", config, tensors=source)
    assert not (tmp_path / "s").exists()


def test_shards_are_standard_safetensors_with_metadata(base_store):
    with Store.open(base_store) as store:
        for name in store.shard_names():
            file = store.shard_file(name)
            with safe_open(str(file), "pt") as f:
                meta = json.loads(f.metadata()["sct_edge_shard"])
                assert meta["name"] == name and meta["kind"] == store.kind(name) and meta["version"] == 0
                specs = store.specs(name)
                assert set(f.keys()) == set(specs)
                views = store.read(name)
                for key in f.keys():
                    t = f.get_tensor(key)
                    assert (t.dtype, tuple(t.shape)) == specs[key]
                    assert torch.equal(bits(t), bits(views[key]))
            store.release(name)
            assert store.shard_bytes(name) == file.stat().st_size
            # the manifest's crc is the plain zlib crc32 of the whole file
            assert store.manifest["shards"][name]["crc32"] == f"{zlib.crc32(file.read_bytes()):08x}"


def test_crc_helpers_match_zlib():
    for la, lb in [(0, 0), (1, 0), (0, 7), (13, 4099), (65536, 100001)]:
        a, b = os.urandom(la), os.urandom(lb)
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), lb) == zlib.crc32(a + b)
    for n in (0, 1, 5, 4096, 1 << 20, 3 * (1 << 20) + 7):
        assert crc32_zeros(n) == zlib.crc32(bytes(n))


# ----------------------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_round_trip_bit_exact(tmp_path, state_dtype):
    path = tmp_path / "s"
    g = torch.Generator().manual_seed(0)
    with Store.create(path, tiny(), seed=2, state_dtype=state_dtype) as store:
        expected = snapshot_tensors(store)
        for name in ("block.001", "block.001.optim", "head", "embed.optim"):
            views = store.read(name)
            for view in views.values():
                view.add_(torch.randn(view.shape, generator=g).to(view.dtype))  # in RAM (copy-on-write)
            store.write(name, views)
            expected[name] = {k: v.clone() for k, v in views.items()}
            del views
            store.release(name)
        state = {"cursor": 1234, "rng": [1, 2, 3], "lr": {"step": 5, "value": 3e-4}}
        store.commit(5, state)
    with Store.open(path) as store:
        assert store.step == 5 and store.state == state
        assert store.state_dtype == state_dtype
        assert store.verify().shards == len(expected)
        reopened = snapshot_tensors(store)
        for name in expected:
            assert_bit_equal(reopened[name], expected[name])
        assert store.specs("block.000.optim")["attn.q.U.exp_avg"][0] == state_dtype


def test_write_casts_and_validates(tmp_path):
    with Store.create(tmp_path / "s", tiny()) as store:
        views = {k: v.clone() for k, v in store.read("block.000.optim").items()}
        key = next(iter(views))
        with pytest.raises(SctError, match=r"write block.000.optim: tensors do not match the shard \(missing"):
            store.write("block.000.optim", {k: v for k, v in views.items() if k != key})
        with pytest.raises(SctError, match="has shape"):
            store.write("block.000.optim", {**views, key: torch.zeros(3)})
        with pytest.raises(SctError, match="has no shard 'block.009'"):
            store.write("block.009", views)
        views[key] = torch.ones(views[key].shape, dtype=torch.float64)
        store.write("block.000.optim", views)
        assert store.read("block.000.optim")[key].dtype == torch.float32
        assert torch.equal(store.read("block.000.optim")[key], torch.ones(views[key].shape))


def test_write_zeros_and_a_commit_that_replaces_extra(tmp_path):
    path = tmp_path / "s"
    with Store.create(path, tiny(), extra={"import": {"method": "svd"}}) as store:
        ones = {k: torch.ones(v.shape) for k, v in store.read("block.001.optim").items()}
        store.write("block.001.optim", ones)
        store.commit(0)
        assert all(t.all() for t in store.read("block.001.optim").values())
        store.write_zeros("block.001.optim")
        store.commit(0, extra={"import": {"method": "svd", "distillation": {"steps": 3}}})
    with Store.open(path) as store:
        assert store.step == 0 and store.extra == {"import": {"method": "svd", "distillation": {"steps": 3}}}
        assert not any(t.any() for t in store.read("block.001.optim").values())
        assert store.verify().step == 0  # every crc32 checks out


def test_partial_commit_pending_reads_discard_and_cleanup(tmp_path):
    path = tmp_path / "s"
    with Store.create(path, tiny()) as store:
        original = snapshot_tensors(store)
        committed_files = {n: store.shard_file(n).name for n in store.shard_names()}
        new = {k: torch.full(v.shape, 2.0) for k, v in original["block.002"].items()}
        store.write("block.002", new)
        # read sees the pending version; the committed file is untouched and still named by the manifest
        assert_bit_equal(store.read("block.002"), new)
        assert store.manifest["shards"]["block.002"]["file"] == committed_files["block.002"]
        store.discard()
        assert_bit_equal(store.read("block.002"), original["block.002"])
        assert set(p.name for p in path.glob("*.safetensors")) == set(committed_files.values())
        store.write("block.002", new)
        store.write("block.002", {k: v + 1 for k, v in new.items()})  # replaces the pending version
        store.commit(1, {"a": 1})
        assert store.step == 1 and store.generation == 1
        files = {n: store.shard_file(n).name for n in store.shard_names()}
        assert files["block.002"] == "block.002.v000001.safetensors"
        assert all(files[n] == committed_files[n] for n in files if n != "block.002")
        # the superseded version is gone; nothing but referenced files remain
        on_disk = {p.name for p in path.glob("*.safetensors")}
        assert on_disk == set(files.values())
        store.commit(2, None)  # state-only commit keeps the state
        assert store.state == {"a": 1}
        with pytest.raises(SctError, match="before the committed step"):
            store.commit(1)
        with pytest.raises(SctError, match="not JSON-serialisable"):
            store.commit(3, {"x": object()})
        assert store.step == 2
    with Store.open(path) as store:
        assert store.step == 2
        assert_bit_equal(store.read("block.002"), {k: v + 1 for k, v in new.items()})


def test_disk_use_stays_within_twice_the_store(tmp_path):
    path = tmp_path / "s"
    with Store.create(path, tiny()) as store:
        size = store.committed_bytes()
        for _ in range(3):
            for name in store.shard_names():
                store.write(name, {k: v + 1 for k, v in store.read(name).items()})
                store.release(name)
            pending_total = sum(p.stat().st_size for p in path.iterdir())
            assert pending_total <= 2 * size + 4096
            store.commit(store.step + 1)
            assert sum(p.stat().st_size for p in path.iterdir()) <= size + 4096
        # the store's record of checksummed files keeps one entry per live file, not one per step
        remembered = store.checksums.paths()
        assert len(remembered) <= len(store.shard_names())


def test_stale_files_are_removed_when_the_lock_is_taken(base_store, tmp_path):
    path = copy_store(base_store, tmp_path / "s")
    stale = [
        "block.001.v000007.safetensors",
        ".block.002.v000001.safetensors.0badc0de.tmp",
        ".manifest.json.12345678.tmp",
    ]
    for name in stale:
        (path / name).write_bytes(b"leftover")
    (path / "README.txt").write_text("not ours")
    before = snapshot(path)
    with Store.open(path) as store:
        assert snapshot(path) == before  # opening to read never deletes anything
        with store.lock():
            assert sorted(store.removed_stale) == sorted(stale)
        assert store.verify().shards == len(store.shard_names())
    after = snapshot(path)
    assert "README.txt" in after and not any(name in after for name in stale)


def test_second_writer_is_refused(base_store, tmp_path):
    path = copy_store(base_store, tmp_path / "s")
    with Store.open(path) as first, first.lock():
        second = Store.open(path)
        with pytest.raises(SctError, match=rf"store {path} is being trained by another process \(pid {os.getpid()}\)"):
            second.write("head", second.read("head"))
        second.close()
    with Store.open(path) as third, third.lock():
        pass


# ----------------------------------------------------------------------------------------- memory maps


def maps_range(file: Path) -> list[tuple[int, int]]:
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith(str(file)):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            ranges.append((start, end))
    return ranges


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc")
def test_views_are_zero_copy_and_copy_on_write(base_store, tmp_path):
    path = copy_store(base_store, tmp_path / "s")
    with Store.open(path) as store:
        file = store.shard_file("block.000")
        views = store.read("block.000")
        ranges = maps_range(file)
        assert ranges, "the shard file is not mapped"
        for key, view in views.items():
            ptr = view.data_ptr()
            assert any(start <= ptr and ptr + view.nbytes <= end for start, end in ranges), key
        address, length = store.mapped_address("block.000")
        assert length == file.stat().st_size
        before = file.read_bytes()
        for view in views.values():
            view.mul_(3.0)  # private mapping: RAM only
        assert file.read_bytes() == before
        del views, view  # the caller drops its references, then releases
        store.release("block.000")
        assert not maps_range(file)
        assert store.mapped_address("block.000") is None


RSS_PROBE = """
import json, sys
import psutil
from sct_edge.store.store import Store
proc = psutil.Process()
store = Store.open(sys.argv[1])
name = "block.000"
rss = lambda: proc.memory_info().rss
out = {"bytes": store.shard_bytes(name)}
warm = store.read("embed")  # first use of torch kernels and of the read path allocates; keep it out of the baseline
float(warm["embed.weight"].sum())
del warm
store.release("embed")
base = rss()
views = store.read(name)
for v in views.values():
    float(v.sum())
out["after_read"] = rss() - base
del views, v
store.release(name)
out["after_release"] = rss() - base
views = store.read(name)
for v in views.values():
    float(v.sum())
out["held_after_read"] = rss() - base
store.release(name)  # views still held: pages dropped with madvise
out["held_after_release"] = rss() - base
print(json.dumps(out))
"""


def test_released_pages_leave_the_resident_set(tmp_path):
    # One dense block of ~17 MB so the resident-set change stands well above allocator noise.
    config = ModelConfig(
        name="rss",
        vocab_size=256,
        dim=512,
        n_layers=1,
        n_heads=4,
        n_kv_heads=4,
        ffn_dim=2048,
        ranks=RankPolicy(attn=None, mlp=None, embed=None, head=None),
    )
    Store.create(tmp_path / "s", config).close()
    result = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(tmp_path / "s")], capture_output=True, text=True, check=True, timeout=120
    )
    out = json.loads(result.stdout)
    size = out["bytes"]
    assert size > 16e6
    assert out["after_read"] > 0.9 * size
    assert out["after_release"] < 0.1 * size
    assert out["held_after_read"] > 0.9 * size
    assert out["held_after_release"] < 0.1 * size


# ----------------------------------------------------------------------------------------- integrity


def flip_byte(file: Path, offset: int) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0x10
    file.write_bytes(bytes(data))


def shard_path(path: Path, name: str) -> Path:
    return path / json.loads((path / MANIFEST).read_text())["shards"][name]["file"]


def edit_manifest(path: Path, edit) -> None:
    data = json.loads((path / MANIFEST).read_text())
    edit(data)
    (path / MANIFEST).write_text(json.dumps(data))


def foreign_same_shard(path: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    Store.create(other, tiny(), seed=99).close()
    shutil.copyfile(shard_path(other, "block.002"), shard_path(path, "block.002"))


def plain_safetensors(path: Path) -> None:
    save_file({"x": torch.zeros(4)}, str(shard_path(path, "block.002")))


CORRUPTIONS = {
    "flipped data byte": ("block.001", "checksum mismatch", lambda p, t: flip_byte(shard_path(p, "block.001"), -3)),
    "flipped header byte": ("block.001", "", lambda p, t: flip_byte(shard_path(p, "block.001"), 40)),
    "flipped metadata crc": (
        "block.003.optim",
        "",
        lambda p, t: flip_byte(
            shard_path(p, "block.003.optim"), shard_path(p, "block.003.optim").read_bytes().index(b"data_crc32") + 15
        ),
    ),
    "truncated shard": (
        "block.002.optim",
        "truncated",
        lambda p, t: os.truncate(shard_path(p, "block.002.optim"), 1000),
    ),
    "missing shard": ("head", "file is missing", lambda p, t: shard_path(p, "head").unlink()),
    "other shard's file": (
        "block.002",
        "foreign file",
        lambda p, t: shutil.copyfile(shard_path(p, "block.001"), shard_path(p, "block.002")),
    ),
    "same shard of another store": ("block.002", "checksum mismatch", foreign_same_shard),
    "plain safetensors file": ("block.002", "", lambda p, t: plain_safetensors(p)),
    "manifest crc edited": (
        "block.000",
        "checksum mismatch",
        lambda p, t: edit_manifest(p, lambda d: d["shards"]["block.000"].update(crc32="00000000")),
    ),
    "manifest version edited": (
        "embed",
        "foreign file",
        lambda p, t: edit_manifest(p, lambda d: d["shards"]["embed"].update(version=3)),
    ),
    "manifest shape edited": (
        "block.001",
        "does not match",
        lambda p, t: edit_manifest(
            p, lambda d: d["shards"]["block.001"]["tensors"]["attn.q.U"].__setitem__(1, [128, 8])
        ),
    ),
    "manifest not JSON": ("manifest.json", "not valid JSON", lambda p, t: (p / MANIFEST).write_text('{"format": ')),
    "manifest shard missing": (
        "block.003",
        "lacks shard",
        lambda p, t: edit_manifest(p, lambda d: d["shards"].pop("block.003")),
    ),
    "corrupt tokenizer": ("tokenizer", "checksum mismatch", lambda p, t: flip_byte(p / "tokenizer.json", 3)),
    # A store shared by someone else must not point sct-edge at a file outside it.
    "tokenizer path leaves the store": (
        "manifest.json: the tokenizer entry names an invalid file '../../x'",
        "",
        lambda p, t: edit_manifest(p, lambda d: d["tokenizer"].update(file="../../x")),
    ),
    "tokenizer path absolute": (
        "manifest.json: the tokenizer entry names an invalid file '/etc/hostname'",
        "",
        lambda p, t: edit_manifest(p, lambda d: d["tokenizer"].update(file="/etc/hostname")),
    ),
    "tokenizer path is the parent": (
        "manifest.json: the tokenizer entry names an invalid file '..'",
        "",
        lambda p, t: edit_manifest(p, lambda d: d["tokenizer"].update(file="..")),
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_bad_store_gives_one_line_error_and_changes_nothing(case, base_store, tmp_path, capsys):
    name, message, corrupt = CORRUPTIONS[case]
    path = copy_store(base_store, tmp_path / "s")
    corrupt(path, tmp_path)
    before = snapshot(path)
    with pytest.raises(SctError) as caught:
        with Store.open(path) as store:
            store.verify()
    error = str(caught.value)
    assert "\n" not in error
    assert name in error and message in error, error
    assert cli_main(["verify", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sct-edge: error: ") and name in err
    cli_main(["inspect", str(path)])
    capsys.readouterr()
    assert snapshot(path) == before


def test_corrupt_shard_is_caught_on_first_read(base_store, tmp_path):
    path = copy_store(base_store, tmp_path / "s")
    flip_byte(shard_path(path, "block.001"), -3)
    with Store.open(path) as store:  # the cheap checks pass
        store.read("block.000")
        with pytest.raises(SctError, match=r"shard block.001 .*checksum mismatch"):
            store.read("block.001")


@pytest.mark.parametrize(
    ("version", "message"),
    [(2, "written by a newer sct-edge .* upgrade sct-edge"), (0, "predates format version 1, .* re-create")],
)
def test_other_format_versions_say_why(base_store, tmp_path, version, message):
    path = copy_store(base_store, tmp_path / "s")
    edit_manifest(path, lambda d: d.update(format_version=version))
    with pytest.raises(SctError, match=message):
        Store.open(path)


def test_not_a_store(base_store, tmp_path):
    with pytest.raises(SctError, match="does not exist"):
        Store.open(tmp_path / "nope")
    with pytest.raises(SctError, match="not an sct-edge store"):
        Store.open(tmp_path)
    path = copy_store(base_store, tmp_path / "s")
    (path / MANIFEST).unlink()  # what a creation killed before its last step leaves
    with pytest.raises(SctError, match="has shard files but no manifest.json: a store creation was interrupted"):
        Store.open(path)


# ----------------------------------------------------------------------------------------- full disk


def test_full_disk_keeps_the_last_committed_state(small_tmpfs):
    path = small_tmpfs / "s"
    store = Store.create(path, tiny())  # ~4.6 MB on an 8 MB disk: a full rewrite cannot fit
    committed = snapshot_tensors(store)
    store.write("block.000", {k: v + 1 for k, v in committed["block.000"].items()})
    store.commit(1, {"step": 1})
    committed = snapshot_tensors(store)
    with pytest.raises(SctError) as caught:
        for name in store.shard_names():
            store.write(name, {k: v + 1 for k, v in store.read(name).items()})
            store.release(name)
    error = str(caught.value)
    assert "\n" not in error and error.startswith("shard ") and "no space left on device" in error
    assert "stays at its last committed step 1" in error
    assert not list(path.glob(".*.tmp"))  # the half-written temporary is gone
    with Store.open(path) as other:
        assert other.step == 1 and other.state == {"step": 1}
        other.verify()
        for name, tensors in committed.items():
            assert_bit_equal(other.read(name), tensors)
    store.discard()

    # a full disk at the manifest switch: pending versions are written, then the disk fills up
    store.write("head", {k: v * 2 for k, v in committed["head"].items()})
    filler = small_tmpfs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError, match="No space left"):
            while True:
                os.write(fd, b"\0" * 65536)
    finally:
        os.close(fd)
    with pytest.raises(
        SctError,
        match=r"manifest.json: no space left on device while committing step 2; the store "
        r"stays at step 1",
    ):
        store.commit(2, {"step": 2})
    with Store.open(path) as other:
        assert other.step == 1
        other.verify()
        assert_bit_equal(other.read("head"), committed["head"])
    filler.unlink()
    store.commit(2, {"step": 2})  # the pending version survived the failed commit
    store.close()
    with Store.open(path) as other:
        assert other.step == 2
        assert_bit_equal(other.read("head"), {k: v * 2 for k, v in committed["head"].items()})


def test_create_on_a_too_small_disk_fails_cleanly(small_tmpfs):
    config = dataclasses.replace(tiny(), ranks=RankPolicy(attn=None, mlp=None, embed=None, head=None))
    with pytest.raises(SctError, match=r"needs .* GB but only .* GB are free"):
        Store.create(small_tmpfs / "s", config)
    assert not (small_tmpfs / "s").exists()


# ----------------------------------------------------------------------------------------- CLI


def test_cli_init_inspect_verify(tmp_path, capsys):
    path = tmp_path / "s"
    assert (
        cli_main(
            [
                "init",
                "--preset",
                "tiny",
                "--rank",
                "16",
                "--head-rank",
                "dense",
                "--seed",
                "3",
                "--state-dtype",
                "bfloat16",
                str(path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "12 shards" in out and "peak resident memory" in out
    with Store.open(path) as store:
        assert (store.config.ranks.attn, store.config.ranks.embed, store.config.ranks.head) == (16, 16, None)
        assert store.state_dtype == torch.bfloat16 and store.seed == 3
    assert cli_main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 0 and len(info["shards"]) == 12
    assert (
        info["store_bytes"]
        == sum(r["bytes"] for r in info["shards"]) + info["tokenizer"]["bytes"] + (path / MANIFEST).stat().st_size
    )
    assert info["dense_params"] > info["stored_params"]
    assert cli_main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "block.003.optim" in text and "dense" in text
    assert cli_main(["verify", str(path)]) == 0
    assert capsys.readouterr().out.count("\n") == 1


def test_cli_inspect_shows_an_import_report(tmp_path, capsys):
    report = [{"matrix": "layers.0.attn.q", "shape": [128, 128], "rank": 12, "kept_energy": 0.9,
               "rel_error": 0.31, "svd": "exact"}]
    Store.create(tmp_path / "s", tiny(), extra={"import_report": report}).close()
    assert cli_main(["inspect", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "import report" in out and "layers.0.attn.q" in out and "0.31" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rank", "0"], "rank 0 for layers.0.attn.q is outside 1..128"),
        (["--mlp-rank", "999"], "rank 999 for layers.0.mlp.gate is outside"),
        (["--energy", "0.9"], "use `sct-edge import --energy`"),
        (["--preset", "nope"], "unknown preset 'nope'"),
    ],
)
def test_cli_init_rejects_bad_input(tmp_path, capsys, args, message):
    argv = ["init", *args, str(tmp_path / "s")]
    if "--preset" not in args:
        argv[1:1] = ["--preset", "tiny"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


def test_atomic_write_replaces_the_whole_file_or_nothing(tmp_path):
    target = tmp_path / "file"
    atomic_write(target, b"old")
    with pytest.raises(RuntimeError):
        with AtomicFile(target) as out:
            out.write(b"new, half written")
            raise RuntimeError("killed mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # no temporary file left behind
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["file"]


def test_shard_names_are_built_and_parsed_in_one_place():
    assert block_shard(7) == "block.007" and optim_shard("block.007") == "block.007.optim"
    assert [block_index(n) for n in ("block.007", "block.007.optim", "embed", "head.optim")] == [7, 7, None, None]
    assert param_prefix("block.012.optim") == "layers.12." and param_prefix("embed") == ""
    for name in ("block.007", "block.007.optim", "embed", "head.optim"):
        assert parse_shard_file(shard_file_name(name, 12)) == (name, 12)
    for foreign in ("../block.001.v000001.safetensors", "/x/embed.v000000.safetensors", "tokenizer.json",
                    "block.001.v000001.safetensors.tmp", "blocks.001.v000001.safetensors"):
        assert parse_shard_file(foreign) is None
