"""The Textual TUI of sct-edge: the live run screen of `sct-edge run` and `sct-edge watch`.

`tui.app.run_tui` runs a trainer behind the screen; `tui.app.watch_run` follows another run's events;
`tui.state` folds the event stream into what the widgets under `tui.widgets` show.
"""
