"""Alert tests: a fresh data database and SQS queue per test, real HTTP receivers on loopback,
and worker processes (sink, deliverer) in their own process groups, always stopped."""

from __future__ import annotations

import datetime
import ipaddress
import itertools
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email import policy as email_policy
from email.message import EmailMessage
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from infra.local.services import MotoS3Server, free_port
from tests.conftest import NewDatabase
from trace_resources.alert_pipeline import tables as t
from trace_resources.alert_pipeline.queue import BufferMessage, SqsBuffer
from trace_resources.alert_pipeline.rules import AlertRule, RuleStore, StoredRule, parse_rule

_counter = itertools.count()
ROOT = Path(__file__).resolve().parents[2]
SECRET = "test-webhook-secret-0123456789"


@dataclass
class Hit:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


Answer = tuple[int, dict[str, str]]


@dataclass
class Receiver:
    """Answers by path: /ok, /fail (500), /slow (0.3 s), /hang (5 s), /toggle (500 until
    `healthy`), /status/<code> (that code); a path given answers by `script` answers them
    first, in order. Records every request it finished reading."""

    port: int = 0
    hits: list[Hit] = field(default_factory=list)
    healthy: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    # path -> answers before the path's usual one, first one first: (status, headers), or a
    # function making them when the request arrives
    script: dict[str, list[Answer | Callable[[], Answer]]] = field(default_factory=dict)

    def answer(self, path: str) -> Answer:
        with self.lock:
            queued = self.script.get(path)
            if queued:
                scripted = queued.pop(0)
                return scripted() if callable(scripted) else scripted
        if path == "/fail" or (path == "/toggle" and not self.healthy):
            return 500, {}
        if path.startswith("/status/"):
            return int(path.rsplit("/", 1)[1]), {}
        return 200, {}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def keys(self, path: str | None = None) -> list[str]:
        with self.lock:
            return [
                h.headers.get("x-trace-dedupe-key") or json.loads(h.body).get("text", "")
                for h in self.hits
                if path is None or h.path == path
            ]

    def on(self, path: str) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.path == path]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            hit = Hit(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.time())
            with state.lock:
                state.hits.append(hit)
            status, headers = state.answer(self.path)
            if self.path == "/slow":
                time.sleep(0.3)
            elif self.path == "/hang":
                time.sleep(5)
            try:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")
            except OSError:
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def data_dsn(new_database: NewDatabase) -> str:
    return new_database(f"data_{os.getpid()}_{next(_counter)}", "data")


@pytest.fixture
def engine(data_dsn: str) -> Iterator[sa.Engine]:
    engine = t.data_engine(data_dsn)
    yield engine
    engine.dispose()  # a test's pooled connections end with it (the server has 100 slots)


@pytest.fixture
def queue_name() -> str:
    return f"alerts-{os.getpid()}-{next(_counter)}"


@pytest.fixture
def buffer(s3_server: MotoS3Server, queue_name: str) -> SqsBuffer:
    return SqsBuffer(queue_name, endpoint_url=s3_server.endpoint_url, visibility_timeout_s=2)


@pytest.fixture
def worker_env(s3_server: MotoS3Server, data_dsn: str, queue_name: str) -> dict[str, str]:
    """Environment of sink / deliverer processes (and of the `trace` CLI)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACE_")}
    env.update(s3_server.env())
    env.update(
        {
            "TRACE_DATA_DSN": data_dsn,
            "TRACE_SQS_ENDPOINT_URL": s3_server.endpoint_url,
            "TRACE_ALERTS_QUEUE": queue_name,
            "TRACE_ALERTS_VISIBILITY_TIMEOUT_S": "2",
            "TRACE_ALERTS_SINK_BATCH": "50",
            "TRACE_ALERT_OUTBOUND_ALLOW": os.environ["TRACE_ALERT_OUTBOUND_ALLOW"],
            "PYTHONPATH": str(ROOT),
        }
    )
    return env


class Workers:
    """Starts worker processes in new sessions; stops every one of them at teardown."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Any] = {}

    def start(self, module: str, env: dict[str, str], *args: str) -> subprocess.Popen[bytes]:
        log = tempfile.TemporaryFile()  # not a pipe: a chatty worker must never block on it
        proc = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            env=env,
            cwd=ROOT,
            start_new_session=True,
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        self.logs[proc.pid] = log
        self.procs.append(proc)
        return proc

    @staticmethod
    def signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.signal(proc, signal.SIGKILL)
            proc.wait(timeout=10)
        for log in self.logs.values():
            log.close()

    def wait_for_log(self, proc: subprocess.Popen[bytes], text: str, timeout: float = 60) -> None:
        """Wait until the worker logged `text` (e.g. that its signal handlers are installed)."""
        deadline = time.monotonic() + timeout
        while text not in self.log(proc):
            assert proc.poll() is None, f"worker exited early: {self.log(proc)[-2000:]}"
            assert time.monotonic() < deadline, f"no {text!r} in: {self.log(proc)[-2000:]}"
            time.sleep(0.05)

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        handle = self.logs[proc.pid]
        handle.seek(0)
        return str(handle.read().decode())


@pytest.fixture
def workers() -> Iterator[Workers]:
    w = Workers()
    try:
        yield w
    finally:
        w.stop_all()


def make_rule(
    channels: list[dict[str, Any]], *, org: str = "acme", rule_id: str = "big", **condition: Any
) -> AlertRule:
    return parse_rule(
        {
            "org": org,
            "id": rule_id,
            "condition": condition
            or {"kind": "watched_addresses", "addresses": ["0x" + "11" * 20]},
            "channels": channels,
        }
    )


def webhook(name: str, url: str, **extra: Any) -> dict[str, Any]:
    return {"kind": "webhook", "name": name, "url": url, "secret": SECRET, **extra}


def messages_for(stored: StoredRule, n: int, prefix: str = "k") -> list[BufferMessage]:
    """n synthetic alerts of a stored rule (as the evaluation would publish them)."""
    destination = {
        "org": stored.rule.org,
        "rule_id": stored.rule.id,
        "rule_version": stored.version,
        "channels": [c.name for c in stored.rule.channels],
    }
    return [
        BufferMessage(
            f"{prefix}-{i:06d}",
            {"type": "alert", "org": stored.rule.org, "n": i, "text": f"alert {prefix}-{i}"},
            destination,
        )
        for i in range(n)
    ]


def store_rule(engine: sa.Engine, rule: AlertRule) -> StoredRule:
    return RuleStore(engine).create(rule)


def wait_for(
    predicate: Callable[[], bool],
    timeout_s: float,
    what: str,
    detail: Callable[[], object] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}: {detail()}")
        time.sleep(0.1)


def count(engine: sa.Engine, sql: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql)).scalar_one())


# -- a real SMTP server on loopback (aiosmtpd) ----------------------------------------------


@dataclass
class Mail:
    sender: str
    recipients: list[str]
    message: EmailMessage


@dataclass
class MailServer:
    """aiosmtpd on 127.0.0.1:port. Refuses every recipient (`refuse_code`: 550, a permanent
    refusal, or e.g. 450, a temporary one) until `healthy`; records
    every message it accepted; with a TLS context, offers STARTTLS with that certificate and
    requires AUTH (user `trace`, password `MAIL_PASSWORD`), or with `implicit_tls` speaks TLS
    from the first byte (no AUTH)."""

    port: int
    healthy: bool = True
    refuse_code: int = 550
    mails: list[Mail] = field(default_factory=list)
    logins: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    controller: Any = None

    def received(self) -> list[Mail]:
        with self.lock:
            return list(self.mails)

    def start(
        self, tls_context: ssl.SSLContext | None = None, *, implicit_tls: bool = False
    ) -> MailServer:
        state = self

        class Handler:
            async def handle_RCPT(
                self, server: Any, session: Any, envelope: Any, address: str, options: Any
            ) -> str:
                if not state.healthy:
                    return f"{state.refuse_code} mailbox unavailable"
                envelope.rcpt_tos.append(address)
                return "250 OK"

            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                parsed = BytesParser(policy=email_policy.default).parsebytes(envelope.content)
                assert isinstance(parsed, EmailMessage)
                with state.lock:
                    state.mails.append(Mail(envelope.mail_from, list(envelope.rcpt_tos), parsed))
                return "250 Message accepted for delivery"

        def authenticate(
            server: Any, session: Any, envelope: Any, mechanism: str, data: Any
        ) -> AuthResult:
            ok = (
                isinstance(data, LoginPassword)
                and data.login == b"trace"
                and data.password == MAIL_PASSWORD.encode()
            )
            if ok:
                with state.lock:
                    state.logins.append(data.login.decode())
            return AuthResult(success=ok, handled=False)

        extra: dict[str, Any] = {}
        if tls_context is not None and implicit_tls:
            extra = {"ssl_context": tls_context}
        elif tls_context is not None:
            extra = {
                "tls_context": tls_context,
                "require_starttls": True,
                "auth_required": True,
                "authenticator": authenticate,
            }
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port, **extra)
        self.controller.start()
        return self

    def stop(self) -> None:
        if self.controller is not None:
            self.controller.stop()
            self.controller = None


MAIL_PASSWORD = "smtp-password-for-tests"


@pytest.fixture
def mail_servers() -> Iterator[Callable[..., MailServer]]:
    """Starts MailServers (on a given or free port); stops every one at teardown."""
    started: list[MailServer] = []

    def start(
        port: int | None = None,
        *,
        healthy: bool = True,
        tls: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
    ) -> MailServer:
        server = MailServer(port or free_port(), healthy=healthy)
        started.append(server)
        return server.start(tls, implicit_tls=implicit_tls)

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@dataclass
class SelfSignedTls:
    """A certificate for 127.0.0.1, and the files that make clients trust it."""

    server_context: ssl.SSLContext
    ca_file: Path


@pytest.fixture
def self_signed_tls(tmp_path: Path) -> SelfSignedTls:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "smtp.crt", tmp_path / "smtp.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return SelfSignedTls(context, cert_file)


def email_channel(name: str, port: int, **extra: Any) -> dict[str, Any]:
    return {
        "kind": "email",
        "name": name,
        "to": ["ops@acme.example", "oncall@acme.example"],
        "from_address": "trace@alerts.example",
        "smtp_host": "127.0.0.1",
        "smtp_port": port,
        "security": "none",
        **extra,
    }
