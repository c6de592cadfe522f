"""The `/ui/` page and an embed, read by headless Chromium from the real service: sign in with
a pasted token, list datasets, run a query and see its rows, draw a chart, build a dashboard,
click a bar to drill down, and open a share link in an iframe of another loopback origin.
Every request must stay on loopback and the page's CSP must refuse nothing the page does
(no inline script, no eval). Screenshots are kept under the test's tmp dir.
"""

from __future__ import annotations

import http.server
import io
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from infra.local.services import free_port
from tests.dashboards.conftest import (
    PARAMETERS,
    TRANSFERS,
    TRANSFERS_SQL,
    Service,
    bearer,
    spec,
)
from tests.utils.browser import headless_chrome

BARS = "svg .mark-rect path"


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    logs = {"goog:loggingPrefs": {"performance": "ALL", "browser": "ALL"}}
    with headless_chrome((1600, 1200), logs) as driver:
        yield driver


class _Framing(http.server.BaseHTTPRequestHandler):
    page = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(self.page)))
        self.end_headers()
        self.wfile.write(self.page)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def other_origin() -> Iterator[tuple[str, type[_Framing]]]:
    """A second loopback origin (another port) serving one page: set `handler.page`."""
    handler = type("Framing", (_Framing,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _wait(browser: webdriver.Chrome, what: str, check: Any, timeout: float = 30) -> Any:
    try:
        return WebDriverWait(
            # a panel's table is replaced when it re-runs: read it again
            browser,
            timeout,
            poll_frequency=0.2,
            ignored_exceptions=[StaleElementReferenceException],
        ).until(lambda d: check(d))
    except TimeoutException:
        error = browser.execute_script(
            "const e = document.getElementById('error'); return e ? e.textContent : ''"
        )
        text = browser.find_element(By.TAG_NAME, "body").text[:2000]
        raise AssertionError(f"never saw {what}; error banner: {error!r}; page:\n{text}") from None


def _rows(container: WebElement) -> list[list[str]]:
    return [
        [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        for row in container.find_elements(By.CSS_SELECTOR, "tbody tr")
    ]


def _panel(browser: webdriver.Chrome, panel: str) -> WebElement:
    return browser.find_element(By.CSS_SELECTOR, f'.panel[data-panel="{panel}"]')


def _bars(browser: webdriver.Chrome, scope: str) -> list[WebElement]:
    return browser.find_elements(By.CSS_SELECTOR, f"{scope} {BARS}")


def _fill(browser: webdriver.Chrome, element_id: str, text: str) -> None:
    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(text)


def _colours(element: WebElement, path: Path) -> int:
    """Save the element's screenshot; the number of distinct colours in it."""
    png = element.screenshot_as_png
    path.write_bytes(png)
    image = Image.open(io.BytesIO(png)).convert("RGB")
    assert image.width > 300 and image.height > 150, image.size
    return len(image.getcolors(maxcolors=1 << 24) or [])


def _requests_left_loopback(browser: webdriver.Chrome) -> list[str]:
    """URLs of every request the browser sent since the last call that are not loopback."""
    urls = []
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    assert urls, "the performance log recorded no request"
    return [u for u in urls if not u.startswith(("http://127.0.0.1:", "data:", "about:"))]


def _csp_violations(browser: webdriver.Chrome) -> list[str]:
    return [
        e["message"]
        for e in browser.get_log("browser")
        if "Content Security Policy" in e["message"] or "Refused to" in e["message"]
    ]


def test_query_chart_dashboard_and_drill_down(
    service: Service, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    browser.get_log("performance"), browser.get_log("browser")  # start from this test
    browser.get(f"{service.url}/ui/")
    _fill(browser, "token-input", service.token("acme", "alice"))
    browser.find_element(By.ID, "token-save").click()
    assert browser.execute_script("return sessionStorage.getItem('trace.token')")
    assert "token" not in browser.current_url

    # datasets with their columns
    _wait(
        browser,
        "the datasets",
        lambda d: "org_acme__transfers" in d.find_element(By.ID, "dataset-list").text,
    )
    listed = browser.find_element(By.ID, "dataset-list").text
    assert "org_globex__secret" not in listed
    browser.find_element(By.XPATH, "//button[text()='org_acme__transfers']").click()
    _wait(
        browser,
        "the columns",
        lambda d: "from_address" in d.find_element(By.ID, "dataset-detail").text,
    )

    # a query, its rows, a bar chart of them
    _fill(
        browser,
        "sql",
        "SELECT day, sum(amount) AS volume FROM org_acme__transfers GROUP BY day ORDER BY day",
    )
    browser.find_element(By.ID, "run").click()
    result = browser.find_element(By.ID, "result")
    _wait(browser, "three rows", lambda d: len(_rows(result)) == 3)
    assert _rows(result) == [["2026-01-01", "60"], ["2026-01-02", "12"], ["2026-01-03", "10"]]
    Select(browser.find_element(By.ID, "chart-kind")).select_by_value("bar")
    Select(browser.find_element(By.ID, "chart-x")).select_by_value("day")
    Select(browser.find_element(By.ID, "chart-y")).select_by_value("volume")
    browser.find_element(By.ID, "draw").click()
    _wait(browser, "three bars", lambda d: len(_bars(d, "#chart")) == 3)
    heights = [b.rect["height"] for b in _bars(browser, "#chart")]
    assert heights[0] > heights[1] > heights[2] > 0, heights  # 60 > 12 > 10
    assert _colours(browser.find_element(By.ID, "chart"), tmp_path / "chart.png") > 20
    # a line over a time axis: one point per day, labelled by date
    Select(browser.find_element(By.ID, "chart-kind")).select_by_value("line")
    _wait(
        browser,
        "three points",
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#chart svg .mark-symbol path")) == 3,
    )
    assert "2026-01-02" in browser.find_element(By.ID, "chart").text
    assert _colours(browser.find_element(By.ID, "chart"), tmp_path / "line.png") > 20
    Select(browser.find_element(By.ID, "chart-kind")).select_by_value("number")
    _wait(
        browser,
        "the number",
        lambda d: d.find_element(By.CSS_SELECTOR, "#chart .big-number").text == "60",
    )

    # the query saved for the organisation: the dashboard's first panel uses it
    _fill(browser, "query-name", "Daily volume")
    browser.find_element(By.ID, "save-query").click()
    _wait(
        browser,
        "the saved query chosen",
        lambda d: (
            Select(d.find_element(By.ID, "saved-query")).first_selected_option.text
            == "Daily volume"
        ),
    )

    # a dashboard of two panels: daily volume drills into the transfers of the clicked day
    _fill(browser, "dash-name", "Drill demo")
    _fill(browser, "dash-params", json.dumps(PARAMETERS))
    _fill(browser, "panel-id", "daily")
    _fill(browser, "panel-title", "Daily volume")
    Select(browser.find_element(By.ID, "chart-kind")).select_by_value("bar")
    _fill(browser, "drill-panel", "transfers")
    _fill(browser, "drill-parameter", "day")
    _fill(browser, "drill-field", "day")
    browser.find_element(By.ID, "add-panel").click()
    _fill(browser, "sql", TRANSFERS_SQL)
    Select(browser.find_element(By.ID, "chart-kind")).select_by_value("table")
    _fill(browser, "panel-id", "transfers")
    _fill(browser, "panel-title", "Transfers")
    for field in ("drill-panel", "drill-parameter", "drill-field"):
        browser.find_element(By.ID, field).clear()
    browser.find_element(By.ID, "add-panel").click()
    browser.find_element(By.ID, "save-dashboard").click()
    _wait(
        browser, "the dashboard's bars", lambda d: len(_bars(d, '.panel[data-panel="daily"]')) == 3
    )
    transfers = _panel(browser, "transfers")
    _wait(browser, "every transfer", lambda d: len(_rows(transfers)) == len(TRANSFERS))
    acme = bearer(service.token())
    listed = httpx.get(f"{service.url}/v1/dashboards", headers=acme).json()
    (dashboard_id,) = [d["id"] for d in listed["data"] if d["name"] == "Drill demo"]
    stored = httpx.get(f"{service.url}/v1/dashboards/{dashboard_id}", headers=acme).json()
    queries = httpx.get(f"{service.url}/v1/saved-queries", headers=acme).json()["data"]
    (daily,) = [q for q in queries if q["name"] == "Daily volume"]
    assert stored["spec"]["panels"][0]["query_id"] == daily["id"]
    assert stored["spec"]["panels"][1]["sql"] == TRANSFERS_SQL

    # click the bar of 2026-01-03: the transfers panel re-runs with day = 2026-01-03
    browser.execute_script(
        "arguments[0].scrollIntoView({block: 'center'})",
        _bars(browser, '.panel[data-panel="daily"]')[2],
    )
    _bars(browser, '.panel[data-panel="daily"]')[2].click()
    _wait(
        browser,
        "the day's transfers",
        lambda d: [r[0] for r in _rows(_panel(d, "transfers"))] == ["105", "106", "107", "108"],
    )
    assert "day = 2026-01-03" in _panel(browser, "transfers").text
    browser.save_screenshot(str(tmp_path / "dashboard.png"))

    # an edit is a new version; the older one stays readable
    browser.find_element(By.ID, "edit-dashboard").click()
    _fill(browser, "dash-name", "Drill demo renamed")
    browser.find_element(By.ID, "save-dashboard").click()
    title = browser.find_element(By.ID, "dashboard-title")
    _wait(browser, "version 2", lambda d: title.text == "Drill demo renamed (version 2)")
    Select(browser.find_element(By.ID, "version")).select_by_value("1")
    _wait(
        browser,
        "version 1",
        lambda d: d.find_element(By.ID, "dashboard-title").text == "Drill demo (version 1)",
    )

    assert _requests_left_loopback(browser) == []
    assert _csp_violations(browser) == []


def test_embed_link_renders_in_an_iframe_of_another_origin(
    service: Service,
    browser: webdriver.Chrome,
    other_origin: tuple[str, type[_Framing]],
    tmp_path: Path,
) -> None:
    acme = bearer(service.token())
    dashboard = httpx.post(f"{service.url}/v1/dashboards", json=spec("Embedded"), headers=acme)
    assert dashboard.status_code == 201, dashboard.text
    embed = httpx.post(
        f"{service.url}/v1/dashboards/{dashboard.json()['id']}/embeds",
        json={"ttl_s": 600},
        headers=acme,
    ).json()
    origin, handler = other_origin
    handler.page = (
        "<!doctype html><html><body><h1>Partner page</h1>"
        f'<iframe id="embed" src="{service.url}{embed["url"]}" width="1100" height="900"></iframe>'
        "</body></html>"
    ).encode()
    browser.get_log("performance"), browser.get_log("browser")
    browser.get(f"{origin}/")
    frame = browser.find_element(By.ID, "embed")
    browser.switch_to.frame(frame)
    try:
        _wait(
            browser, "the embedded bars", lambda d: len(_bars(d, '.panel[data-panel="daily"]')) == 3
        )
        _wait(
            browser,
            "the embedded transfers",
            lambda d: len(_rows(_panel(d, "transfers"))) == len(TRANSFERS),
        )
        assert browser.execute_script("return window.location.hash") == ""  # token dropped
        assert "Drill demo" not in browser.find_element(By.TAG_NAME, "body").text
        _bars(browser, '.panel[data-panel="daily"]')[0].click()
        _wait(
            browser,
            "the drill-down in the embed",
            lambda d: [r[0] for r in _rows(_panel(d, "transfers"))] == ["100", "101", "102"],
        )
    finally:
        browser.switch_to.default_content()
    assert _colours(frame, tmp_path / "embed.png") > 20
    left = _requests_left_loopback(browser)
    assert left == []
    assert _csp_violations(browser) == []


def test_page_headers_allow_framing_of_embeds_only(service: Service) -> None:
    page = httpx.get(f"{service.url}/ui/")
    assert page.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
    csp = page.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "unsafe" not in csp
    embed = httpx.get(f"{service.url}/ui/embed/00000000-0000-0000-0000-000000000000")
    assert "x-frame-options" not in embed.headers
    assert embed.headers["content-security-policy"].endswith("frame-ancestors *")
    bundle = httpx.get(f"{service.url}/ui/static/vega.js")
    assert bundle.status_code == 200 and "window.vegaEmbed" in bundle.text
    assert httpx.get(f"{service.url}/ui/static/..%2Fapp.py").status_code == 404
