"""The run screen: RAM headroom across the top, the layer map, progress, status, loss curves and events
below, a row of buttons and the key footer at the bottom.

Panels sit in one grid; the layout changes with the terminal's height (see `sct_edge/tui/sct_edge.tcss`): at
80×24 the events share a row with the status, on a tall screen (the Deck's 1280×800 Konsole) the loss
chart takes the whole right column and the events the rest of the left one.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Grid, Horizontal
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Label

from sct_edge.tui.state import RunView
from sct_edge.tui.widgets import EventsPanel, LayerMap, LossChart, MemoryPanel, ProgressPanel, StatusPanel

# (id, label, action): one button per key binding, the same actions the keys run.
BUTTONS = [
    ("pause", "Pause p", "app.toggle_pause"),
    ("commit", "Commit c", "app.commit"),
    ("evaluate", "Eval e", "app.evaluate"),
    ("sample", "Sample s", "app.sample"),
    ("quit", "Quit q", "app.quit"),
]
STEERING = ("pause", "commit", "evaluate", "sample")


class RunScreen(Screen):
    VERTICAL_BREAKPOINTS = [(0, "-short"), (30, "-tall")]
    # Nothing takes focus: keys are the way in, and no action needs Tab.
    AUTO_FOCUS = None

    def __init__(self, view: RunView, read_only: bool) -> None:
        super().__init__()
        self.view = view
        self.read_only = read_only

    def compose(self) -> ComposeResult:
        yield Header()
        yield MemoryPanel(self.view, id="memory")
        # Grid order matters: see the module docstring and the stylesheet.
        with Grid(id="panels"):
            yield LayerMap(self.view, id="layers")
            yield LossChart(self.view, id="loss")
            yield ProgressPanel(self.view, id="progress")
            yield StatusPanel(self.view, id="status")
            yield EventsPanel(self.view, id="events")
        with Horizontal(id="controls"):
            for button_id, label, action in BUTTONS:
                button = Button(
                    label, id=button_id, action=action, compact=True, classes="steer" if button_id in STEERING else ""
                )
                button.can_focus = False
                yield button
            yield Label("watching: read-only, steer the run from its own window", id="read-only")
        yield Footer()

    def on_mount(self) -> None:
        self.set_class(self.read_only, "-read-only")

    def show(self, view: RunView, note: str | None, paused: bool, steerable: bool) -> None:
        """Redraw every panel from `view`; `note` is the app's pending request, if any."""
        self.view = view
        self.query_one(StatusPanel).note = note
        for panel in self.query("#memory, #panels > *"):
            panel.show(view)
        pause = self.query_one("#pause", Button)
        pause.label = "Resume p" if paused else "Pause p"
        pause.variant = "warning" if paused else "default"
        for button_id in STEERING:
            self.query_one(f"#{button_id}", Button).disabled = not steerable
