"""Where the dashboard's browser tests find Chrome or Chromium, or why they are skipped.

PARALOOP_CHROMIUM names the executable (it must then exist). Otherwise the first of: Debian's /usr/bin/chromium
(`make browser` installs it), chromium-browser, google-chrome, chromium on the PATH, and the macOS apps. Ubuntu's
/usr/bin/chromium-browser is a stub that asks for the snap, whose confined browser Playwright cannot drive: a
candidate under /snap/ or a script that hands over to snap is passed over.
"""

import os
import shutil
from pathlib import Path

CANDIDATES = (
    "/usr/bin/chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
    "chromium",
    "/Applications/Google Chrome.app/Contents/MacOS/Google Chrome",
    "/Applications/Chromium.app/Contents/MacOS/Chromium",
)
HOW = (
    "browser tests skipped: no Chrome or Chromium found. On Debian `make browser` installs chromium (sudo); "
    "elsewhere install Chrome or Chromium and set PARALOOP_CHROMIUM=/path/to/its/executable (docs/install.md)"
)


def is_snap_stub(path: Path) -> bool:
    if str(path.resolve()).startswith("/snap/"):
        return True
    head = path.read_bytes()[:4096] if path.stat().st_size < 1 << 20 else b""
    return head.startswith(b"#!") and b"snap" in head


def find_chromium() -> tuple[str | None, str]:
    """(executable, "") or (None, why and how to enable); a PARALOOP_CHROMIUM that does not exist is an error."""
    given = os.environ.get("PARALOOP_CHROMIUM")
    if given:
        if not Path(given).is_file():
            raise FileNotFoundError(f"PARALOOP_CHROMIUM={given}: no such file")
        return given, ""
    for name in CANDIDATES:
        found = name if os.path.isabs(name) else shutil.which(name)
        if found and Path(found).is_file() and os.access(found, os.X_OK) and not is_snap_stub(Path(found)):
            return found, ""
    return None, HOW
