"""Screenshot a local HTML file with headless Chromium, to check that a view renders as intended.

    python bench/screenshot_html.py runs/toy/04_score_tokens/critical_tokens.html
    python bench/screenshot_html.py page.html --out /tmp/page.png --width 1400 --height 1000

Needs a Chromium binary (Debian: `apt-get install -y chromium`); without one it says so and exits
0, so scripts and CI without a browser skip the check. The browser runs with no network features,
a throwaway profile and a time limit; exit code 1 when no PNG came out.
"""
import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
parser.add_argument("html", help="the HTML file to render")
parser.add_argument("--out", default=None, help="PNG path (default: the HTML path with .png)")
parser.add_argument("--width", type=int, default=1200, help="window width in pixels")
parser.add_argument("--height", type=int, default=900, help="window height in pixels")
parser.add_argument("--timeout", type=float, default=60, help="seconds before giving up")

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    return next((path for name in BROWSERS if (path := shutil.which(name))), None)


def screenshot(html: Path, out: Path, width: int = 1200, height: int = 900,
               timeout: float = 60) -> Path:
    """Render html to out (PNG); raises FileNotFoundError without a browser, RuntimeError when
    the browser produced no image."""
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError("no chromium found (apt-get install -y chromium)")
    out.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
               "--no-first-run", "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}",
               f"--screenshot={out}", f"--window-size={width},{height}",
               html.resolve().as_uri()]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if not out.is_file() or out.stat().st_size == 0:
        raise RuntimeError(f"{browser} wrote no screenshot (exit {res.returncode}): "
                           f"{res.stderr.strip()[-500:]}")
    return out


def main(args):
    html = Path(args.html)
    if not html.is_file():
        print(f"error: {html}: no such file", file=sys.stderr)
        raise SystemExit(2)
    if find_browser() is None:
        print("skipped: no chromium on PATH (apt-get install -y chromium); nothing rendered")
        return
    try:
        out = screenshot(html, Path(args.out or html.with_suffix(".png")), args.width,
                         args.height, args.timeout)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(1)
    print(f"{out} ({out.stat().st_size} bytes, {args.width}x{args.height})")


if __name__ == "__main__":
    main(parser.parse_args())
