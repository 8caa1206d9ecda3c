"""Screenshots of the review and study pages (docs/figures/web_review.png, web_study.png).

Usage: python docs/figures/make_web_screenshots.py REAL_CASE SYNTHETIC_CASE OUT_DIR
(the synthetic case made from the real one: medsynth labels, then medsynth synthesize).
Needs the web extra, Playwright and /usr/bin/chromium.
"""
import subprocess, sys, time, socket, os
from playwright.sync_api import sync_playwright
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
def serve(args, port):
    p = subprocess.Popen([sys.executable, "-m", "MedSynthLib", "review", *args, "--port", str(port)],
                         stdout=open(os.devnull, "w"), stderr=subprocess.STDOUT)
    for _ in range(240):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close(); return p
        except OSError: time.sleep(0.5)
    raise SystemExit("server did not start")
def shoot(url, path, n, size, wait):
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
        page = b.new_page(viewport=size)
        page.goto(url)
        page.wait_for_function(f"() => Array.from(document.querySelectorAll('img')).filter(i => i.complete && i.naturalWidth > 0).length >= {n}", timeout=90000)
        time.sleep(wait)
        if "review" in path:
            page.click("#rating-4"); page.fill("#note", "oedema margin plausible; T1ce rim a little smooth"); time.sleep(1)
        page.screenshot(path=path)
        b.close()
real, syn, out = sys.argv[1:4]
p = serve([syn, "--pair", syn, real], 8741)
try: shoot("http://127.0.0.1:8741/", out + "/web_review.png", 8, {"width": 1600, "height": 900}, 6)
finally: p.terminate(); p.wait()
p = serve(["--study", real, "--synthetic", syn, "-o", out + "/study_results", "--n-per-class", "2", "--seed", "1"], 8742)
try: shoot("http://127.0.0.1:8742/", out + "/web_study.png", 1, {"width": 1200, "height": 800}, 4)
finally: p.terminate(); p.wait()
