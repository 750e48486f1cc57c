"""RAM headroom: the process's resident memory against the profile budget, its peak, and system available."""

from __future__ import annotations

from textual.content import Content

from sct_edge.tui.format import bar, fit, fmt_bytes
from sct_edge.tui.state import RunView
from sct_edge.tui.widgets.base import ViewWidget

WARN_FRACTION = 0.8  # of the budget: the bar turns warning-coloured
DANGER_FRACTION = 0.95


def pressure_style(fraction: float) -> str:
    if fraction >= DANGER_FRACTION:
        return "$error"
    if fraction >= WARN_FRACTION:
        return "$warning"
    return "$success"


class MemoryPanel(ViewWidget):
    """Three lines: the bar (with the peak marked), the resident split, and what the system has left."""

    TITLE = "RAM headroom"

    def signature(self, v: RunView) -> tuple:
        return v.budget_bytes, v.rss_bytes, v.rss_anon_bytes, v.rss_file_bytes, v.peak_rss_bytes, v.available_bytes

    def show(self, view: RunView) -> None:
        super().show(view)
        fraction = self.fraction()
        for name, threshold in (("-near-budget", WARN_FRACTION), ("-over-budget", DANGER_FRACTION)):
            wanted = fraction is not None and fraction >= threshold
            if self.has_class(name) != wanted:  # a class change restyles the widget: only when it changes
                self.set_class(wanted, name)

    def fraction(self) -> float | None:
        v = self.view
        if not v.budget_bytes or v.rss_bytes is None:
            return None
        return v.rss_bytes / v.budget_bytes

    def render(self) -> Content:
        v, width = self.view, self.content_size.width
        fraction = self.fraction()
        if fraction is None:
            return Content.from_markup("[dim]waiting for the run to report its memory…[/]")
        style = pressure_style(fraction)
        label = Content.assemble(" ", (f"{fraction:4.0%}", f"bold {style}"), " of budget")
        bar_width = max(4, width - label.cell_length)
        gauge = bar(fraction, bar_width, style)
        if v.peak_rss_bytes and v.peak_rss_bytes > v.rss_bytes:
            # The peak so far, as a tick on the bar.
            at = min(bar_width - 1, int(v.peak_rss_bytes / v.budget_bytes * bar_width))
            gauge = Content.assemble(gauge[:at], ("│", "bold $text"), gauge[at + 1 :])
        rss, budget = fmt_bytes(v.rss_bytes), fmt_bytes(v.budget_bytes)
        anon, mapped = fmt_bytes(v.rss_anon_bytes), fmt_bytes(v.rss_file_bytes)
        resident = fit(
            width,
            Content.assemble(
                ("resident ", "dim"),
                (rss, "bold"),
                f" of {budget} budget  ",
                ("anonymous ", "dim"),
                anon,
                ("  file-backed/mapped ", "dim"),
                mapped,
            ),
            Content.assemble(
                ("rss ", "dim"), (rss, "bold"), f" / {budget}  ", ("anon ", "dim"), anon, ("  mapped ", "dim"), mapped
            ),
            Content.assemble(("rss ", "dim"), (rss, "bold"), f" / {budget}"),
        )
        headroom = v.budget_bytes - v.rss_bytes
        room_style = "$error" if headroom < 0 else style
        available = v.available_bytes
        # The system may have less free than the budget allows us: then that is the real headroom.
        short = available is not None and available < headroom
        avail_style = "bold $warning" if short else ""
        system = fit(
            width,
            Content.assemble(
                ("peak ", "dim"),
                fmt_bytes(v.peak_rss_bytes),
                ("  headroom ", "dim"),
                (fmt_bytes(headroom), f"bold {room_style}"),
                ("  system available ", "dim"),
                (fmt_bytes(available), avail_style),
            ),
            Content.assemble(
                ("peak ", "dim"),
                fmt_bytes(v.peak_rss_bytes),
                ("  room ", "dim"),
                (fmt_bytes(headroom), f"bold {room_style}"),
                ("  avail ", "dim"),
                (fmt_bytes(available), avail_style),
            ),
        )
        return Content("\n").join([Content.assemble(gauge, label), resident, system])
