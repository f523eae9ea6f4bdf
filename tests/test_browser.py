"""The notebooks as a thesis author uses them: JupyterLab from the project's environment, driven in
headless Chromium through Playwright. Every notebook opens with the project's kernel; notebook 00
runs through the UI ("Run All Cells") without an error and its slice viewer redraws when its
slider moves. Screenshots go to runs/browser/ for a person to look at.

Needs Debian's `chromium` (or CHROMIUM=/path/to/chrome); skipped, with the reason, without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pytest

from kdlib.paths import HOME_ENV, STATIC_ENV, output_root, project_root
from kdlib.pipeline import list_notebooks

sync_api = pytest.importorskip("playwright.sync_api",
                               reason="playwright not installed: pip install -e '.[dev]'")

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
ROOT = project_root()
SHOTS = output_root() / "runs" / "browser"
START_S, OPEN_S, RUN_S, REDRAW_S = 180, 180, 600, 120  # generous: the machine may be busy
LAB_SETTINGS = {  # a quiet, predictable JupyterLab: every cell in the page, no autosave, no news
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false",
                                                    "checkForUpdates": False},
}
KERNEL_IDLE = ("() => window.jupyterapp.shell.currentWidget?.context?.sessionContext"
               "?.kernelDisplayStatus === 'idle'")
RUN_FINISHED = """() => {
  const w = window.jupyterapp.shell.currentWidget;
  const prompts = Array.from(w.content.node.querySelectorAll('.jp-InputPrompt'), e => e.textContent);
  return w.context.sessionContext.kernelDisplayStatus === 'idle'
    && prompts.some(t => /\\[\\d+\\]/.test(t)) && !prompts.some(t => t.includes('*'));
}"""
ERROR_OUTPUTS = """() => {
  const cells = window.jupyterapp.shell.currentWidget.content.model.cells, found = [];
  for (let i = 0; i < cells.length; i++) {
    const outputs = cells.get(i).outputs;
    for (let j = 0; outputs && j < outputs.length; j++) {
      const o = outputs.get(j).toJSON();
      if (o.output_type === 'error') found.push(`cell ${i}: ${o.ename}: ${o.evalue}`);
    }
  }
  return found;
}"""


@dataclass(frozen=True)
class Lab:
    """A running JupyterLab server: its URL, token and log file."""

    url: str
    token: str
    log: Path

    def api(self, path: str) -> Any:
        req = urllib.request.Request(f"{self.url}{path}",
                                     headers={"Authorization": f"token {self.token}"})
        with urllib.request.urlopen(req, timeout=10) as res:
            return json.loads(res.read())

    def page_url(self, notebook: Path, workspace: str) -> str:
        rel = notebook.relative_to(ROOT).as_posix()
        return f"{self.url}/lab/workspaces/{workspace}/tree/{rel}?token={self.token}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(log: Path) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-30:])


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server then shuts its kernels down), SIGKILL if it does not exit."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Iterator[Lab]:
    """JupyterLab from this environment on 127.0.0.1, a random port and token, root dir the
    project; outputs (data, runs, figures) and Jupyter's own files go to a temporary folder."""
    if not CHROMIUM:
        pytest.skip("chromium not found: apt-get install chromium (or set CHROMIUM=/path/to/it)")
    tmp = tmp_path_factory.mktemp("lab")
    for plugin, values in LAB_SETTINGS.items():
        path = tmp / "settings" / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, HOME_ENV: str(tmp / "home"), "JUPYTER_CONFIG_DIR": str(tmp / "config"),
           "JUPYTER_DATA_DIR": str(tmp / "data"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop(STATIC_ENV, None)  # the viewer must be the widget, as in a user's JupyterLab
    cmd = [str(Path(sys.executable).parent / "jupyter"), "lab", "--no-browser", "--ip",
           "127.0.0.1", f"--port={port}", f"--ServerApp.token={token}",
           f"--ServerApp.root_dir={ROOT}", f"--LabApp.user_settings_dir={tmp / 'settings'}",
           f"--LabApp.workspaces_dir={tmp / 'workspaces'}",
           f"--FileCheckpoints.checkpoint_dir={tmp / 'checkpoints'}",  # not notebooks/
           "--expose-app-in-browser"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = tmp / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    server = Lab(f"http://127.0.0.1:{port}", token, log)
    try:
        deadline = time.monotonic() + START_S
        while True:
            assert proc.poll() is None, f"jupyter lab exited:\n{_log_tail(log)}"
            assert time.monotonic() < deadline, f"jupyter lab did not answer:\n{_log_tail(log)}"
            try:
                server.api("/api/status")
                break
            except OSError:
                time.sleep(0.5)
        yield server
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def browser(lab) -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        yield context.new_page()
    finally:
        context.close()


@pytest.fixture
def repository_untouched() -> Iterator[None]:
    """The committed notebooks stay byte-identical and no checkpoint folder appears beside them."""
    def state() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted((ROOT / "notebooks").iterdir())}

    before = state()
    yield
    assert state() == before, "the browser test changed the notebooks/ folder"


def _open(page, lab: Lab, notebook: Path, workspace: str) -> None:
    page.goto(lab.page_url(notebook, workspace))
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=OPEN_S * 1000)
    page.wait_for_function(KERNEL_IDLE, timeout=OPEN_S * 1000)


def _shot(target, name: str) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    target.screenshot(path=str(path))
    return path


@pytest.mark.parametrize("notebook", list_notebooks(), ids=lambda p: p.stem)
def test_notebook_opens_with_the_projects_kernel(notebook, lab, page, repository_untouched):
    nb = nbformat.read(notebook, as_version=4)
    _open(page, lab, notebook, f"open-{notebook.stem[:2]}")
    shown = page.evaluate("""() => { const w = window.jupyterapp.shell.currentWidget;
        return {title: w.title.label, kernel: w.context.sessionContext.session.kernel.name,
                display: w.context.sessionContext.kernelDisplayName}; }""")
    spec = nb.metadata.kernelspec
    assert shown == {"title": notebook.name, "kernel": spec.name, "display": spec.display_name}
    argv0 = lab.api("/api/kernelspecs")["kernelspecs"][spec.name]["spec"]["argv"][0]
    assert argv0 in ("python", "python3", sys.executable), f"kernel runs {argv0}, not this env"
    cells = page.locator(".jp-Notebook .jp-Cell")
    assert cells.count() == len(nb.cells)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert page.locator(".jp-Notebook .jp-CodeCell .cm-editor").count() == len(code)
    title = nb.cells[0].source.splitlines()[0].lstrip("# ").strip()
    heading = page.locator(".jp-RenderedMarkdown h1").first.inner_text()
    assert heading.replace("\N{PILCROW SIGN}", "").strip() == title
    _shot(page, f"open_{notebook.stem}.png")


@pytest.mark.timeout(RUN_S + 2 * OPEN_S + REDRAW_S + 300)
def test_notebook_00_runs_in_the_ui_and_its_viewer_redraws(lab, page, repository_untouched):
    notebook = ROOT / "notebooks" / "00_data_exploration.ipynb"
    _open(page, lab, notebook, "run-00")
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    page.wait_for_function(RUN_FINISHED, timeout=RUN_S * 1000, polling=1000)
    _shot(page, "run_00_data_exploration.png")
    errors = page.evaluate(ERROR_OUTPUTS)
    assert not errors, f"cells show errors: {errors}"

    viewer = page.locator(".jp-OutputArea-output .widget-vbox").filter(
        has=page.locator(".widget-slider")).last
    image = viewer.locator(".widget-output img")
    image.wait_for(timeout=REDRAW_S * 1000)
    assert image.evaluate("img => img.naturalWidth > 100 && img.complete")
    slider = viewer.locator(".widget-slider")
    before_z, before_src = slider.locator(".widget-readout").inner_text(), image.get_attribute("src")
    before_png = _shot(viewer, "viewer_before.png").read_bytes()
    slider.locator(".noUi-handle").focus()
    page.keyboard.press("PageUp")  # one move of several slices: one redraw
    page.wait_for_function(
        "([node, src]) => { const img = node.querySelector('.widget-output img');"
        " return img && img.complete && img.getAttribute('src') !== src; }",
        arg=[viewer.element_handle(), before_src], timeout=REDRAW_S * 1000)
    after_z = slider.locator(".widget-readout").inner_text()
    assert int(after_z) > int(before_z)
    assert image.evaluate("img => img.naturalWidth > 100 && img.complete")
    assert image.get_attribute("src") != before_src
    assert _shot(viewer, "viewer_after.png").read_bytes() != before_png
    assert not page.evaluate(ERROR_OUTPUTS)
