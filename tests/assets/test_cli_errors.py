"""The `trace` command answers an operator's mistakes in one line: an unknown name is refused
with what exists, a missing service (database, object store, RPC node, DAGSTER_HOME) is named
with the command that starts it, and no mistake shows a traceback. Long work shows progress
(a bar on a terminal, lines otherwise), tables are aligned, every option has help.

Unknown names run through the real entry (`trace_assets.cli.main`) in this process, against
real PostgreSQL and the S3 API; missing services run `.venv/bin/trace` as a subprocess."""

from __future__ import annotations

import argparse
import os
import pty
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow as pa
import pytest

from infra.local.services import MotoS3Server, free_port
from tests.conftest import NewDatabase
from trace_assets.cli import build_parser, main
from trace_resources.alert_pipeline.rules import RuleStore, parse_rule
from trace_resources.alert_pipeline.tables import data_engine
from trace_resources.resources import ObjectStoreResource, StateStoreResource
from trace_resources.storage.commit import PartitionData

TRACE = Path(sys.executable).with_name("trace")
KEYS = [f"{s:012d}-{s + 49:012d}" for s in (0, 50, 100)]
HOOK, SECRET = "http://127.0.0.1:9/hook", "test-webhook-secret-0123456789"


@dataclass
class Result:
    code: int
    out: str
    err: str


def refused(result: Result, *names: str) -> str:
    """A refusal: exit 2, one line on stderr naming every one of `names`, no traceback."""
    assert result.code == 2, (result.code, result.out, result.err)
    assert "Traceback" not in result.err + result.out
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.fixture
def lake(
    state: StateStoreResource,
    objects: ObjectStoreResource,
    new_database: NewDatabase,
    s3_server: MotoS3Server,
    monkeypatch: pytest.MonkeyPatch,
) -> StateStoreResource:
    """Committed `blocks` (three ranges, the first twice) and an org's dataset, with a rule."""
    with state.writer(objects) as writer:
        for n, key in enumerate([*KEYS, KEYS[0]]):
            first = int(key[:12])
            # the first range twice, with different rows (identical data keeps its version)
            rows = 5 if n < len(KEYS) else 6
            table = pa.table({"block_number": pa.array(range(first, first + rows), pa.uint64())})
            writer.write("blocks", key, PartitionData(table))
        labels = pa.table({"address": pa.array([b"\x11" * 20], pa.binary())})
        writer.write("org_acme__labels", "all", PartitionData(labels))
    data_dsn = new_database(f"data_cli_{os.getpid()}_{id(state)}", "data")
    RuleStore(data_engine(data_dsn)).create(
        parse_rule(
            {
                "org": "acme",
                "id": "big-transfers",
                "condition": {"kind": "custom_sql", "sql": "SELECT 1 AS n FROM blocks"},
                "channels": [{"kind": "webhook", "name": "ops", "url": HOOK, "secret": SECRET}],
            }
        )
    )
    for name, value in {
        "TRACE_STATE_DSN": state.dsn,
        "TRACE_DATA_DSN": data_dsn,
        "TRACE_OBJECT_STORE": "s3",
        "TRACE_S3_ENDPOINT_URL": s3_server.endpoint_url,
        "TRACE_BUCKET_DATASETS": objects.bucket_datasets,
    }.items():
        monkeypatch.setenv(name, value)
    return state


def run(capsys: pytest.CaptureFixture[str], *args: str) -> Result:
    """The real `trace` entry in this process."""
    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def test_storage_and_access_commands_refuse_unknown_names(
    lake: StateStoreResource,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    datasets = ["blocks", "logs", "org_acme__labels"]  # listed (declared or committed)
    # versions: dataset, partition (closest keys); a known one prints an aligned table
    refused(run(capsys, "versions", "blockz"), "'blockz'", *datasets)
    line = refused(run(capsys, "versions", "blocks", "--partition", "000000000050-000000000098"))
    assert "partition '000000000050-000000000098' of blocks" in line and KEYS[1] in line
    listed = run(capsys, "versions", "blocks")
    assert listed.code == 0, listed.err
    rows = listed.out.splitlines()
    assert rows[0].split() == ["partition", "version", "mode", "rows", "bytes", "committed"]
    assert [r.split()[:3] for r in rows[1:3]] == [["*", KEYS[0], "v2"], [KEYS[0], "v1", "replace"]]
    # every row's columns start where the header's do
    starts = [rows[0].index("version"), rows[0].index("mode")]
    for row in rows[1:]:
        assert [row.index(" v") + 1, row.index(" replace") + 1] == starts, listed.out

    # datasets: aligned, numbers right-aligned; without the chain the lag is unknown ("-")
    monkeypatch.setenv("TRACE_RPC_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("TRACE_RPC_MAX_ATTEMPTS", "1")
    summary = run(capsys, "datasets")
    assert summary.code == 0 and "lag unknown" in summary.err
    header, *rows = summary.out.splitlines()
    assert header.split()[:5] == ["dataset", "partitions", "rows", "bytes", "versions"]
    by_name = {row.split()[0]: row for row in rows}
    assert by_name["blocks"].split()[1:3] == ["3", "16"] and by_name["blocks"].split()[5] == "-"
    assert {len(row) for row in rows} == {len(header)}  # every column ends where its header does

    # gc, staging-cleanup, compact: --dataset and partitions; sealed partitions are named
    refused(run(capsys, "gc", "--dataset", "blocks", "--dataset", "nope"), "'nope'", *datasets)
    refused(run(capsys, "staging-cleanup", "--dataset", "logz"), "'logz'", "logs")
    refused(run(capsys, "compact", "nope"), "'nope'", *datasets)
    refused(run(capsys, "compact", "blocks", "--partition", "x"), "'x'", KEYS[0], KEYS[2])
    refused(run(capsys, "compact", "blocks", "--partition", KEYS[1]), KEYS[1], "sealed")

    # public: add of a dataset that does not exist, remove of one not added, list shows all
    refused(run(capsys, "public", "add", "nope"), "'nope'", *datasets)
    refused(run(capsys, "public", "remove", "blocks"), "blocks", "declaration", "public: false")
    refused(run(capsys, "public", "remove", "org_acme__labels"), "org_acme__labels", "no")
    assert run(capsys, "public", "add", "org_acme__labels").code == 0
    published = run(capsys, "public", "list")
    assert published.code == 0, published.err
    by_name = {line.split()[0]: line for line in published.out.splitlines()[1:]}
    assert {"blocks", "transactions", "logs", "org_acme__labels"} <= set(by_name)
    assert "declaration" in by_name["blocks"] and "trace public add" in by_name["org_acme__labels"]

    # tokens: datasets and partitions that exist, an org id, a token id
    refused(
        run(capsys, "token", "issue", "--org", "acme", "--subject", "a", "--dataset", "blockz"),
        "'blockz'",
        "blocks",
    )
    task = ["token", "issue", "--org", "acme", "--subject", "a", "--task", "t"]
    refused(
        run(capsys, *task, "--dataset", "blocks", "--partition", "blocks:000000000100-1"),
        "'000000000100-1' of blocks",
        KEYS[2],
    )
    refused(run(capsys, "token", "issue", "--org", "Acme!", "--subject", "a"), "'Acme!'")
    refused(run(capsys, "token", "revoke", "not-a-token-id"), "'not-a-token-id'", "UUID")
    refused(run(capsys, "token", "keygen", "--kid", "bad kid!"), "'bad kid!'", "key id")

    # files: a rule file and an output directory that do not exist
    refused(run(capsys, "alerts", "rule", "create", str(tmp_path / "no.yaml")), "no.yaml")
    refused(run(capsys, "docs", "--output", str(tmp_path / "no" / "x.md")), "x.md", "No such")
    refused(
        run(capsys, "lineage", "impacted", "--dataset", "blockz", "--columns", "x"),
        "'blockz'",
        "blocks",
    )


def test_alert_commands_refuse_unknown_names(
    lake: StateStoreResource,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    refused(run(capsys, "alerts", "rule", "list", "--org", "acmee"), "'acmee'", "acme")
    refused(run(capsys, "alerts", "rule", "disable", "acme", "big"), "'big'", "big-transfers")
    refused(run(capsys, "dlq", "list", "--org", "nobody"), "'nobody'", "acme")
    refused(run(capsys, "dlq", "list", "--channel", "acme/opz"), "'acme/opz'", "acme/ops")
    refused(run(capsys, "dlq", "replay", "--key", "k-1"), "'k-1'", "no dead letters")
    refused(run(capsys, "dlq", "replay"), "--all")
    listed = run(capsys, "alerts", "rule", "list")
    assert listed.code == 0 and listed.out.splitlines()[1].split()[:3] == [
        "acme/big-transfers",
        "v1",
        "enabled",
    ]
    rule = tmp_path / "rule.yaml"
    rule.write_text(
        "org: acme\nid: r\ncondition: {kind: custom_sql, sql: SELECT 1 AS n FROM blocks}\n"
        f"channels: [{{kind: webhook, name: ops, url: '{HOOK}', secret: {SECRET}}}]\n"
    )
    line = refused(
        run(capsys, "alerts", "backtest", "--rule", str(rule), "--from-block", "5000"),
        "no committed block range",
    )
    assert f"{KEYS[0]} .. {KEYS[2]} (3 range(s))" in line

    monkeypatch.setenv("TRACE_SECRETS_KEYS", "no-key-here")
    refused(run(capsys, "secrets", "rotate"), "TRACE_SECRETS_KEYS", "'no-key-here'")


# -- missing services, through the installed command --------------------------------------


def trace(*args: str, env: dict[str, str], stderr: int | None = None) -> Result:
    done = subprocess.run(
        [str(TRACE), *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=stderr if stderr is not None else subprocess.PIPE,
        text=True,
        timeout=120,
    )
    return Result(done.returncode, done.stdout, done.stderr or "")


class _NotFound(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def not_found_url() -> Iterator[str]:
    """A real HTTP server that answers 404 to every POST (a URL that is not a node's)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/wrong/path"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_missing_services_are_named_with_the_command_that_starts_them(
    state_dsn: str,
    s3_bucket: str,
    not_found_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # a stopped database, through the installed command and in process
    stopped = f"postgresql+psycopg2://trace:trace@127.0.0.1:{free_port()}/trace_state"
    down = {"TRACE_STATE_DSN": stopped, "TRACE_DATA_DSN": stopped}
    refused(trace("datasets", env=down), "PostgreSQL does not answer", "make services-up")
    refused(trace("db", "current", env=down), "Postgres state", "make services-up")
    with monkeypatch.context() as env:
        for name, value in down.items():
            env.setenv(name, value)
        for args in (["versions", "blocks"], ["alerts", "rule", "list"], ["public", "list"]):
            refused(run(capsys, *args), "PostgreSQL does not answer", "make services-up")
        # the traceback of any failure, when asked for
        assert "Traceback" in run(capsys, "--debug", "datasets").err
        env.setenv("TRACE_DEBUG", "1")
        assert "Traceback" in run(capsys, "datasets").err

    # the object store
    monkeypatch.setenv("TRACE_STATE_DSN", state_dsn)
    monkeypatch.setenv("TRACE_OBJECT_STORE", "s3")
    monkeypatch.setenv("TRACE_S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("TRACE_BUCKET_DATASETS", s3_bucket)
    refused(
        run(capsys, "staging-cleanup", "--dataset", "blocks"),
        "object store does not answer",
        "make services-up",
    )

    # the RPC node: down, a URL without a scheme, a URL that is not a node's (HTTP 404)
    monkeypatch.setenv("TRACE_RPC_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("TRACE_RPC_RETRY_BUDGET_S", "1")
    monkeypatch.setenv("TRACE_RPC_URL", f"http://127.0.0.1:{free_port()}")
    refused(run(capsys, "head"), "RpcUnreachableError", "make services-up")
    monkeypatch.setenv("TRACE_RPC_URL", "127.0.0.1:18545")
    refused(run(capsys, "head"), "TRACE_RPC_URL", "http(s) URL", "'127.0.0.1:18545'")
    monkeypatch.setenv("TRACE_RPC_URL", not_found_url)
    line = refused(run(capsys, "head"), "HTTP 404", not_found_url)
    assert "RpcRefusedError" in line and "TRACE_RPC_URL" in line and "rate limit" not in line
    monkeypatch.setenv("TRACE_RANGE_SIZE", "many")
    refused(run(capsys, "head"), "TRACE_RANGE_SIZE", "integer")
    monkeypatch.delenv("TRACE_RANGE_SIZE")

    # the Dagster webserver `trace backfill` launches on: down, not an http(s) URL, not one
    monkeypatch.setenv("TRACE_DAGSTER_URL", f"http://127.0.0.1:{free_port()}")
    refused(run(capsys, "backfill"), "no Dagster webserver answers", "make dev")
    monkeypatch.setenv("TRACE_DAGSTER_URL", "127.0.0.1:3000")
    refused(run(capsys, "backfill"), "TRACE_DAGSTER_URL='127.0.0.1:3000'", "http(s) URL")
    monkeypatch.setenv("TRACE_DAGSTER_URL", "http://127.0.0.1:port")
    refused(run(capsys, "backfill"), "TRACE_DAGSTER_URL='http://127.0.0.1:port'", "http(s) URL")
    monkeypatch.setenv("TRACE_DAGSTER_URL", not_found_url)
    refused(run(capsys, "backfill"), f"{not_found_url}/graphql answered HTTP 404", "make dev")

    # DAGSTER_HOME unset or not a directory
    unset = {k: v for k, v in os.environ.items() if k != "DAGSTER_HOME"}
    done = subprocess.run(
        [str(TRACE), "partitions", "sync"], env=unset, capture_output=True, text=True, timeout=120
    )
    refused(Result(done.returncode, done.stdout, done.stderr), "DAGSTER_HOME is not set")
    missing = str(tmp_path / "no_home")
    impacted = ["lineage", "impacted", "--dataset", "logs", "--columns", "address", "--launch"]
    refused(
        trace(*impacted, env={"DAGSTER_HOME": missing}),
        f"DAGSTER_HOME={missing} is not a directory",
        "make dev",
    )
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    refused(run(capsys, "gaps"), "DAGSTER_HOME is not set")


def test_gc_shows_progress(lake: StateStoreResource, capsys: pytest.CaptureFixture[str]) -> None:
    # not a terminal: one line per dataset on stderr, the report on stdout
    plain = run(capsys, "gc", "--keep-last", "1", "--older-than", "0s")
    assert plain.code == 0, plain.err
    assert "gc: 1/2 blocks" in plain.err and "gc: 2/2 org_acme__labels" in plain.err
    assert f"would remove blocks {KEYS[0]} v1" in plain.out

    # a terminal: a progress bar, ending complete
    env = {k: os.environ[k] for k in os.environ if k.startswith("TRACE_")}
    leader, follower = pty.openpty()
    try:
        on_tty = trace("gc", "--dataset", "blocks", env=env, stderr=follower)
        os.close(follower)
        screen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the terminal closed: everything is read
                break
            if not chunk:
                break
            screen += chunk
    finally:
        os.close(leader)
    assert on_tty.code == 0, on_tty.out
    text = screen.decode(errors="replace")
    assert "━" in text and "1/1" in text and "gc: 1/1" not in text
    assert "gc: 0 version(s)" in on_tty.out


def test_every_command_and_option_has_help() -> None:
    missing = []

    def walk(parser: argparse.ArgumentParser, path: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    if not helps.get(name):
                        missing.append(f"{path} {name}")
                    walk(sub, f"{path} {name}")
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")

    walk(build_parser(), "trace")
    assert missing == []


class _KeepAliveGraphql(BaseHTTPRequestHandler):
    """Answers every POST with a GraphQL result on a kept-alive connection, and closes the
    connection once it sat idle for 0.2 s (as uvicorn does after its keep-alive timeout)."""

    protocol_version = "HTTP/1.1"
    timeout = 0.2
    connections: list[int] = []  # the client port of each request's connection

    def do_POST(self) -> None:  # noqa: N802 (the handler's protocol)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.connections.append(self.client_address[1])  # the client side's port
        body = b'{"data": {"answer": 42}}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def test_backfill_reconnects_when_the_webserver_closed_an_idle_connection() -> None:
    """`trace backfill` keeps one connection to the webserver; after a long quiet stretch of a
    run, the server has closed it, and the next call opens a new one instead of failing."""
    import time

    from trace_assets.cli.backfill import Deployment

    server = ThreadingHTTPServer(("127.0.0.1", 0), _KeepAliveGraphql)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    deployment = Deployment(f"http://127.0.0.1:{server.server_address[1]}")
    try:
        assert deployment.graphql("{ answer }") == {"answer": 42}
        assert deployment.graphql("{ answer }") == {"answer": 42}  # the same connection
        time.sleep(0.6)  # the server closes the idle connection
        assert deployment.graphql("{ answer }") == {"answer": 42}
    finally:
        deployment.close()
        server.shutdown()
        server.server_close()
        thread.join()
    first, second, third = _KeepAliveGraphql.connections
    assert first == second and third != first
