"""Drive the real ComfyUI frontend (the ``comfyui-frontend-package`` the server serves) in headless
Chromium, as a user does: clicks, keys and what the page shows.

Chromium comes from the system (Debian's ``chromium`` package, ``scripts/setup_browser.sh``), driven by
the Playwright Python package with ``executable_path``: no browser download.
"""

from __future__ import annotations

import io
import os
import shutil
import time
from pathlib import Path

from .server import ComfyServer

#: The system Chromium ($GLANCE_CHROMIUM overrides).
CHROMIUM = os.environ.get("GLANCE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
VIEWPORT = {"width": 1600, "height": 900}
#: The frontend's user settings for a reproducible view: no first-run template dialog, no minimap, no
#: canvas statistics, open workflows listed in the sidebar (not as tabs), and node text drawn at every
#: zoom (so fitted screenshots stay readable).
SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
}
# Records the server's execution events in the page (the same websocket messages the UI shows).
_EVENT_LOG = """() => {
  window.__glance_events = [];
  for (const t of ['execution_start', 'executing', 'progress', 'executed', 'execution_success',
                   'execution_error', 'execution_interrupted'])
    app.api.addEventListener(t, (e) => window.__glance_events.push([t, e.detail ?? null]));
}"""
_MISSING = "This workflow has missing nodes"


def launch(playwright):
    """Headless system Chromium; a clear error when it is not installed."""
    if not Path(CHROMIUM).exists():
        raise FileNotFoundError(
            f"Chromium not found at {CHROMIUM}: run scripts/setup_browser.sh (apt-get install chromium)"
        )
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])


def start_server(base: Path, size: int = 256) -> ComfyServer:
    """A server for the browser: the testkit rewrites queued prompts for the tiny stand-ins at ``size`` px."""
    return ComfyServer(base, tiny_prompts=size, settings=SETTINGS).start()


class ComfyPage:
    """One browser tab on the ComfyUI frontend."""

    def __init__(self, page, url: str):
        self.page = page
        self.url = url
        self.page_errors: list[str] = []
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        # The "Try Nodes 2.0" banner is a one-time announcement: dismissed as a user would have.
        page.add_init_script("localStorage.setItem('vueNodesBannerDismissed', 'true')")

    def open(self, timeout: float = 90.0) -> ComfyPage:
        self.page.goto(self.url)
        self.page.wait_for_function(
            "() => window.app && app.graph && app.canvas && document.querySelector('.comfy-menu-button-wrapper')",
            timeout=timeout * 1000,
        )
        self.page.evaluate(_EVENT_LOG)
        return self

    # --- what the user sees --------------------------------------------------------------------
    def alerts(self) -> list[str]:
        """Texts of open dialogs and of warning/error toasts (missing nodes, workflow validation, errors)."""
        return self.page.evaluate(
            """() => [...document.querySelectorAll('[role=dialog], .p-toast-message-warn, .p-toast-message-error')]
                 .filter(e => e.offsetParent !== null).map(e => e.innerText.trim())"""
        )

    def node_types(self) -> list[str]:
        return self.page.evaluate("() => app.graph.nodes.map(n => n.type)")

    def events(self) -> list[tuple[str, object]]:
        return [tuple(e) for e in self.page.evaluate("() => window.__glance_events")]

    def clear_events(self) -> None:
        self.page.evaluate("() => { window.__glance_events.length = 0 }")

    # --- actions ---------------------------------------------------------------------------------
    def empty_spot(self) -> tuple[float, float]:
        """A point of the canvas with no node or group under it (and clear of the floating toolbars)."""
        spot = self.page.evaluate(
            """() => { const c = app.canvas.canvas.getBoundingClientRect();
                 for (let y = 200; y < c.height - 150; y += 40)
                   for (let x = 150; x < c.width - 350; x += 40) {
                     const [gx, gy] = app.canvas.ds.convertCanvasToOffset([x, y]);
                     if (!app.graph.getNodeOnPos(gx, gy) && !app.graph.getGroupOnPos(gx, gy))
                       return [c.left + x, c.top + y];
                   }
                 return null }"""
        )
        if spot is None:
            raise RuntimeError("no empty spot on the canvas")
        return tuple(spot)

    def search_nodes(self, query: str) -> list[str]:
        """Double-click the empty canvas, type ``query``: the names in the node search's result list."""
        box = self.page.locator(".comfy-vue-node-search-container input").first
        for attempt in range(3):  # a loaded machine can split a double-click into two clicks
            self.page.mouse.dblclick(*self.empty_spot())
            try:
                box.wait_for(state="visible", timeout=5_000)
                break
            except Exception:
                if attempt == 2:
                    raise
        self.page.keyboard.type(query)
        items = self.page.locator(".p-autocomplete-list .p-autocomplete-option")
        items.first.wait_for(state="visible", timeout=10_000)
        time.sleep(0.5)  # the list settles after the last keystroke
        return [t.split("\n")[0].strip() for t in items.all_inner_texts()]

    def close_search(self) -> None:
        self.page.keyboard.press("Escape")
        self.page.locator(".comfy-vue-node-search-container").first.wait_for(state="hidden", timeout=10_000)

    def close_dialog(self) -> None:
        """Close the open dialog (Escape, else its top-right X button); wait until nothing covers the page."""
        self.page.keyboard.press("Escape")
        time.sleep(0.3)
        close = self.page.evaluate(
            """() => { const d = document.querySelector('[role=dialog]'); if (!d) return null;
                 const top = d.getBoundingClientRect().top;
                 const b = [...d.querySelectorAll('button')].map(b => b.getBoundingClientRect())
                   .filter(r => r.width > 0 && r.top < top + 120).sort((a, b) => b.right - a.right)[0];
                 return b ? [b.left + b.width / 2, b.top + b.height / 2] : null }"""
        )
        if close:
            self.page.mouse.click(*close)
        self.wait_no_dialog()

    def wait_no_dialog(self, timeout: float = 10.0) -> None:
        self.page.wait_for_function(
            "() => !document.querySelector('[role=dialog], .p-dialog-mask')", timeout=timeout * 1000
        )

    def template_names(self, pack: str = "comfyui-glance") -> list[str]:
        """Workflow menu → Browse Templates → ``pack``: the templates listed (dialog left open)."""
        self.wait_no_dialog()
        self.page.locator(".comfy-menu-button-wrapper").click()
        self.page.get_by_role("menuitem", name="Browse Templates").click()
        dialog = self.page.get_by_role("dialog")
        dialog.get_by_text(pack, exact=True).click()
        cards = dialog.locator("[data-testid^='template-workflow-']")
        cards.first.wait_for(state="visible", timeout=10_000)
        return [c.get_attribute("data-testid").removeprefix("template-workflow-") for c in cards.all()]

    def open_template(self, name: str, pack: str = "comfyui-glance") -> None:
        """Load a workflow from the template browser; returns once its nodes are on the canvas."""
        self.template_names(pack)
        self.page.get_by_test_id(f"template-workflow-{name}").click()
        self.page.wait_for_function(
            "name => document.title.includes(name)",
            arg=name,
            timeout=10_000,
        )
        time.sleep(0.5)  # the missing-node dialog or a validation toast would show by now

    def fit_view(self, node_ids: list[int] | None = None) -> None:
        """Fit the canvas to the whole graph, or to ``node_ids`` (the '.' shortcut on a selection)."""
        self.page.evaluate(
            """ids => { app.canvas.deselectAll();
                        if (ids) for (const id of ids) app.canvas.select(app.graph.getNodeById(id)); }""",
            node_ids,
        )
        self.page.mouse.move(5, VIEWPORT["height"] // 2)
        self.page.locator("canvas#graph-canvas").focus()
        self.page.keyboard.press(".")
        time.sleep(0.6)
        self.page.evaluate("() => { app.canvas.deselectAll(); app.canvas.setDirty(true, true) }")
        time.sleep(0.3)

    def new_workflow(self) -> None:
        """Workflow menu → New: a blank canvas."""
        self.wait_no_dialog()
        self.page.locator(".comfy-menu-button-wrapper").click()
        self.page.get_by_role("menuitem", name="New", exact=True).click()
        self.page.wait_for_function("() => app.graph.nodes.length === 0", timeout=10_000)

    def queue(self) -> None:
        """The Run (queue) button."""
        self.page.get_by_role("button", name="Run", exact=True).click()

    def stop(self) -> None:
        """The Stop button next to Run ("Cancel current run")."""
        self.page.get_by_role("button", name="Cancel current run").click()

    def wait_event(self, kind: str, node: str | None = None, timeout: float = 120.0) -> tuple[str, object]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for event in self.events():
                if event[0] == kind and (node is None or (event[1] or {}).get("node") == node):
                    return event
            time.sleep(0.2)
        raise TimeoutError(f"no {kind} event (node {node}) within {timeout}s; events: {self.events()[-10:]}")

    def node_image(self, node_id: int, timeout: float = 180.0) -> dict:
        """Wait until node ``node_id`` shows an image (SaveImage / PreviewImage); its URL and size."""
        self.page.wait_for_function(
            """id => { const n = app.graph.getNodeById(id);
                       return n && n.imgs && n.imgs.length && n.imgs[0].complete && n.imgs[0].naturalWidth > 0 }""",
            arg=node_id,
            timeout=timeout * 1000,
        )
        return self.page.evaluate(
            """id => { const i = app.graph.getNodeById(id).imgs[0];
                       return {src: i.src, width: i.naturalWidth, height: i.naturalHeight} }""",
            node_id,
        )

    def set_widget(self, node_id: int, name: str, value) -> None:
        """Set a widget's value as typing it in would (the widget's callback runs)."""
        self.page.evaluate(
            """([id, name, value]) => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === name);
                 w.value = value; w.callback?.(value); app.graph.setDirtyCanvas(true, true); }""",
            [node_id, name, value],
        )

    def screenshot(self, path: Path, colors: int = 64, scale: float = 1.0) -> Path:
        """A PNG of the page, palette-quantised (a UI shot stays a few tens of KB), optionally scaled down."""
        from PIL import Image

        shot = Image.open(io.BytesIO(self.page.screenshot())).convert("RGB")
        if scale != 1.0:
            shot = shot.resize((round(shot.width * scale), round(shot.height * scale)), Image.LANCZOS)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        shot.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
            path, optimize=True
        )
        return path
