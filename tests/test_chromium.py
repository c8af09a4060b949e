"""The browser tests' Chrome/Chromium finder: Ubuntu's snap stub is passed over, nothing found is one line saying how
to enable the tests, and PARALOOP_CHROMIUM wins (and must exist)."""

import pytest

from support import chromium


def test_a_snap_stub_is_passed_over_and_a_real_executable_found(tmp_path, monkeypatch):
    stub = tmp_path / "bin" / "chromium-browser"
    stub.parent.mkdir()
    stub.write_text(
        "#!/bin/sh\necho \"Command '/usr/bin/chromium-browser' requires the chromium snap\"\n"
        'exec /snap/bin/chromium "$@"\n'
    )
    stub.chmod(0o755)
    monkeypatch.delenv("PARALOOP_CHROMIUM", raising=False)
    monkeypatch.setenv("PATH", str(stub.parent))
    monkeypatch.setattr(chromium, "CANDIDATES", ("chromium-browser", "google-chrome"))
    assert chromium.find_chromium() == (None, chromium.HOW)
    assert "PARALOOP_CHROMIUM" in chromium.HOW and "\n" not in chromium.HOW

    chrome = stub.parent / "google-chrome"
    chrome.write_text('#!/bin/bash\nexec -a "$0" /opt/google/chrome/chrome "$@"\n')  # Google's own wrapper script
    chrome.chmod(0o755)
    assert chromium.find_chromium() == (str(chrome), "")


def test_paraloop_chromium_wins_and_must_exist(tmp_path, monkeypatch):
    monkeypatch.setenv("PARALOOP_CHROMIUM", str(tmp_path / "chrome"))
    with pytest.raises(FileNotFoundError, match="PARALOOP_CHROMIUM"):
        chromium.find_chromium()
    (tmp_path / "chrome").write_text("")
    assert chromium.find_chromium() == (str(tmp_path / "chrome"), "")
