"""The last events and errors, newest at the bottom, each with the run time it happened at."""

from __future__ import annotations

from textual.content import Content

from sct_edge.tui.format import fmt_clock
from sct_edge.tui.state import LogLine, RunView
from sct_edge.tui.widgets.base import ViewWidget

LEVEL_STYLE = {"info": "", "good": "$success", "warning": "$warning", "error": "bold $error"}
SAMPLE_LINES = 6  # a sample's text shows at most this many wrapped lines
ROOMY = 8  # below this many lines, every entry gets one line so a long sample cannot hide the rest


def log_lines(line: LogLine, width: int, roomy: bool) -> list[Content]:
    """One log entry as screen lines: the first line after its time, the rest (a sample's text) indented;
    or all of it on one cropped line when the panel is short."""
    stamp = fmt_clock(line.elapsed_s).rjust(5) + " "
    indent = len(stamp)
    style = LEVEL_STYLE.get(line.level, "")
    if not roomy:
        flat = " ".join(line.text.split())
        return [Content.assemble((stamp, "dim"), (flat, style)).truncate(width, ellipsis=True)]
    first, *rest = line.text.split("\n")
    text_width = max(1, width - indent)
    head = Content.assemble((first, style)).wrap(text_width)
    body = [piece for text in rest for piece in Content.assemble(text.expandtabs()).wrap(text_width)]
    return [Content.assemble((stamp, "dim"), head[0])] + [
        Content.assemble(" " * indent, piece) for piece in head[1:] + body[:SAMPLE_LINES]
    ]


class EventsPanel(ViewWidget):
    TITLE = "Events"

    def signature(self, v: RunView) -> tuple:
        return (v.logged,)

    def render(self) -> Content:
        width, height = self.content_size.width, self.content_size.height
        shown: list[Content] = []
        for line in reversed(self.view.log):
            shown[:0] = log_lines(line, width, roomy=height >= ROOMY)
            if len(shown) >= height:
                break
        if not shown:
            return Content.styled("no events yet", "dim")
        return Content("\n").join(shown[-height:] if height else shown)
