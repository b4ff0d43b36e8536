"""The `midms` command-line interface: one module per command group, wired in app.py."""
