"""The `flex` command line: the Typer app (app.py), flag parsing (parse.py) and rendering (render.py)."""

from .app import app, main

__all__ = ["app", "main"]
