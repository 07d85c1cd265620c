"""The web dashboard: one page (plain HTML, JS and CSS shipped in ``static/``)
fed by server-sent events from :mod:`fabric.dashboard.server`."""

from fabric.dashboard.server import Dashboard, serve

__all__ = ["Dashboard", "serve"]
