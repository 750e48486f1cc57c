"""The run screen's panels, one per file; each renders a `tui.state.RunView`."""

from tui.widgets.base import ViewWidget
from tui.widgets.events_panel import EventsPanel
from tui.widgets.layer_map import LayerMap
from tui.widgets.loss_chart import LossChart
from tui.widgets.memory_panel import MemoryPanel
from tui.widgets.progress_panel import ProgressPanel
from tui.widgets.status_panel import StatusPanel

__all__ = ["EventsPanel", "LayerMap", "LossChart", "MemoryPanel", "ProgressPanel", "StatusPanel", "ViewWidget"]
