"""Notebook 05's playground in a real browser: JupyterLab + headless Chromium, driven by Playwright.

The Python-level tests (test_playground.py) prove the widget logic; this one proves what only a browser
can: that the widget renders in JupyterLab, that typing and clicking reach the kernel, and that the
progress bar and the image update on screen. It starts JupyterLab from this venv on 127.0.0.1 (a free port,
a random token, a temporary copy of the notebook so the repository copy stays output-free), opens notebook
05 in Debian's Chromium (``/usr/bin/chromium`` — Playwright never downloads a browser here), runs all cells
from the Run menu, types a prompt and a seed, picks a size, presses Generate and waits for the result. It
reads the image back out of the page and asks the scene judge whether it has the colour the typed prompt
names. It saves a screenshot to ``$SD35FP8_OUTPUT_DIR/screenshots/playground.png`` and ``outputs/screenshots/``
(ignored by git), and stops the server, the kernel and the browser whatever happens.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from sd35fp8_helpers.constants import EMBEDDED_MODEL_DIR
from sd35fp8_helpers.pipeline.defaults import read_model_info
from sd35fp8_helpers.serving.client import free_port

STEPS = read_model_info(EMBEDDED_MODEL_DIR)["inference"]["steps"]
"""The notebook's model is the embedded scene model; the playground starts at its own step count."""

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
"""Without the networking flags Chromium tries to reach Google at every start (refused here, and slow)."""
NOTEBOOK = "05_prompt_playground.ipynb"
LAB_SETTINGS = {"@jupyterlab/notebook-extension/tracker": {"autoStartDefaultKernel": True},  # no kernel dialog
                "@jupyterlab/apputils-extension/notification": {"fetchNews": "false"}}  # no news pop-up
TOTAL_SECONDS = 240  # the whole test normally needs about a minute; this bounds it on a slow machine
PROMPT, SEED = "a large yellow square on the right, on a black background", 1  # the scene model's vocabulary

pytestmark = [
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} is missing: install Debian's chromium "
                       "(sudo apt-get install -y chromium; ./bootstrap.sh test does it) to run the browser test"),
    pytest.mark.slow,
]


class Deadline:
    """One time budget for the whole test: each wait gets what is left (in Playwright's milliseconds)."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    def ms(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"browser test over its {TOTAL_SECONDS} s budget")
        return left * 1000


def _start_jupyterlab(root: Path, work: Path, deadline: Deadline) -> tuple[subprocess.Popen, str, str]:
    port, token = free_port(), secrets.token_hex(16)
    for name, values in LAB_SETTINGS.items():
        path = work / "config" / "lab" / "user-settings" / f"{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(work / "config"), "JUPYTER_RUNTIME_DIR": str(work / "runtime"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # SD35FP8_HOME / SD35FP8_OUTPUT_DIR come from conftest: the kernel uses the test session's folders.
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--ServerApp.terminals_enabled=False", "--allow-root"]  # CI containers run as root
    with open(work / "jupyterlab.log", "wb") as log:
        server = subprocess.Popen(cmd, env=env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/status?token={token}", timeout=2):
                    return server, url, token
            except OSError:
                if server.poll() is not None:
                    raise RuntimeError(f"JupyterLab exited: {(work / 'jupyterlab.log').read_text()[-2000:]}")
                deadline.ms()
                time.sleep(0.3)
    except BaseException:
        _stop(server)
        raise


def _wait_for_kernel(url: str, token: str, deadline: Deadline) -> None:
    """Until the notebook's kernel is idle with the browser connected: "Run All" before that can be lost."""
    while True:
        try:
            with urllib.request.urlopen(f"{url}/api/kernels?token={token}", timeout=5) as response:
                kernels = json.load(response)
        except urllib.error.HTTPError:  # jupyter_server answers 500 while a kernel is half-started
            kernels = []
        if any(k["execution_state"] == "idle" and k["connections"] > 0 for k in kernels):
            return
        deadline.ms()
        time.sleep(0.3)


def _stop(server: subprocess.Popen) -> list[psutil.Process]:
    """Stop the server and every process under it (kernels run in their own session); return survivors."""
    try:
        family = psutil.Process(server.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    server.terminate()  # JupyterLab shuts its kernels down on SIGTERM
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait(timeout=5)
    _, alive = psutil.wait_procs(family, timeout=10)
    for p in alive:
        p.kill()
    _, alive = psutil.wait_procs(alive, timeout=5)
    return alive


# Records, in the page, every width the progress bar takes and whether Generate was disabled meanwhile.
_WATCH = """([bar, button]) => {
  window.sd35fp8Watch = {widths: [], disabled: false};
  new MutationObserver(() => window.sd35fp8Watch.widths.push(bar.style.width))
    .observe(bar, {attributes: true, attributeFilter: ['style']});
  new MutationObserver(() => { if (button.disabled) window.sd35fp8Watch.disabled = true; })
    .observe(button, {attributes: true, attributeFilter: ['disabled']});
}"""


def test_playground_in_jupyterlab_and_chromium(tmp_path):
    from playwright.sync_api import sync_playwright

    deadline = Deadline(TOTAL_SECONDS)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    root = tmp_path / "notebooks"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / NOTEBOOK, root / NOTEBOOK)
    shots = Path(os.environ["SD35FP8_OUTPUT_DIR"]) / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    server, url, token = _start_jupyterlab(root, tmp_path, deadline)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), args=CHROMIUM_ARGS,
                headless=True, viewport={"width": 1400, "height": 1000})
            try:
                page = browser.pages[0] if browser.pages else browser.new_page()
                try:
                    page.goto(f"{url}/lab/tree/{NOTEBOOK}?token={token}", timeout=deadline.ms())
                    _wait_for_kernel(url, token, deadline)
                    _drive(page, deadline)
                finally:
                    page.screenshot(path=str(shots / "playground.png"))
            finally:
                browser.close()
    finally:
        survivors = _stop(server)
        local = REPO / "outputs" / "screenshots"
        if (shots / "playground.png").is_file():
            local.mkdir(parents=True, exist_ok=True)
            shutil.copy(shots / "playground.png", local / "playground.png")
    assert not survivors, f"processes left running: {survivors}"
    started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not started, f"the browser or the Playwright driver is still running: {started}"
    assert (shots / "playground.png").stat().st_size > 10_000


def _drive(page, deadline: Deadline) -> None:
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=deadline.ms())

    page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
    playground = page.locator(".sd35fp8-playground")
    playground.wait_for(timeout=deadline.ms())
    # the notebook generates 4 images (one, a compare pair, one restored from its PNG): then it is done
    page.wait_for_selector(".sd35fp8-gallery > :nth-child(4)", state="attached", timeout=deadline.ms())
    page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=deadline.ms())

    playground.scroll_into_view_if_needed()
    prompt = page.locator(".sd35fp8-prompt textarea")
    button = page.locator("button.sd35fp8-generate")
    prompt.fill("")  # a mistake first: it must come back as a message, with the button usable
    prompt.press("Tab")
    button.click()
    page.locator(".sd35fp8-message", has_text="is empty").wait_for(timeout=deadline.ms())
    assert "describe the image you want" in page.locator(".sd35fp8-message").inner_text()

    prompt.fill(PROMPT)
    prompt.press("Tab")  # ipywidgets text boxes sync on change
    seed = page.locator(".sd35fp8-seed input")
    seed.fill(str(SEED))
    seed.press("Enter")
    page.locator(".sd35fp8-size select").select_option(label="128×128 (square)")

    bar = page.locator(".sd35fp8-progress .progress-bar")
    page.evaluate(_WATCH, [bar.element_handle(), button.element_handle()])
    button.click()
    page.locator(".sd35fp8-info", has_text=f"seed {SEED}").wait_for(timeout=deadline.ms())

    image = page.locator(".sd35fp8-image")
    assert image.evaluate("img => img.tagName === 'IMG' && img.complete && img.naturalWidth") == 128
    assert page.locator(".sd35fp8-progress-text").inner_text().endswith(f"step {STEPS}/{STEPS}")
    assert bar.evaluate("b => b.style.width") == "100%"
    watch = page.evaluate("window.sd35fp8Watch")
    assert watch["disabled"], "Generate is disabled while the image is generated"
    assert not button.is_disabled(), "and enabled again afterwards"
    assert {"25%", "50%", "75%"} <= set(watch["widths"]), f"the bar moved step by step: {watch['widths']}"
    info = page.locator(".sd35fp8-info").inner_text()
    assert f"{STEPS} steps" in info and "128×128" in info and "peak" in info, info
    assert page.locator(".sd35fp8-message").inner_text().strip() == ""
    _judge_colour(image)
    # scroll so the screenshot shows the controls, the image and its metadata line
    page.locator(".sd35fp8-prompt").scroll_into_view_if_needed()


# The picture as its natural-size PNG: drawn onto a canvas in the page (the widget's blob URL is same-origin).
_PNG = """img => { const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  c.getContext('2d').drawImage(img, 0, 0); return c.toDataURL('image/png'); }"""


def _judge_colour(image) -> None:
    """The image on screen has the colour the typed prompt names (the scene judge, from pixels)."""
    from PIL import Image

    from sd35fp8_helpers.scenes import judge
    from sd35fp8_helpers.scenes.parse import read_prompt

    data = image.evaluate(_PNG)
    picture = Image.open(io.BytesIO(base64.b64decode(data.split(",", 1)[1])))
    verdict = judge(picture, read_prompt(PROMPT))
    assert verdict.objects[0].ok("colour"), f"typed {PROMPT!r}; the judge saw: {verdict.summary()}"
