"""The Dagster UI in a real browser: `dagster dev` on a free loopback port serving the project's code
location, headless Debian Chromium driven by Playwright: open the asset graph, launch a
materialisation of the data assets from the UI, wait until the run succeeds. Screenshots are kept
in `.test-artifacts/` (the asset graph and the finished run)."""
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ARTIFACTS = ROOT / ".test-artifacts"
CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.slow


@pytest.fixture
def dagster_ui(tmp_path, free_port, local_server):
    """`dagster dev` in a scratch folder (its ./.lake and DAGSTER_HOME there), stopped by its process group."""
    port = free_port()
    home = tmp_path / "home"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "infra/dagster/dagster.local.yaml").read_text())
    env = {**os.environ, "DAGSTER_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)}
    url = f"http://127.0.0.1:{port}"
    local_server(["env", "--default-signal=INT,TERM", str(BIN / "dagster"), "dev", "-h", "127.0.0.1", "-p", str(port),
                  "-w", str(ROOT / "workspace.yaml")], url + "/server_info", env, cwd=tmp_path)
    return url, tmp_path


def dismiss_welcome(page, wait_ms: int) -> None:
    """Close Dagster's first-visit dialog if it shows within `wait_ms` (it opens after the page loads)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    skip = page.get_by_role("button", name="Skip")
    try:
        skip.first.wait_for(state="visible", timeout=wait_ms)
    except PlaywrightTimeout:
        return
    skip.first.click()
    page.locator(".bp5-overlay-backdrop").first.wait_for(state="detached", timeout=10_000)


def test_materialize_the_data_assets_from_the_ui(dagster_ui):
    from playwright.sync_api import expect, sync_playwright
    url, workdir = dagster_ui
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        page.goto(url + "/asset-groups", wait_until="networkidle")
        dismiss_welcome(page, wait_ms=10_000)  # a first visit opens "Join the Dagster community"
        page.goto(url + "/locations/dagster_project.definitions/asset-groups/data", wait_until="networkidle")
        expect(page.get_by_text("interactions_raw").first).to_be_visible(timeout=60_000)
        dismiss_welcome(page, wait_ms=2_000)
        page.screenshot(path=str(ARTIFACTS / "asset-graph-data.png"))
        page.get_by_role("button", name="Materialize all").click()
        expect(page.get_by_text("Launched run").first).to_be_visible(timeout=60_000)
        page.goto(url + "/runs", wait_until="networkidle")
        success = page.get_by_text("Success").first
        for _ in range(120):
            if success.count() and success.is_visible():
                break
            time.sleep(2)
            page.reload(wait_until="networkidle")
        expect(success).to_be_visible(timeout=5_000)
        page.screenshot(path=str(ARTIFACTS / "run-succeeded.png"))
        page.goto(url + "/asset-groups", wait_until="networkidle")
        page.wait_for_timeout(2000)
        page.screenshot(path=str(ARTIFACTS / "asset-graph.png"))
        browser.close()
    assert (workdir / ".lake" / "movielens-1m-full" / "gold" / "sequences" / "_delta_log").is_dir()
