"""The edge policy's state (running, paused on battery, throttled), battery and temperature, the last
commit, and what the front end has asked of the trainer."""

from __future__ import annotations

from textual.content import Content

from sct_edge.tui.format import fit, fmt_bytes
from sct_edge.tui.state import PAUSE_TEXT, RunView
from sct_edge.tui.widgets.base import ViewWidget


def policy_line(v: RunView) -> Content:
    if v.ended:
        return Content.styled(f"ended: {v.end_reason}", "bold $error" if v.end_reason == "error" else "bold")
    if v.paused_reason:
        return Content.styled(PAUSE_TEXT.get(v.paused_reason, "paused"), "bold $warning")
    if v.throttle_threads is not None:
        return Content.styled(f"throttled to {v.throttle_threads} threads ({v.throttle_reason})", "bold $warning")
    if v.started_at is None:
        return Content.styled("waiting for the run to start", "dim")
    return Content.styled("● running", "bold $success")


def sensors_line(v: RunView, width: int) -> Content:
    if v.battery is None:
        battery = Content.styled("no battery", "dim")
    else:
        percent = v.battery.percent
        style = "$success" if v.battery.plugged else "$warning" if percent < 30 else ""
        battery = Content.assemble(
            ("battery ", "dim"),
            (f"{percent:.0f}%", f"bold {style}"),
            (" plugged in" if v.battery.plugged else " on battery", "dim"),
        )
    temp = (
        Content.styled("no temperature sensor", "dim")
        if v.temperature_c is None
        else Content.assemble(("CPU ", "dim"), (f"{v.temperature_c:.1f} °C", "bold"))
    )
    return fit(width, Content.assemble(battery, "  ", temp), battery)


def replicas_line(v: RunView, width: int) -> Content:
    """Across replicas: which rank this screen shows and what the last step's exchange cost."""
    exchange = ("  exchange ", "dim"), "–" if v.comm_bytes is None else f"{fmt_bytes(v.comm_bytes)}"
    waited = ("" if v.comm_s is None else f" sent, waited {v.comm_s:.2f} s", "dim")
    rank = (("rank ", "dim"), f"{v.rank} of {v.world_size}")
    return fit(width, Content.assemble(*rank, *exchange, waited), Content.assemble(*rank))


def commit_line(v: RunView, width: int) -> Content:
    committed = "none yet" if v.last_commit_step is None else f"step {v.last_commit_step}"
    return fit(
        width,
        Content.assemble(
            ("last commit ", "dim"),
            committed,
            ("  profile ", "dim"),
            v.profile or "–",
            ("  batch ", "dim"),
            f"{v.batch}×{v.seq}",
        ),
        Content.assemble(("last commit ", "dim"), committed, ("  profile ", "dim"), v.profile or "–"),
    )


class StatusPanel(ViewWidget):
    """The bottom border carries the app's note: what was asked and not yet answered by an event."""

    TITLE = "Status"

    def __init__(self, view: RunView, *, id: str | None = None) -> None:
        super().__init__(view, id=id)
        self.note: str | None = None
        self.shows_error = False
        self.shows_replicas = False

    def signature(self, v: RunView) -> tuple:
        return (
            v.ended,
            v.end_reason,
            v.paused_reason,
            v.throttle_threads,
            v.throttle_reason,
            v.started_at is None,
            v.battery,
            v.temperature_c,
            v.last_commit_step,
            v.profile,
            v.batch,
            v.seq,
            v.last_error,
            v.world_size,
            v.comm_bytes,
            v.comm_s,
        )

    def show(self, view: RunView) -> None:
        self.border_subtitle = self.note or ""
        super().show(view)
        if bool(view.last_error) != self.shows_error or (view.world_size > 1) != self.shows_replicas:
            self.shows_error = bool(view.last_error)
            self.shows_replicas = view.world_size > 1
            self.refresh(layout=True)  # one more line

    def render(self) -> Content:
        v, width = self.view, self.content_size.width
        lines = [policy_line(v), sensors_line(v, width), commit_line(v, width)]
        if v.world_size > 1:
            lines.insert(1, replicas_line(v, width))
        if v.last_error:
            lines.append(Content.styled(f"error: {v.last_error}", "bold $error"))
        return Content("\n").join(lines)
