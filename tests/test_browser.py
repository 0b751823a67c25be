"""Every chapter as a learner meets it: JupyterLab in headless Chromium, Run All, then look.

nbval runs each notebook in a kernel and compares outputs; it never shows whether a widget
renders for a person. Here JupyterLab is started on a free 127.0.0.1 port over a copy of the
notebooks (outputs cleared, so nothing stale can pass and nothing in the repo is rewritten),
each chapter is opened in Chromium and run with JupyterLab's own "Run All", and then:

- no cell has an error output;
- every widget the committed chapter shows renders (none left "Loading widget..." or
  "Error displaying widget");
- each widget's first control, moved as a person moves it (arrow key on a slider handle,
  a click on a checkbox or toggle button, the next option of a dropdown), changes its output;
- a screenshot of the chapter's first widget goes to build/browser/ for a person to look at.

Run with `make test-browser` (CI's `.ci/run` installs Chromium first). Skipped, with the reason,
where Debian's `chromium` and `chromium-driver` are not installed.
"""
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

from minillm.bench.serve import free_port

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
SHOTS = ROOT / "build" / "browser"
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
RUN_LIMIT_S = 600  # one chapter's Run All; nbval holds each under 3 minutes

if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
    pytest.skip("no browser: install Debian's chromium and chromium-driver (see README), "
                "then run `make test-browser`", allow_module_level=True)
webdriver = pytest.importorskip("selenium.webdriver")
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

# JupyterLab settings for a test run: no news pop-up, every cell kept in the page (windowing off,
# so widgets below the fold render too), no autosave (the copies are thrown away anyway).
LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false"},
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}


def expected_widgets(path):
    """How many widget outputs the committed chapter shows."""
    nb = nbformat.read(path, as_version=4)
    return sum(WIDGET_MIME in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A JupyterLab server over cleared copies of the notebooks; yields its base URL and token."""
    root = tmp_path_factory.mktemp("lab")
    (root / "notebooks").mkdir()
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for cell in nb.cells:
            if cell.cell_type == "code":
                cell.outputs, cell.execution_count = [], None
        nbformat.write(nb, root / "notebooks" / path.name)
    (root / "data").symlink_to(ROOT / "data")  # chapters read ../data
    settings = root / "settings"
    for name, value in LAB_SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(value))
    port, token = free_port(), "minillm-browser-test"
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings),
               JUPYTERLAB_WORKSPACES_DIR=str(root / "workspaces"), JUPYTER_RUNTIME_DIR=str(root / "runtime"))
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
           f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
           f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(root / "lab.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail("JupyterLab did not start:\n" + (root / "lab.log").read_text()[-3000:])
            time.sleep(0.5)
    yield base, token
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
    log.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


# JavaScript run in the page. JupyterLab exposes its application as window.jupyterapp when
# started with expose_app_in_browser, the hook its own UI tests (Galata) use.
OPENED = """
const app = window.jupyterapp, w = app && app.shell.currentWidget;
return !!(w && w.content && w.content.model && w.sessionContext && w.sessionContext.session
          && w.sessionContext.session.kernel && w.sessionContext.session.kernel.connectionStatus === 'connected');
"""
RUN_ALL = """
const done = arguments[arguments.length - 1];
const app = window.jupyterapp, w = app.shell.currentWidget;
w.sessionContext.ready.then(() => {
  app.commands.execute('notebook:run-all-cells');   // not awaited: run_all polls the cells instead
  done(null);
}, e => done(String(e)));
"""
STATE = """
const w = window.jupyterapp.shell.currentWidget, cells = [];
for (const cell of w.content.widgets) {
  if (cell.model.type !== 'code') continue;
  cells.push({count: cell.model.executionCount, outputs: cell.model.outputs.toJSON()});
}
return {kernel: w.sessionContext.session.kernel.status, cells: cells};
"""
WIDGETS = """
const w = window.jupyterapp.shell.currentWidget;
const outs = w.content.node.querySelectorAll('.jp-Cell-outputArea > .jp-OutputArea-child > .jp-OutputArea-output');
return Array.from(outs).filter(o => o.querySelector(':scope > .jupyter-widgets')
                                    || /Loading widget|Error displaying widget/.test(o.innerText));
"""


SHUTDOWN = """
const done = arguments[arguments.length - 1];
window.jupyterapp.shell.currentWidget.sessionContext.shutdown().then(() => done(null), e => done(String(e)));
"""


def open_chapter(driver, base, token, name):
    driver.get(f"{base}/lab/tree/notebooks/{name}?token={token}&reset")
    WebDriverWait(driver, 120, poll_frequency=0.5).until(lambda d: d.execute_script(OPENED))


def run_all(driver):
    """Run All as the menu does, then wait until the kernel is idle with every cell run or one failed."""
    error = driver.execute_async_script(RUN_ALL)
    assert error is None, f"Run All failed in the page: {error}"
    deadline = time.monotonic() + RUN_LIMIT_S
    while True:
        state = driver.execute_script(STATE)
        errors = [o for c in state["cells"] for o in c["outputs"] if o.get("output_type") == "error"]
        finished = all(c["count"] is not None for c in state["cells"]) and state["kernel"] == "idle"
        if errors or finished:
            return state, errors
        assert time.monotonic() < deadline, f"Run All did not finish in {RUN_LIMIT_S} s"
        time.sleep(1)


def widget_text(el):
    return el.get_attribute("innerText") or ""


def outputs_of(widget):
    """What the widget shows: its output areas' HTML (text, tables, plots as data URLs)."""
    return [o.get_attribute("innerHTML") for o in widget.find_elements(By.CSS_SELECTOR, ".widget-output")]


def move_first_control(driver, widget):
    """Move the widget's first control as a person would; returns what was moved, or None."""
    handles = widget.find_elements(By.CSS_SELECTOR, ".widget-slider .noUi-handle")
    if handles:
        handles[0].click()
        handles[0].send_keys(Keys.ARROW_RIGHT)
        return "slider"
    boxes = widget.find_elements(By.CSS_SELECTOR, ".widget-checkbox input[type=checkbox]")
    if boxes:
        boxes[0].click()
        return "checkbox"
    toggles = [b for b in widget.find_elements(By.CSS_SELECTOR, ".widget-toggle-buttons button")
               if "mod-active" not in (b.get_attribute("class") or "")]
    if toggles:
        toggles[0].click()
        return "toggle button"
    selects = widget.find_elements(By.CSS_SELECTOR, ".widget-dropdown select")
    if selects:
        menu = Select(selects[0])
        chosen = menu.options.index(menu.first_selected_option)
        menu.select_by_index((chosen + 1) % len(menu.options))
        return "dropdown"
    return None


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_chapter_in_browser(lab, browser, path):
    base, token = lab
    open_chapter(browser, base, token, path.name)
    state, errors = run_all(browser)
    assert not errors, f"{path.name}: error output after Run All: " + "; ".join(
        f"{e.get('ename')}: {e.get('evalue')}" for e in errors)

    want = expected_widgets(path)
    assert want >= 1, f"{path.name} has no widget in its committed outputs"
    try:
        WebDriverWait(browser, 60, poll_frequency=0.5).until(
            lambda d: len(d.execute_script(WIDGETS)) == want and all(
                w.find_elements(By.CSS_SELECTOR, ".jupyter-widgets") and "Loading widget" not in widget_text(w)
                for w in d.execute_script(WIDGETS)))
    except TimeoutException:
        shown = browser.execute_script(WIDGETS)
        pytest.fail(f"{path.name}: {len(shown)} of {want} widgets rendered: "
                    + " | ".join(widget_text(w)[:80] for w in shown))
    widgets = browser.execute_script(WIDGETS)
    for w in widgets:
        assert "Error displaying widget" not in widget_text(w), f"{path.name}: {widget_text(w)[:200]}"

    browser.execute_script("arguments[0].scrollIntoView({block: 'start'});", widgets[0])
    SHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SHOTS / f"{path.stem}.png"))

    try:
        check_controls(browser, path, widgets)
    finally:
        browser.execute_async_script(SHUTDOWN)  # the next chapter gets the machine's cores and memory


def check_controls(browser, path, widgets):
    for i, w in enumerate(widgets):
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", w)
        before = outputs_of(w)
        moved = move_first_control(browser, w)
        if moved is None:  # e.g. a progress display: nothing to move
            continue
        try:
            WebDriverWait(browser, 60, poll_frequency=0.5).until(
                lambda d: outputs_of(w) != before and d.execute_script(STATE)["kernel"] == "idle")
        except TimeoutException:
            pytest.fail(f"{path.name}: widget {i}'s output did not change when its {moved} was moved")
        errors = [o for c in browser.execute_script(STATE)["cells"] for o in c["outputs"]
                  if o.get("output_type") == "error"]
        assert not errors, f"{path.name}: moving widget {i}'s {moved} raised {errors[0].get('ename')}"
        tracebacks = [o for o in w.find_elements(By.CSS_SELECTOR, ".jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']")]
        assert not tracebacks, f"{path.name}: widget {i} printed to stderr: {widget_text(tracebacks[0])[:200]}"
