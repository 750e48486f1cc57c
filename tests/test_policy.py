"""The battery/thermal policy acts on readings from its sensor seam; the real psutil readings run too."""

from sct_edge.engine.profile import load_profile
from sct_edge.train.edge_policy import Battery, EdgePolicy, Sensors, read_battery, read_temperature


def scripted(battery_readings, temperature_readings) -> Sensors:
    batteries, temperatures = iter(battery_readings), iter(temperature_readings)
    return Sensors(battery=lambda: next(batteries), temperature=lambda names: next(temperatures))


def test_battery_pause_and_resume_when_plugged():
    profile = load_profile("steamdeck")
    low = profile.battery.pause_below_percent - 1
    policy = EdgePolicy(profile.battery, profile.thermal, scripted(
        [Battery(50, False), Battery(low, False), Battery(low + 0.5, False), Battery(low, True)],
        [None] * 4,
    ))
    assert policy.check().paused_by is None
    assert policy.check().paused_by == "battery"
    assert policy.check().paused_by == "battery"  # hysteresis: still below the resume level
    assert policy.check().paused_by is None  # plugged in


def test_battery_resumes_above_threshold_without_power():
    profile = load_profile("steamdeck")
    b = profile.battery
    policy = EdgePolicy(b, profile.thermal, scripted(
        [Battery(b.pause_below_percent - 1, False), Battery(b.resume_above_percent, False)], [None] * 2))
    assert policy.check().paused_by == "battery"
    assert policy.check().paused_by is None


def test_thermal_throttle_pause_and_cool_down():
    profile = load_profile("steamdeck")
    t = profile.thermal
    policy = EdgePolicy(profile.battery, t, scripted(
        [None] * 5, [t.throttle_above_c - 5, t.throttle_above_c + 1, t.pause_above_c + 1, t.resume_below_c + 1,
                     t.resume_below_c - 1]))
    first = policy.check()
    assert first.paused_by is None and first.threads is None
    throttled = policy.check()
    assert throttled.paused_by is None and throttled.threads == t.throttle_threads
    assert policy.check().paused_by == "thermal"
    cooling = policy.check()
    assert cooling.paused_by == "thermal" and cooling.threads == t.throttle_threads  # not yet below resume_below_c
    cooled = policy.check()
    assert cooled.paused_by is None and cooled.threads is None


def test_no_sensors_means_run():
    profile = load_profile("steamdeck")
    decision = EdgePolicy(profile.battery, profile.thermal, scripted([None], [None])).check()
    assert decision.paused_by is None and decision.threads is None


def test_real_psutil_readings():
    """Whatever this machine has (often no battery, maybe no sensors), the real readers answer sanely."""
    battery = read_battery()
    assert battery is None or (0 <= battery.percent <= 100 and isinstance(battery.plugged, bool))
    temperature = read_temperature(["k10temp", "coretemp", "cpu_thermal", "acpitz"])
    assert temperature is None or -50 < temperature < 150
    profile = load_profile("steamdeck")
    decision = EdgePolicy(profile.battery, profile.thermal).check()
    assert decision.paused_by in (None, "battery", "thermal")
