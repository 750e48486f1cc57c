"""The common shape of the run screen's panels: a widget that renders the shared `RunView`."""

from __future__ import annotations

from textual.widget import Widget

from tui.state import RunView


class ViewWidget(Widget):
    """A panel drawn from a `RunView`; `show` is called on the UI thread after events were folded in."""

    TITLE = ""

    def __init__(self, view: RunView, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self.view = view
        self.border_title = self.TITLE

    def show(self, view: RunView) -> None:
        self.view = view
        self.refresh(layout=True)
