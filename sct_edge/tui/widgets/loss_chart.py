"""Loss and validation loss over time (sparklines, with current, minimum and smoothed values as numbers),
learning rates, orthonormality error and gradient norm."""

from __future__ import annotations

import statistics
from collections.abc import Callable

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.content import Content
from textual.widgets import Sparkline

from sct_edge.tui.format import fit, fmt_float, fmt_sci
from sct_edge.tui.state import RunView
from sct_edge.tui.widgets.base import ViewWidget


def loss_line(v: RunView, width: int) -> Content:
    current = v.losses[-1] if v.losses else None
    return fit(
        width,
        Content.assemble(
            ("loss ", "dim"),
            (fmt_float(current), "bold"),
            ("  min ", "dim"),
            fmt_float(v.min_loss),
            ("  smoothed ", "dim"),
            fmt_float(v.smoothed_loss),
        ),
        Content.assemble(
            ("loss ", "dim"),
            (fmt_float(current, 3), "bold"),
            ("  min ", "dim"),
            fmt_float(v.min_loss, 3),
            ("  ~", "dim"),
            fmt_float(v.smoothed_loss, 3),
        ),
    )


def val_line(v: RunView, width: int) -> Content:
    if not v.val_losses:
        return Content.styled("validation: no evaluation yet", "dim")
    best = min(v.val_losses)
    ppl = "–" if v.val_ppl is None else f"{v.val_ppl:.2f}"
    return fit(
        width,
        Content.assemble(
            ("val loss ", "dim"),
            (fmt_float(v.val_losses[-1]), "bold"),
            ("  min ", "dim"),
            fmt_float(best),
            ("  ppl ", "dim"),
            ppl,
            ("  at step ", "dim"),
            str(v.val_step),
        ),
        Content.assemble(
            ("val ", "dim"),
            (fmt_float(v.val_losses[-1], 3), "bold"),
            ("  min ", "dim"),
            fmt_float(best, 3),
            ("  ppl ", "dim"),
            ppl,
        ),
    )


def optim_line(v: RunView, width: int) -> Content:
    grad = fmt_float(v.grad_norm, 3)
    return fit(
        width,
        Content.assemble(
            ("lr ", "dim"),
            fmt_sci(v.lr_spectral),
            (" spectral, ", "dim"),
            fmt_sci(v.lr_dense),
            (" dense  ", "dim"),
            ("‖UᵀU−I‖ ", "dim"),
            fmt_sci(v.ortho_err),
            ("  ‖g‖ ", "dim"),
            grad,
        ),
        Content.assemble(
            ("lr ", "dim"),
            fmt_sci(v.lr_spectral),
            ("/", "dim"),
            fmt_sci(v.lr_dense),
            ("  ortho ", "dim"),
            fmt_sci(v.ortho_err),
        ),
    )


class NumberLine(ViewWidget):
    """One line of numbers, re-fitted to the width at every render."""

    def __init__(self, view: RunView, line: Callable[[RunView, int], Content], *, id: str | None = None) -> None:
        super().__init__(view, id=id)
        self.line = line

    def signature(self, v: RunView) -> tuple:
        return len(v.losses), len(v.val_losses), v.lr_spectral, v.lr_dense, v.ortho_err, v.grad_norm

    def render(self) -> Content:
        return self.line(self.view, self.content_size.width)


class LossChart(Vertical):
    """The curves: a tall sparkline for the training loss, a thin one for validation loss."""

    def __init__(self, view: RunView, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.view = view
        self.border_title = "Loss"

    def compose(self) -> ComposeResult:
        yield NumberLine(self.view, loss_line, id="loss-numbers")
        # Each cell summarises a run of steps by their mean: spikes stay visible without dominating.
        yield Sparkline(list(self.view.losses), summary_function=statistics.fmean, id="loss-curve")
        yield NumberLine(self.view, val_line, id="val-numbers")
        yield Sparkline(list(self.view.val_losses), summary_function=statistics.fmean, id="val-curve")
        yield NumberLine(self.view, optim_line, id="optim-numbers")

    def show(self, view: RunView) -> None:
        self.view = view
        for line in self.query(NumberLine):
            line.show(view)
        for curve, values in (("#loss-curve", view.losses), ("#val-curve", view.val_losses)):
            sparkline = self.query_one(curve, Sparkline)
            if len(sparkline.data or ()) != len(values):
                # A copy: the reactive compares by value and would not see an append to its own list.
                sparkline.data = list(values)
