"""Number, size and time formatting for the TUI's panels, and picking the longest text that fits a width."""

from __future__ import annotations

from textual.content import Content

from sct_edge.model.accounting import format_bytes

BAR_EIGHTHS = " ▏▎▍▌▋▊▉"


def fmt_bytes(n: int | float | None) -> str:
    """Binary units, three significant digits ('412 MiB', '1.00 GiB'); '–' when unknown."""
    return "–" if n is None else format_bytes(n)


def fmt_duration(seconds: float | None) -> str:
    """'0.53 s', '42 s', '3m 05s', '2h 10m', '3d 04h'."""
    if seconds is None:
        return "–"
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h {minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d {hours:02d}h"


def fmt_clock(seconds: float | None) -> str:
    """Elapsed run time as m:ss or h:mm:ss (the events panel's time column)."""
    if seconds is None:
        return "    "
    total = max(0, int(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def fmt_float(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def fmt_sci(x: float | None) -> str:
    return "–" if x is None else f"{x:.1e}"


def fit(width: int, *candidates: Content) -> Content:
    """The first candidate (longest first) that fits `width` cells; the last one, cropped, if none does."""
    for candidate in candidates:
        if candidate.cell_length <= width:
            return candidate
    return candidates[-1].truncate(max(0, width), ellipsis=True)


def bar(fraction: float, width: int, style: str, empty_style: str = "$panel-lighten-2") -> Content:
    """A horizontal bar `width` cells wide, filled to `fraction` in eighth-cell steps."""
    width = max(0, width)
    eighths = round(max(0.0, min(1.0, fraction)) * width * 8)
    full, part = divmod(eighths, 8)
    filled = "█" * full + (BAR_EIGHTHS[part] if part and full < width else "")
    return Content.assemble((filled, style), ("░" * (width - len(filled)), empty_style))
