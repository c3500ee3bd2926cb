"""In a real browser: the ComfyUI frontend (headless system Chromium) on a real server with the pack,
used as a user does — node search, the template browser, Run, Stop — and screenshots for the docs.

The server's testkit rewrites queued prompts for the tiny seeded stand-ins (text encoders → the
testkit's, 256 px), so the shipped workflows are queued from the UI exactly as they open.
Screenshots go to docs/screenshots/ ($GLANCE_SCREENSHOTS overrides the folder).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = sorted(p.stem for p in (REPO / "workflows").glob("*.json"))
SHOTS = Path(os.environ.get("GLANCE_SCREENSHOTS") or REPO / "docs" / "screenshots")
DEMO_SHEET = REPO / "out" / "demo" / "sheet.png"
GLANCE_NODES = [
    "SlowFastScheduler",
    "PhaseAwareLoRALoader",
    "GlanceQwenNormCFG",
    "OneShotTrainer",
    "GlanceOfficialSampler",
]
ARCFLOW_NODES = ["ArcFlowLoader", "ArcFlowSampler", "ArcFlowDistiller"]
SAVE_IMAGE, TRAINER, LOSS_CURVE = 25, 10, 11  # node ids in the shipped workflows


@pytest.fixture(scope="module")
def ui(comfy_nodes, tmp_path_factory):
    """(ComfyPage, ComfyServer): one browser tab on a fresh server with the tiny workflow assets."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: run scripts/setup_browser.sh", pytrace=False)
    from devtools import browser, tiny_models

    if not Path(browser.CHROMIUM).exists():
        pytest.fail(f"Chromium not found at {browser.CHROMIUM}: run scripts/setup_browser.sh", pytrace=False)
    base = tmp_path_factory.mktemp("comfy_browser")
    tiny_models.write_workflow_assets(base / "models")
    tiny_models.write_example_image(base / "input")
    if DEMO_SHEET.exists():
        shutil.copy(DEMO_SHEET, base / "input" / "glance_demo_sheet.png")
    server = browser.start_server(base)
    try:
        with sync_playwright() as pw:
            chromium = browser.launch(pw)
            page = chromium.new_page(viewport=browser.VIEWPORT)
            yield browser.ComfyPage(page, server.url).open(), server
            chromium.close()
    finally:
        server.stop()


def _display_names(server, nodes: list[str]) -> list[str]:
    info = server.object_info()
    return [info[n]["display_name"] for n in nodes]


def test_node_search_finds_the_pack_nodes(ui):
    page, server = ui
    page.new_workflow()
    arcflow = page.search_nodes("ArcFlow")
    page.close_search()
    assert set(_display_names(server, ARCFLOW_NODES)) <= set(arcflow), arcflow
    glance = page.search_nodes("Glance")
    page.screenshot(SHOTS / "node_search.png")
    page.close_search()
    assert set(_display_names(server, GLANCE_NODES)) <= set(glance), glance
    assert page.alerts() == []


def test_every_workflow_opens_from_the_template_browser(ui):
    page, _ = ui
    assert sorted(page.template_names()) == WORKFLOWS
    page.screenshot(SHOTS / "template_browser.png")
    page.close_dialog()
    for name in WORKFLOWS:
        page.open_template(name)
        assert page.alerts() == [], f"{name}: {page.alerts()}"  # no missing-node dialog, no validation warning
        shipped = json.loads((REPO / "workflows" / f"{name}.json").read_text())
        assert sorted(page.node_types()) == sorted(n["type"] for n in shipped["nodes"])
        assert "Note" in page.node_types()
        page.fit_view()
        page.screenshot(SHOTS / f"workflow_{name}.png")
    # The check above can fail: a workflow with an unknown node type opens the missing-node dialog.
    broken = json.loads((REPO / "workflows" / "glance_flux_10step.json").read_text())
    broken["nodes"][0]["type"] = "NoSuchGlanceNode"
    page.page.evaluate("wf => app.loadGraphData(wf)", broken)
    page.page.wait_for_function("() => document.querySelector('[role=dialog]')", timeout=10_000)
    assert any("missing nodes" in a and "NoSuchGlanceNode" in a for a in page.alerts()), page.alerts()
    page.close_dialog()


def test_queue_the_demo_workflow_and_see_its_image(ui):
    page, _ = ui
    page.open_template("glance_flux_10step")
    page.clear_events()
    page.queue()
    page.wait_event("execution_success", timeout=180)
    image = page.node_image(SAVE_IMAGE)
    assert "type=output" in image["src"] and "glance_flux_10step_" in image["src"], image
    assert (image["width"], image["height"]) == (256, 256)
    assert page.alerts() == []
    page.fit_view()
    page.screenshot(SHOTS / "workflow_glance_flux_10step.png")


def test_stop_interrupts_training_and_the_canvas_stays_usable(ui):
    page, _ = ui
    page.open_template("glance_flux_train_one_image")
    page.clear_events()
    page.queue()
    page.wait_event("progress", node=str(TRAINER), timeout=120)  # the trainer is stepping
    t = time.time()
    page.stop()
    page.wait_event("execution_interrupted", timeout=30)
    assert time.time() - t < 15, "Stop took effect within seconds"
    assert not any(e[0] in ("execution_success", "execution_error") for e in page.events())
    assert page.alerts() == []
    # Still usable: the node search opens on the canvas, and the workflow (20 steps per expert instead of 60,
    # to keep the test short) runs to the end: loss curve and image appear.
    assert set(_display_names(ui[1], GLANCE_NODES)) <= set(page.search_nodes("Glance"))
    page.close_search()
    page.set_widget(TRAINER, "steps", 20)
    page.clear_events()
    page.queue()
    page.wait_event("execution_success", timeout=300)
    assert page.node_image(LOSS_CURVE)["width"] > 0
    assert page.node_image(SAVE_IMAGE)["width"] == 256
    page.fit_view([LOSS_CURVE])
    page.screenshot(SHOTS / "trainer_loss_curve.png")


def test_demo_sheet_shows_in_the_ui(ui):
    """The demo's side-by-side sheet (out/demo/sheet.png, from scripts/demo.sh) opened in a Load Image node."""
    page, _ = ui
    if not DEMO_SHEET.exists():
        pytest.skip("no out/demo/sheet.png (run scripts/demo.sh first); docs/screenshots/demo_sheet.png kept")
    page.new_workflow()
    node_id = page.page.evaluate(
        """() => { const n = LiteGraph.createNode('LoadImage'); n.pos = [0, 0]; app.graph.add(n);
                   const w = n.widgets.find(w => w.name === 'image'); w.value = 'glance_demo_sheet.png';
                   w.callback?.(w.value); n.title = 'Demo: out/demo/sheet.png'; return n.id }"""
    )
    image = page.node_image(node_id, timeout=30)
    ratio = image["width"] / image["height"]
    page.page.evaluate(
        "([id, r]) => { const n = app.graph.getNodeById(id); n.setSize([1400, 1400 / r + 110]); }", [node_id, ratio]
    )
    time.sleep(1.0)  # the node settles its size once the image is in
    page.fit_view([node_id])
    page.screenshot(SHOTS / "demo_sheet.png", scale=0.6)
