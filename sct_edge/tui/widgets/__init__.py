"""The run screen's panels, one per file; each renders a `tui.state.RunView`."""

from sct_edge.tui.widgets.base import ViewWidget
from sct_edge.tui.widgets.events_panel import EventsPanel
from sct_edge.tui.widgets.layer_map import LayerMap
from sct_edge.tui.widgets.loss_chart import LossChart
from sct_edge.tui.widgets.memory_panel import MemoryPanel
from sct_edge.tui.widgets.progress_panel import ProgressPanel
from sct_edge.tui.widgets.status_panel import StatusPanel

__all__ = ["EventsPanel", "LayerMap", "LossChart", "MemoryPanel", "ProgressPanel", "StatusPanel", "ViewWidget"]
