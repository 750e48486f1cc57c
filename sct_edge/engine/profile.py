"""Device budget profiles: TOML files that say how much RAM a run may use and how it behaves on the device.

A profile is named (`steamdeck`, `m4pro`, `ci`: `profiles/NAME.toml` at the top of the repository) or given
as a path to any TOML file of the same form. Every key is required and documented in the shipped files;
unknown keys, wrong types and impossible values are a `SctError` naming the file, the key and the problem.

Where the shipped profiles are found: `profiles/` beside the `sct_edge` package, which is the checkout itself
for a plain checkout and for the editable install CI and the README use. A regular (wheel) install has no
checkout, so the profiles are looked up next in `<sys.prefix>/share/sct-edge/profiles`, where
`[tool.setuptools.data-files] "share/sct-edge/profiles" = ["profiles/*.toml"]` in pyproject.toml installs them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import tomllib
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from sct_edge.errors import SctError

if TYPE_CHECKING:
    import torch

DEVICES = ("cpu", "cuda", "mps", "auto")
DTYPES = ("float32", "bfloat16")
ACTIVATIONS = ("auto", "keep", "recompute", "spill")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}

SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def profile_dirs() -> list[Path]:
    """Where shipped profiles are looked up, in order: the checkout (or editable install), then data-files."""
    return [
        Path(__file__).resolve().parents[2] / "profiles",
        Path(sys.prefix) / "share" / "sct-edge" / "profiles",
    ]


def parse_size(text: str, what: str = "size") -> int:
    """Bytes in a size string: "10GiB", "512MiB", "1.5GB", "4096" (bytes); units are case-insensitive.

    Binary units (KiB, MiB, GiB, TiB) are powers of 1024, decimal ones (KB, MB, GB, TB) powers of 1000.
    """
    if not isinstance(text, str):
        raise SctError(f'{what} must be a size string like "10GiB", not {text!r}')
    match = _SIZE_RE.match(text)
    if not match:
        raise SctError(f"{what} '{text}' is not a size (use e.g. 10GiB, 512MiB, 1.5GB)")
    number, unit = match.groups()
    factor = SIZE_UNITS.get(unit.lower() if unit else "b")
    if factor is None:
        raise SctError(f"{what} '{text}' has unknown unit '{unit}' (use B, KB, MB, GB, TB, KiB, MiB, GiB or TiB)")
    return math.ceil(float(number) * factor)


@dataclass
class BatteryPolicy:
    """When to pause for the battery. pause_below_percent = 0 disables the check."""

    pause_below_percent: int
    resume_above_percent: int
    resume_when_plugged: bool


@dataclass
class ThermalPolicy:
    """When to throttle or pause for heat. An empty `sensors` list disables thermal control."""

    sensors: list[str]
    throttle_above_c: float
    throttle_threads: int
    pause_above_c: float
    resume_below_c: float


@dataclass
class Profile:
    """A device budget profile; `memory_budget` is in bytes."""

    name: str
    path: Path
    device: str
    memory_budget: int
    threads: int
    compute_dtype: str
    state_dtype: str
    prefetch_depth: int
    activations: str
    commit_every: int
    battery: BatteryPolicy
    thermal: ThermalPolicy

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["path"] = str(self.path)
        return data

    def usable_threads(self, wanted: int | None = None) -> int:
        """`wanted` (default: the profile's `threads`) capped at the CPU cores this process may run on.

        A profile names the threads of its device (4 on the Deck); on a machine with fewer cores, more
        compute threads than cores only contend (measured on 2 cores: 4 threads made the tiny step 2x slower).
        """
        return max(1, min(wanted or self.threads, available_cores()))


def compute_autocast(device_type: str, compute_dtype: str):
    """A context factory for a profile's compute dtype: bfloat16 autocast on `device_type`, or a disabled one."""
    import torch  # here, not at the top: memcalc reads profiles without torch

    return partial(torch.autocast, device_type, dtype=torch.bfloat16, enabled=compute_dtype == "bfloat16")


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


class _Reader:
    """Checks one table of a profile against its schema, naming the file and the key on every error."""

    def __init__(self, path: Path, table: dict, prefix: str) -> None:
        self.path, self.table, self.prefix = path, table, prefix

    def fail(self, key: str, problem: str) -> SctError:
        return SctError(f"profile {self.path}: {self.prefix}{key} {problem}")

    def raw(self, key: str):
        if key not in self.table:
            raise self.fail(key, "is missing")
        return self.table[key]

    def integer(self, key: str, minimum: int, maximum: int | None = None) -> int:
        value = self.raw(key)
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.fail(key, f"must be an integer, not {value!r}")
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise self.fail(key, f"must be {bound}, not {value}")
        return value

    def number(self, key: str) -> float:
        value = self.raw(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise self.fail(key, f"must be a number, not {value!r}")
        if not math.isfinite(value):
            raise self.fail(key, f"must be finite, not {value}")
        return float(value)

    def boolean(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise self.fail(key, f"must be true or false, not {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        value = self.raw(key)
        if value not in choices:
            raise self.fail(key, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def size(self, key: str) -> int:
        value = self.raw(key)
        if not isinstance(value, str):
            raise self.fail(key, f'must be a size string like "10GiB", not {value!r}')
        try:
            size = parse_size(value)
        except SctError as error:
            raise self.fail(key, f"is not a size: {error}") from None
        if size <= 0:
            raise self.fail(key, f"must be more than 0 bytes, not {value!r}")
        return size

    def string_list(self, key: str) -> list[str]:
        value = self.raw(key)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(key, f"must be a list of non-empty strings, not {value!r}")
        return list(value)

    def subtable(self, key: str) -> _Reader:
        value = self.raw(key)
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a [{key}] table, not {value!r}")
        return _Reader(self.path, value, f"{self.prefix}{key}.")

    def reject_unknown(self, known: set[str]) -> None:
        unknown = sorted(set(self.table) - known)
        if unknown:
            raise self.fail(unknown[0], f"is not a profile key (known here: {', '.join(sorted(known))})")


def _battery(reader: _Reader) -> BatteryPolicy:
    reader.reject_unknown({f.name for f in dataclasses.fields(BatteryPolicy)})
    pause = reader.integer("pause_below_percent", 0, 100)
    resume = reader.integer("resume_above_percent", 0, 100)
    if resume < pause:
        raise reader.fail("resume_above_percent", f"({resume}) must be >= pause_below_percent ({pause})")
    return BatteryPolicy(pause, resume, reader.boolean("resume_when_plugged"))


def _thermal(reader: _Reader, threads: int) -> ThermalPolicy:
    reader.reject_unknown({f.name for f in dataclasses.fields(ThermalPolicy)})
    policy = ThermalPolicy(
        sensors=reader.string_list("sensors"),
        throttle_above_c=reader.number("throttle_above_c"),
        throttle_threads=reader.integer("throttle_threads", 1, threads),
        pause_above_c=reader.number("pause_above_c"),
        resume_below_c=reader.number("resume_below_c"),
    )
    if policy.pause_above_c < policy.throttle_above_c:
        raise reader.fail(
            "pause_above_c", f"({policy.pause_above_c}) must be >= throttle_above_c ({policy.throttle_above_c})"
        )
    if policy.resume_below_c >= policy.throttle_above_c:
        raise reader.fail(
            "resume_below_c", f"({policy.resume_below_c}) must be below throttle_above_c ({policy.throttle_above_c})"
        )
    return policy


def resolve_profile_path(name_or_path: str | Path) -> Path:
    """The TOML file for a shipped profile name or a path; an unknown name lists the shipped ones."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if text.endswith(".toml") or "/" in text:
        if not candidate.is_file():
            raise SctError(f"profile file {candidate} does not exist")
        return candidate
    for directory in profile_dirs():
        path = directory / f"{text}.toml"
        if path.is_file():
            return path
    raise SctError(f"unknown profile '{text}' (shipped: {', '.join(shipped_profiles()) or 'none found'})")


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped with sct-edge (the first directory of `profile_dirs()` that has any)."""
    for directory in profile_dirs():
        names = sorted(p.stem for p in directory.glob("*.toml"))
        if names:
            return names
    return []


def load_profile(name_or_path: str | Path, budget_override: str | None = None) -> Profile:
    """Read and check a profile; `budget_override` (a size string, e.g. from --budget) replaces memory_budget."""
    path = resolve_profile_path(name_or_path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise SctError(f"profile {path}: cannot read it ({error})") from None
    except tomllib.TOMLDecodeError as error:
        raise SctError(f"profile {path}: not valid TOML ({error})") from None
    reader = _Reader(path, data, "")
    reader.reject_unknown({f.name for f in dataclasses.fields(Profile)} - {"name", "path"})
    threads = reader.integer("threads", 1)
    profile = Profile(
        name=path.stem,
        path=path,
        device=reader.choice("device", DEVICES),
        memory_budget=reader.size("memory_budget"),
        threads=threads,
        compute_dtype=reader.choice("compute_dtype", DTYPES),
        state_dtype=reader.choice("state_dtype", DTYPES),
        prefetch_depth=reader.integer("prefetch_depth", 0),
        activations=reader.choice("activations", ACTIVATIONS),
        commit_every=reader.integer("commit_every", 1),
        battery=_battery(reader.subtable("battery")),
        thermal=_thermal(reader.subtable("thermal"), threads),
    )
    if budget_override is not None:
        budget = parse_size(budget_override, what="--budget")
        if budget <= 0:
            raise SctError(f"--budget {budget_override} must be more than 0 bytes")
        profile.memory_budget = budget
    return profile


def resolve_device(profile: Profile) -> torch.device:
    """The torch device a profile asks for; `auto` is cuda, else mps, else cpu. An unavailable one is an error."""
    import torch  # here, not at the top: reading profiles (memcalc, listings) should not pay torch's import

    cuda = torch.cuda.is_available()
    mps = torch.backends.mps.is_available()
    if profile.device == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if (profile.device == "cuda" and not cuda) or (profile.device == "mps" and not mps):
        raise SctError(
            f"profile {profile.path}: device {profile.device} is not available in this torch build/machine "
            f'(use device = "auto" or "cpu")'
        )
    return torch.device(profile.device)
