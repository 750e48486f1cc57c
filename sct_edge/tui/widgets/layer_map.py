"""The layer map: one cell per transformer block, coloured by where it is (disk, loading, resident,
computing, writing back), so paging is visible as it happens."""

from __future__ import annotations

from textual.content import Content

from sct_edge.tui.format import fit
from sct_edge.tui.state import BLOCK_STATES, RunView
from sct_edge.tui.widgets.base import ViewWidget

STATE_STYLE = {
    "disk": "$foreground 35%",
    "loading": "$primary",
    "resident": "$success",
    "computing": "bold $warning",
    "writing": "$secondary",
}
# Distinct glyphs too, so the map reads on a monochrome terminal.
STATE_GLYPH = {"disk": "·", "loading": "↓", "resident": "■", "computing": "▶", "writing": "↑"}
LEGEND_NAME = {
    "disk": "on disk",
    "loading": "loading",
    "resident": "in RAM",
    "computing": "computing",
    "writing": "writing back",
}
SHORT_NAME = {"disk": "disk", "loading": "load", "resident": "RAM", "computing": "run", "writing": "write"}
MAX_ROWS = 4  # rows of cells before a denser cell style is chosen


def cell_layout(n: int, width: int) -> tuple[int, int, bool]:
    """(cell width, cells a row, numbered): the widest cell that keeps `n` blocks within MAX_ROWS rows, from
    glyph + block number, to glyph + space, to a bare glyph."""
    digits = len(str(max(0, n - 1)))
    for cell, numbered in ((digits + 2, True), (2, False)):
        per_row = max(1, width // cell)
        if -(-n // per_row) <= MAX_ROWS:
            return cell, per_row, numbered
    return 1, max(1, width), False


def legend(names: dict[str, str]) -> Content:
    return Content(" ").join(
        Content.assemble((STATE_GLYPH[s], STATE_STYLE[s]), (f" {names[s]}", "dim")) for s in BLOCK_STATES
    )


class LayerMap(ViewWidget):
    """Blocks wrap into rows; cells show the block number while that fits in a few rows."""

    TITLE = "Layers"
    laid_out_blocks = 0

    def signature(self, v: RunView) -> tuple:
        return tuple(v.blocks), v.resident_blocks

    def show(self, view) -> None:
        counts = {s: view.blocks.count(s) for s in BLOCK_STATES}
        kept = f", {view.resident_blocks} kept in RAM" if view.resident_blocks is not None else ""
        self.border_title = f"Layers: {view.n_blocks} blocks{kept}"
        self.border_subtitle = " ".join(f"{counts[s]} {LEGEND_NAME[s]}" for s in BLOCK_STATES[1:] if counts[s])
        super().show(view)
        if len(view.blocks) != self.laid_out_blocks:
            # The number of rows may change: at the start of a run, not with every event.
            self.laid_out_blocks = len(view.blocks)
            self.refresh(layout=True)

    def render(self) -> Content:
        blocks, width = self.view.blocks, max(1, self.content_size.width)
        if not blocks:
            return Content.from_markup("[dim]no blocks yet[/]")
        cell, per_row, numbered = cell_layout(len(blocks), width)
        digits = cell - 2
        rows = []
        for start in range(0, len(blocks), per_row):
            parts = []
            for i in range(start, min(start + per_row, len(blocks))):
                state = blocks[i]
                if numbered:
                    parts.append((f"{STATE_GLYPH[state]}{i:>{digits}} ", STATE_STYLE[state]))
                else:
                    parts.append((STATE_GLYPH[state].ljust(cell), STATE_STYLE[state]))
            rows.append(Content.assemble(*parts))
        rows.append(fit(width, legend(LEGEND_NAME), legend(SHORT_NAME)))
        return Content("\n").join(rows)
