"""The command-line commands behind ``python -m transferqueue``: demo, serve, bench, status."""
