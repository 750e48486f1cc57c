"""Progress: step n of N, the phase within the step (forward block i, backward block j, ...), tokens/s,
the last step's time split by phase, and the ETA."""

from __future__ import annotations

from textual.content import Content

from sct_edge.tui.format import bar, fit, fmt_bytes, fmt_duration
from sct_edge.tui.state import PAUSE_TEXT, RunView
from sct_edge.tui.widgets.base import ViewWidget

PHASE_NAMES = {
    "forward": ("forward", "fwd", "$primary"),
    "backward": ("backward", "bwd", "$accent"),
    "optimizer": ("optimizer", "opt", "$success"),
    "retraction": ("retraction", "qr", "$secondary"),
    "spill": ("activation spill", "spl", "$warning"),
    "exchange": ("gradient exchange", "net", "$accent 60%"),
    "io_wait": ("disk wait", "io", "$error"),
    "other": ("other", "etc", "$foreground 50%"),
}
PHASE_DOING = {
    "commit": "committing the store",
    "eval": "evaluating",
    "sample": "sampling text",
    "optimizer": "optimizer step",
    "spill": "activation spill",
}


def phase_text(v: RunView) -> Content:
    if v.ended:
        style = "bold $error" if v.end_reason == "error" else "bold $success"
        return Content.assemble(("finished: ", "dim"), (v.end_reason or "ended", style))
    if v.paused_reason:
        return Content.styled(PAUSE_TEXT.get(v.paused_reason, f"paused ({v.paused_reason})"), "bold $warning")
    if v.phase is None:
        return Content.styled("starting" if not v.losses else "between steps", "dim")
    doing = Content.styled(PHASE_DOING.get(v.phase, v.phase), "bold")
    if v.phase_block is None:
        return doing
    return Content.assemble(doing, " · block ", (str(v.phase_block), "bold"), f" of {v.n_blocks}")


class ProgressPanel(ViewWidget):
    TITLE = "Progress"

    def signature(self, v: RunView) -> tuple:
        return (
            v.step,
            v.total_steps,
            v.phase,
            v.phase_block,
            v.n_blocks,
            v.tokens_per_s,
            v.mfu,
            v.step_s,
            v.eta_s,
            tuple(v.phase_s.items()),
            v.paused_reason,
            v.ended,
            v.end_reason,
            bool(v.losses),
        )

    def show(self, view: RunView) -> None:
        # Paging traffic on the bottom border: it costs no line at 80×24.
        if view.bytes_read is None:
            self.border_subtitle = ""
        else:
            # The arrows match the layer map's: ↓ read in, ↑ written back.
            self.border_subtitle = f"disk a step ↓{fmt_bytes(view.bytes_read)} ↑{fmt_bytes(view.bytes_written)}"
        super().show(view)

    def render(self) -> Content:
        v, width = self.view, self.content_size.width
        total = max(1, v.total_steps)
        head = Content.assemble(("step ", "dim"), (f"{v.step}", "bold"), f" of {v.total_steps} ")
        pct = Content(f" {v.step / total:4.0%}")
        steps = Content.assemble(
            head, bar(v.step / total, max(4, width - head.cell_length - pct.cell_length), "$primary"), pct
        )
        tokens = "–" if v.tokens_per_s is None else f"{v.tokens_per_s:,.0f}"
        # MFU: model FLOPs a second over the machine's GEMM peak (runs recorded before it have none).
        mfu = () if v.mfu is None else (("MFU ", "dim"), (f"{v.mfu:.0%}", "bold"), "  ")
        mfu_short = () if v.mfu is None else (("MFU ", "dim"), (f"{v.mfu:.0%}", "bold"), " ")
        rate = fit(
            width,
            Content.assemble(
                (tokens, "bold"),
                (" tokens/s  ", "dim"),
                *mfu,
                fmt_duration(v.step_s),
                (" a step  ", "dim"),
                ("ETA ", "dim"),
                (fmt_duration(v.eta_s) if not v.ended else "–", "bold"),
            ),
            Content.assemble(
                (tokens, "bold"),
                (" tok/s ", "dim"),
                *mfu_short,
                fmt_duration(v.step_s),
                ("/step ", "dim"),
                ("ETA ", "dim"),
                (fmt_duration(v.eta_s) if not v.ended else "–", "bold"),
            ),
        )
        return Content("\n").join([steps, phase_text(v), rate, self.split(width)])

    def split(self, width: int) -> Content:
        """The last step's time by phase: seconds when they fit, else shares."""
        phases = [(k, self.view.phase_s[k]) for k in PHASE_NAMES if self.view.phase_s.get(k, 0) > 0]
        if not phases:
            return Content.styled("time by phase: after the first step", "dim")
        total = sum(s for _, s in phases) or 1.0

        def line(long: bool) -> Content:
            parts = []
            for key, seconds in phases:
                name, short, style = PHASE_NAMES[key]
                value = fmt_duration(seconds) if long else f"{seconds / total:.0%}"
                parts.append(Content.assemble((name if long else short, style), " ", value))
            return Content("  " if long else " ").join(parts)

        return fit(width, line(True), line(False))
