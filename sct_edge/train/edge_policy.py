"""The edge-device policy: pause on a low battery, throttle or pause when the CPU runs hot.

Thresholds come from the profile's `[battery]` and `[thermal]` tables. Readings come through a sensor
seam (`Sensors`): the real one asks psutil (`sensors_battery`, `sensors_temperatures` by sensor name,
e.g. `k10temp` on the Steam Deck); tests pass their own readings. Machines without a battery or
temperature sensors simply run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psutil

from sct_edge.engine.profile import BatteryPolicy, ThermalPolicy
from sct_edge.events import Battery


def read_battery() -> Battery | None:
    reading = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
    if reading is None:
        return None
    return Battery(percent=float(reading.percent), plugged=bool(reading.power_plugged))


def read_temperature(sensor_names: list[str]) -> float | None:
    """Hottest current reading of the first named sensor that exists, in °C."""
    if not hasattr(psutil, "sensors_temperatures"):
        return None
    try:
        readings = psutil.sensors_temperatures()
    except (OSError, RuntimeError):
        return None
    for name in sensor_names:
        if readings.get(name):
            return max(r.current for r in readings[name])
    return None


@dataclass
class Sensors:
    battery: Callable[[], Battery | None] = read_battery
    temperature: Callable[[list[str]], float | None] = read_temperature


@dataclass
class Decision:
    """What the trainer should do now: run, run with fewer threads, or wait (and why)."""

    paused_by: str | None  # "battery" | "thermal" | None
    threads: int | None  # a thread cap while throttled, else None
    battery: Battery | None
    temperature_c: float | None


class EdgePolicy:
    """Stateful (hysteresis): once paused or throttled, it waits for the resume condition (plugged in, battery
    back above its resume level, temperature below `resume_below_c`), not just for the trigger to clear."""

    def __init__(self, battery: BatteryPolicy, thermal: ThermalPolicy, sensors: Sensors | None = None) -> None:
        self.battery_policy = battery
        self.thermal_policy = thermal
        self.sensors = sensors or Sensors()
        self.battery_paused = False
        self.thermal_paused = False
        self.throttled = False

    def check(self) -> Decision:
        b, t = self.battery_policy, self.thermal_policy
        battery = self.sensors.battery()
        temperature = self.sensors.temperature(t.sensors)
        if battery is not None:
            if self.battery_paused:
                plugged_ok = b.resume_when_plugged and battery.plugged
                self.battery_paused = not (plugged_ok or battery.percent >= b.resume_above_percent)
            else:
                self.battery_paused = not battery.plugged and battery.percent < b.pause_below_percent
        else:
            self.battery_paused = False
        if temperature is not None:
            if self.thermal_paused:
                self.thermal_paused = temperature >= t.resume_below_c
            else:
                self.thermal_paused = temperature >= t.pause_above_c
        else:
            self.thermal_paused = False
        paused_by = "battery" if self.battery_paused else "thermal" if self.thermal_paused else None
        if temperature is None:
            self.throttled = False
        elif self.throttled:
            self.throttled = temperature >= t.resume_below_c
        else:
            self.throttled = temperature >= t.throttle_above_c
        return Decision(paused_by, t.throttle_threads if self.throttled else None, battery, temperature)
