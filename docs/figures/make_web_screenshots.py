"""Screenshots of the two pages of ``medsynth review`` (docs/figures/web_review.png, web_study.png).

Usage:
    python docs/figures/make_web_screenshots.py REAL_CASE SYNTHETIC_CASE STUDY_REAL_CASE OUT_DIR

SYNTHETIC_CASE is the case ``medsynth synthesize`` made from REAL_CASE's derived label map
(``medsynth labels REAL_CASE -o labels.nii.gz`` first): the review page shows the two together.  The
reader study pits SYNTHETIC_CASE against STUDY_REAL_CASE, another patient on the same grid (the study refuses
a synthetic case made from one of its own real cases: the reader would see that patient twice).  Needs the web
extra, Playwright and Debian's ``/usr/bin/chromium``; everything runs on the loopback address.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_review(args: list[str], port: int) -> tuple[subprocess.Popen, str]:
    """``medsynth review ARGS`` on the port and the address it printed (with its access token), once it accepts
    connections."""
    server = subprocess.Popen([sys.executable, "-m", "MedSynthLib", "review", *args, "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    printed = re.search(r"at (http://\S+/\?token=\S+) ", server.stdout.readline())
    if printed is None:
        server.terminate()
        raise SystemExit("medsynth review printed no address")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, printed[1]
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise SystemExit("medsynth review did not start within 120 s")


def screenshot(url: str, path: Path, views: int, width: int, height: int, rate: bool) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        page.wait_for_function(
            "n => Array.from(document.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth > 0)"
            ".length >= n", arg=views, timeout=90_000)
        page.wait_for_timeout(5_000)  # the full-quality frame follows the first, faster one
        if rate:  # show a filled-in form (not saved)
            page.click("#rating-4")
            page.fill("#note", "oedema margin plausible; T1ce rim a little smooth")
        page.screenshot(path=str(path))
        browser.close()


def check_study(real: str, synthetic: str) -> None:
    """The study's plan as the server will make it, checked here: its refusal in one line, not a server that
    never starts (its output goes nowhere)."""
    from MedSynthLib.evaluation.reader_study import plan_study
    from MedSynthLib.schema.errors import MedSynthError

    try:
        plan_study([real], [synthetic], seed=1, n_per_class=2)
    except MedSynthError as exc:
        raise SystemExit(f"the reader study of {real} and {synthetic} is refused: {exc}") from None


def main() -> None:
    if len(sys.argv) != 5:
        raise SystemExit(__doc__)
    real, synthetic, study_real, out = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])
    check_study(study_real, synthetic)
    out.mkdir(parents=True, exist_ok=True)
    pages = [
        ([synthetic, "--pair", synthetic, real], "web_review.png", 8, (1600, 900), True),
        (["--study", study_real, "--synthetic", synthetic, "-o", str(out / "study_results"), "--seed", "1",
          "--n-per-class", "2"], "web_study.png", 1, (1200, 800), False),
    ]
    for args, name, views, (width, height), rate in pages:
        port = free_port()
        server, address = start_review(args, port)
        try:
            screenshot(address, out / name, views, width, height, rate)
        finally:
            server.terminate()
            server.wait(timeout=30)
        print(out / name)


if __name__ == "__main__":
    main()
