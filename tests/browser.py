"""Headless Chromium for the tests that check a page renders (Debian's `chromium` package,
installed with apt-get when missing and the tests run as root; otherwise those tests skip)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"


def ensure_chromium() -> str:
    """Path of Debian's chromium, installed with apt-get when missing (root only), else skip."""
    if Path(CHROMIUM).is_file():
        return CHROMIUM
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and cannot be (needs root and apt-get): apt-get install chromium")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for command in (["apt-get", "install", "-y", "chromium"], ["apt-get", "update"],
                    ["apt-get", "install", "-y", "chromium"]):
        subprocess.run(command, env=env, capture_output=True, timeout=900)
        if Path(CHROMIUM).is_file():
            return CHROMIUM
    pytest.skip("apt-get could not install chromium (no package index or no network)")


def screenshot(html_path: Path, png_path: Path, profile: Path) -> None:
    command = [ensure_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--screenshot={png_path}", "--window-size=1200,1600",
               html_path.resolve().as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and png_path.is_file(), result.stderr[-2000:]
