"""What an operator sees in the Dagster UI, read from a real `dagster-webserver` by headless
Chromium: the asset page names the asset's owner, a partition page shows that partition's
materialisation metadata with an S3 URI naming the bucket and key, a check page shows the
check's description in words (the text `trace docs` prints), and a run page shows no internal
tag of the run launcher. Each page is also kept as a screenshot under the test's tmp dir.

One module fixture: a DAGSTER_HOME with the repository's warm run launcher, a webserver on a
free port (its own process group, stopped at the end) and one run of two block ranges of
blocks, transactions and logs launched through GraphQL, as the UI's Materialize button does.
"""

from __future__ import annotations

import itertools
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import dagster as dg
import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from infra.local.services import MotoS3Server, free_port
from tests.conftest import CHAIN_ID, RANGE_SIZE, Devnet, NewDatabase
from tests.utils.browser import headless_chrome
from trace_resources.chain.ranges import complete_ranges
from trace_resources.instance.run_launcher import WORKER_TAG
from trace_resources.registry import DEFAULT_OWNER, check_description, declarations
from trace_resources.storage.state import dispose_engine

REPO = Path(__file__).resolve().parents[2]
_counter = itertools.count()

ADD_PARTITION = """mutation($key: String!) { addDynamicPartition(partitionsDefName: "block_ranges",
  partitionKey: $key, repositorySelector: {repositoryName: "__repository__",
  repositoryLocationName: "trace"}) { __typename ... on PythonError { message } } }"""
LAUNCH = """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }"""
RUN = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status tags { key value } } } }"""


@dataclass
class Ui:
    url: str
    home: Path
    bucket: str
    keys: list[str]
    run_id: str


def _graphql(url: str, query: str, variables: dict[str, object]) -> dict[str, object]:
    response = httpx.post(
        f"{url}/graphql", json={"query": query, "variables": variables}, timeout=180
    )
    response.raise_for_status()
    return response.json()["data"]


def _wait_for_location(url: str, key: str, log: Path) -> None:
    """Until the webserver answers and has loaded the code location (adding a partition works)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            added = _graphql(url, ADD_PARTITION, {"key": key})["addDynamicPartition"]
            if added["__typename"] == "AddDynamicPartitionSuccess":  # type: ignore[index]
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def _launch(url: str, keys: list[str]) -> str:
    """One run of raw_chain_job over the ranges, with its checks (the UI's Materialize)."""
    tags = {
        "dagster/asset_partition_range_start": keys[0],
        "dagster/asset_partition_range_end": keys[-1],
    }
    params = {
        "selector": {
            "repositoryLocationName": "trace",
            "repositoryName": "__repository__",
            "jobName": "raw_chain_job",
        },
        "runConfigData": {},
        "executionMetadata": {"tags": [{"key": k, "value": v} for k, v in tags.items()]},
    }
    launched = _graphql(url, LAUNCH, {"p": params})["launchRun"]
    assert launched["__typename"] == "LaunchRunSuccess", launched  # type: ignore[index]
    return str(launched["run"]["runId"])  # type: ignore[index]


def _run(url: str, run_id: str) -> tuple[str, dict[str, str]]:
    run = _graphql(url, RUN, {"id": run_id})["runOrError"]
    return run["status"], {t["key"]: t["value"] for t in run["tags"]}  # type: ignore[index]


@pytest.fixture(scope="module")
def ui(
    tmp_path_factory: pytest.TempPathFactory,
    devnet: Devnet,
    new_database: NewDatabase,
    s3_server: MotoS3Server,
) -> Iterator[Ui]:
    tmp = tmp_path_factory.mktemp("ui")
    home = tmp / "dagster_home"
    home.mkdir()
    # the repository's warm run launcher, launching at submission (no daemon: Dagster's
    # default coordinator queues); run storage the default (SQLite under the home)
    (home / "dagster.yaml").write_text(
        "run_launcher:\n  module: trace_resources.instance.run_launcher\n"
        "  class: WarmRunLauncher\n"
        "run_coordinator:\n  module: dagster._core.run_coordinator\n"
        "  class: DefaultRunCoordinator\n"
        "telemetry:\n  enabled: false\n"
    )
    state_name = f"ui_state_{os.getpid()}_{next(_counter)}"
    state_dsn = new_database(state_name, "state")
    bucket = f"trace-ui-{os.getpid()}-{next(_counter)}"
    s3_server.s3_client().create_bucket(Bucket=bucket)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "TRACE_RPC_URL": devnet.url,
        "TRACE_CHAIN_ID": str(CHAIN_ID),
        "TRACE_RANGE_SIZE": str(RANGE_SIZE),
        "TRACE_RPC_RETRY_BUDGET_S": "20",
        "TRACE_STATE_DSN": state_dsn,
        "TRACE_OBJECT_STORE": "s3",
        "TRACE_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "TRACE_BUCKET_DATASETS": bucket,
        "TRACE_SENSORS_RUNNING": "false",
    }
    port = free_port()
    log_path = tmp / "webserver.log"
    log = log_path.open("w")
    webserver = subprocess.Popen(
        [
            str(Path(sys.executable).with_name("dagster-webserver")),
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=REPO,
        env=env,
        start_new_session=True,  # its own process group: stopped whole at the end
        stdout=subprocess.DEVNULL,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        keys = [r.key for r in complete_ranges(-1, devnet.finalized, RANGE_SIZE)][:2]
        _wait_for_location(url, keys[0], log_path)
        # what "Skip" on the UI's community pop-up does, so it does not cover the pages
        assert _graphql(url, "mutation { setNuxSeen }", {})["setNuxSeen"]
        for key in keys[1:]:
            added = _graphql(url, ADD_PARTITION, {"key": key})["addDynamicPartition"]
            assert added["__typename"] == "AddDynamicPartitionSuccess", added  # type: ignore[index]
        run_id = _launch(url, keys)
        deadline = time.monotonic() + 600  # a bound against a hang, not a speed check
        while (status := _run(url, run_id)[0]) not in ("SUCCESS", "FAILURE", "CANCELED"):
            assert time.monotonic() < deadline, status
            time.sleep(0.5)
        assert status == "SUCCESS", log_path.read_text()[-3000:]
        yield Ui(url, home, bucket, keys, run_id)
    finally:
        os.killpg(webserver.pid, signal.SIGINT)
        try:
            webserver.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(webserver.pid, signal.SIGKILL)
            webserver.wait()
        log.close()
        dispose_engine(state_dsn)


@pytest.fixture(scope="module")
def browser() -> Iterator[webdriver.Chrome]:
    with headless_chrome((1600, 1000)) as driver:
        yield driver


def _open(browser: webdriver.Chrome, url: str, *texts: str) -> str:
    """Open a page of the single-page app and wait until every text is rendered; its text."""
    browser.get(url)
    return _wait_for(browser, *texts)


def _wait_for(browser: webdriver.Chrome, *texts: str) -> str:
    """Wait until the page shows every text; the page's text."""
    body = ""

    def rendered(driver: webdriver.Chrome) -> bool:
        nonlocal body
        body = driver.find_element(By.TAG_NAME, "body").text
        return all(t in body for t in texts)

    try:
        WebDriverWait(browser, 60, poll_frequency=0.25).until(rendered)
    except TimeoutException:
        missing = [t for t in texts if t not in body]
        raise AssertionError(
            f"{browser.current_url} never showed {missing}; it shows:\n{body[:3000]}"
        ) from None
    return body


def _scroll_to(browser: webdriver.Chrome, text: str) -> None:
    """Bring the element showing exactly `text` to the middle of the window."""
    element = browser.find_element(By.XPATH, f"//*[text()='{text}']")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", element)


def _screenshot(browser: webdriver.Chrome, path: Path) -> None:
    """Save the page as PNG and check it is a real picture of the window, not an empty one."""
    browser.save_screenshot(str(path))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    width, height = struct.unpack(">II", data[16:24])  # the IHDR chunk
    assert (width, height) >= (1200, 700), (width, height)
    # a blank page of this size compresses to a few kB; a rendered Dagster page to far more
    assert len(data) > 40_000, (path, len(data))


def _asset_url(ui: Ui, asset: str, **query: str) -> str:
    params = "&".join(f"{k}={quote(v)}" for k, v in query.items())
    return f"{ui.url}/assets/{asset}" + (f"?{params}" if params else "")


def test_asset_page_names_the_owner(ui: Ui, browser: webdriver.Chrome, tmp_path: Path) -> None:
    assert declarations()["blocks"].owner == DEFAULT_OWNER
    team = DEFAULT_OWNER.removeprefix("team:")
    body = _open(browser, _asset_url(ui, "blocks"), "Owners", team, "One row per block of the")
    # the owner is listed under "Owners" in the definition panel
    assert body.index(team) > body.index("Owners"), body[:3000]
    _screenshot(browser, tmp_path / "asset_blocks.png")


def test_partition_page_shows_the_partition_and_an_s3_uri(
    ui: Ui, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    key = ui.keys[1]
    uri = f"s3://{ui.bucket}/blocks/"
    body = _open(
        browser,
        _asset_url(ui, "blocks", view="partitions", partition=key),
        key,
        "trace/uri",
        uri,
    )
    assert "trace/schema_version" in body  # the materialisation's metadata, not just the URI
    assert str(ui.home) not in body and "file://" not in body
    _scroll_to(browser, "trace/uri")
    _screenshot(browser, tmp_path / "partition_blocks.png")


@pytest.mark.parametrize(
    ("asset", "rule"), [("blocks", "one_row_per_block"), ("erc20_transfers", "rows_in_partition")]
)
def test_check_page_describes_the_rule_in_words(
    ui: Ui, browser: webdriver.Chrome, tmp_path: Path, asset: str, rule: str
) -> None:
    decl = declarations()[asset]
    declared = next(r for r in decl.quality if r.name == rule)
    text = check_description(decl, declared)
    # the UI renders the description as Markdown: code spans lose their backticks
    shown = text.replace("`", "")
    body = _open(browser, _asset_url(ui, asset, view="checks", checkDetail=rule), rule, shown[:60])
    assert shown in " ".join(body.split()), body[:3000]
    assert '"kind"' not in body and '"threshold"' not in body  # no JSON dump of the rule
    _screenshot(browser, tmp_path / f"check_{asset}_{rule}.png")


def test_run_page_hides_the_launchers_worker_tag(
    ui: Ui, browser: webdriver.Chrome, tmp_path: Path
) -> None:
    # the warm launcher did tag the run (terminate reads it) ...
    with dg.DagsterInstance.from_config(str(ui.home)) as instance:
        run = instance.get_run_by_id(ui.run_id)
        assert run is not None and WORKER_TAG in run.tags, run
    # ... but neither the GraphQL API nor the run page shows it
    _, tags = _run(ui.url, ui.run_id)
    assert "dagster/asset_partition_range_start" in tags
    assert not [k for k in tags if "run_worker" in k], tags
    _open(browser, f"{ui.url}/runs/{ui.run_id}", "Success", "View tags and config")
    browser.find_element(By.XPATH, "//*[text()='View tags and config']").click()
    body = _wait_for(browser, ui.keys[0], ui.keys[-1])  # the run's tags: its range
    assert "run_worker" not in body and '"pid"' not in body, body[:3000]
    _screenshot(browser, tmp_path / "run_tags.png")
