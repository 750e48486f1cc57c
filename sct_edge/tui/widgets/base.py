"""The common shape of the run screen's panels: a widget that renders the shared `RunView`."""

from __future__ import annotations

from textual.widget import Widget

from sct_edge.tui.state import RunView


class ViewWidget(Widget):
    """A panel drawn from a `RunView`; `show` is called on the UI thread after events were folded in.

    A panel repaints only when its `signature` (the view fields it draws) changed: most batches of events
    touch one or two panels, and every repaint is CPU taken from the trainer. Heights are fixed in the
    stylesheet where they can be, so a repaint needs no layout pass of the screen.
    """

    TITLE = ""

    def __init__(self, view: RunView, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.view = view
        self.border_title = self.TITLE
        self.drawn: tuple | None = None

    def signature(self, view: RunView) -> tuple:
        raise NotImplementedError

    def show(self, view: RunView) -> None:
        self.view = view
        signature = self.signature(view)
        if signature != self.drawn:
            self.drawn = signature
            self.refresh()
