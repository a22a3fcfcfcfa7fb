"""The screenshot docs/figures/mlflow_runs.png: the MLflow UI as the README's link opens it, the pipeline
run expanded to its stage runs and their dataset inputs. A manual check, not a test (it needs Chromium):

    apt-get install chromium && pip install playwright      # Playwright drives the system's Chromium
    mlflow ui --backend-store-uri sqlite:///mlflow.db --port 5000 &
    python docs/figures/mlflow_runs.py http://127.0.0.1:5000 docs/figures/mlflow_runs.png

Without Playwright, `chromium --headless --screenshot=ui.png '<the README's link>'` shows the view alone.
"""

import sys

from playwright.sync_api import sync_playwright

base, out = sys.argv[1], sys.argv[2]
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
    page = browser.new_page(viewport={"width": 1500, "height": 620})
    page.goto(f"{base}/#/experiments/1?workflowType=machine_learning")
    page.wait_for_timeout(6000)
    expand = page.locator(
        'button[data-component-id$="runnamecellrenderer.tsx_46"]'
    )  # the "+" of a parent run
    if expand.count():
        expand.first.click()
        page.wait_for_timeout(3000)
    page.screenshot(path=out)
    browser.close()
