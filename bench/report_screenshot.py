"""Screenshot an evaluation report (report.html) with headless Chromium.

    python bench/report_screenshot.py OUT_DIR/report.html [--png report.png] [--width 1400] [--height 2000]

Needs Debian's ``chromium`` (``apt-get install -y chromium``). Runs it headless, sandbox-less and
offline-quiet with a throw-away profile, and prints a JSON line with the PNG path, its size in pixels
and the wall time.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def find_chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise FileNotFoundError("chromium not found on PATH (apt-get install -y chromium)")


def screenshot(html: Path, png: Path, width: int = 1400, height: int = 2000, timeout: float = 120.0) -> dict:
    """Render ``html`` to ``png`` at ``width`` x ``height`` CSS pixels; returns a small info dict."""
    html = Path(html).resolve()
    if not html.is_file():
        raise FileNotFoundError(f"report not found: {html}")
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png}",
               html.as_uri()]
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        dt = time.time() - t0
    if not png.is_file():
        raise RuntimeError(f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-500:]}")
    from PIL import Image

    with Image.open(png) as im:
        size = im.size
    return {"png": str(png), "width": size[0], "height": size[1], "seconds": round(dt, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("html", help="report.html written by python -m tsjax.evaluate")
    p.add_argument("--png", default=None, help="output PNG (default: report.png beside the HTML)")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=2000)
    args = p.parse_args(argv)
    png = Path(args.png) if args.png else Path(args.html).with_name("report.png")
    try:
        info = screenshot(Path(args.html), png, args.width, args.height)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
