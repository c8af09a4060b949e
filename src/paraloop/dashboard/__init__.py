"""The run dashboard: a page in the browser with live curves, the latest rollouts, the configuration and the
/control buttons. `paraloop run` serves it at /dashboard (live), `paraloop serve` a read-only view, and
`paraloop dashboard RUN_DIR ...` the same page from runs' files. Static files only (static/), no build step;
uPlot (MIT) is vendored in static/vendor/ with its licence.
"""

from paraloop.dashboard.routes import dashboard_routes
from paraloop.dashboard.sources import LiveRun, RunFiles, ServeView

__all__ = ["LiveRun", "RunFiles", "ServeView", "dashboard_routes"]
