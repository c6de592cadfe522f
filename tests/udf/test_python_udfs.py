"""Organisations' Python transforms end to end, on the real services: a module applied with
`trace udf apply`, materialised over the devnet's ranges with `dagster asset materialize`
(one external process per range, through Dagster Pipes, reading its inputs from a real
uvicorn query service with its attempt's task token and uploading its Parquet there), equal
to the same function run directly with polars; hostile transforms that try to step outside
their credentials are refused and commit nothing; wrong or missing output fails clearly; a
process killed mid-run is retried by Dagster and commits once."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl
import pyarrow as pa
import pytest
import sqlalchemy as sa
from dagster._core.pipes.utils import extract_message_or_forward_to_stdout
from polars.testing import assert_frame_equal

from infra.bench.ui_backfill import DagsterDev
from infra.local.dagster_cli import materialize_command
from infra.local.query_service import QueryServer, settings_env
from infra.local.services import MotoS3Server, PostgresServer, free_port
from tests.conftest import CHAIN_ID, RANGE_SIZE, Devnet, NewDatabase
from tests.query.conftest import keyring_spec
from tests.udf.test_dagster_reload import BACKFILL, add_partitions
from tests.udf.test_sql_udfs import World, _ranged
from trace_assets.definitions import build_resources
from trace_assets.derived.assets import DERIVED_ASSETS
from trace_assets.partitions import block_ranges
from trace_assets.raw.chain import raw_chain
from trace_assets.udf_python import _extras as _extras_of
from trace_assets.udf_python import _task_token, pod_launch
from trace_assets.udfs import build_udf_asset
from trace_resources.chain.ranges import complete_ranges, parse_partition_key
from trace_resources.registry import arrow_schema
from trace_resources.settings import QuerySettings, get_settings
from trace_resources.storage.access import revoked_table
from trace_resources.storage.commit import DatasetWriter, PartitionData
from trace_resources.storage.object_store import s3_store
from trace_resources.storage.paths import data_file_key
from trace_resources.storage.records import Attempt
from trace_resources.storage.state import attempts as attempts_table
from trace_resources.storage.state import engine_for
from trace_resources.storage.version_store import VersionStore
from trace_resources.udfs import UdfDeclaration, UdfError, as_dataset_declaration
from trace_resources.udfs.catalogue import input_catalogue
from trace_resources.udfs.declaration import PythonCode, load_udf, parse_udf
from trace_resources.udfs.jail import JAIL_EXEC, JailLimits
from trace_resources.udfs.k8s import IMAGE_JAIL, IMAGE_PYTHON, IMAGE_RUNNER, ScopedPipesK8sClient
from trace_resources.udfs.python import RUNNER_PATH
from trace_resources.udfs.venvs import build_venv

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
UDF = "org_acme__token_flows"
SECRET_DATASET = "org_globex__secret"

MODULE = """\
import polars as pl


def transform(inputs):
    transfers = inputs["erc20_transfers"]
    flows = (
        transfers.group_by("token")
        .agg(
            pl.len().cast(pl.Int64).alias("transfers"),
            pl.col("from_address").n_unique().cast(pl.Int64).alias("senders"),
            pl.col("block_number").min().alias("first_block"),
            pl.col("block_number").max().alias("last_block"),
        )
        .sort("token")
    )
    labels = inputs.get("org_acme__token_labels")  # the organisation's uploaded labels
    if labels is not None:
        flows = flows.join(labels, on="token", how="left")
    return flows
"""
LABELS = "org_acme__token_labels"
LABEL_COLUMN = {"name": "label", "type": "string", "doc": "the org's label", "nullable": True}

SCHEMA = [
    {"name": "token", "type": "binary", "doc": "ERC-20 contract (20 bytes)"},
    {"name": "transfers", "type": "int64", "doc": "Transfer events of the token in the range"},
    {"name": "senders", "type": "int64", "doc": "distinct senders"},
    {"name": "first_block", "type": "uint64", "doc": "first block with a transfer"},
    {"name": "last_block", "type": "uint64", "doc": "last block with a transfer"},
]

YAML = f"""\
format_version: 1
name: {UDF}
description: Per block range and ERC-20 token, its transfers, senders and first/last block
inputs:
  - dataset: erc20_transfers
    columns: [block_number, token, from_address]
partitioning: block_range
mode: replace
schema:
{"".join(f"  - {json.dumps(c)}{chr(10)}" for c in SCHEMA)}quality:
  - {{name: one_row_per_token, kind: unique, columns: [token]}}
  - {{name: has_transfers, kind: range, column: transfers, min: 1}}
code:
  kind: python
  module: token_flows.py
  function: transform
  frames: polars
  requirements: [polars>=1.0]
"""
# the same, joining the organisation's uploaded labels (an unpartitioned input)
LABELLED_YAML = YAML.replace(
    "    columns: [block_number, token, from_address]\n",
    f"    columns: [block_number, token, from_address]\n  - dataset: {LABELS}\n"
    "    columns: [token, label]\n",
).replace("quality:\n", f"  - {json.dumps(LABEL_COLUMN)}\nquality:\n")


@dataclass
class PyWorld:
    world: World
    server: QueryServer
    busy: list[str]  # ranges with ERC-20 transfers
    platform_env: dict[str, str]  # what the Dagster process holds (secrets included)


def _platform_env(settings: QuerySettings, s3_server: MotoS3Server) -> dict[str, str]:
    return {**s3_server.env(), **settings_env(settings)}


@pytest.fixture(scope="module")
def pyworld(
    postgres: PostgresServer,
    new_database: NewDatabase,
    s3_server: MotoS3Server,
    devnet: Devnet,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PyWorld]:
    """The devnet's ranges of the raw datasets and erc20_transfers, another organisation's
    dataset, and a query service the transforms' processes read through."""
    tag = f"pyudf{os.getpid()}"
    s3_server.create_buckets([f"{tag}-datasets", f"{tag}-results"])
    port = free_port()
    settings = QuerySettings(
        environment="test",
        rpc_url=devnet.url,
        chain_id=CHAIN_ID,
        range_size=RANGE_SIZE,
        state_dsn=new_database(f"{tag}_state", "state"),
        data_dsn=new_database(f"{tag}_data", "data"),
        object_store="s3",
        s3_endpoint_url=s3_server.endpoint_url,
        bucket_datasets=f"{tag}-datasets",
        bucket_results=f"{tag}-results",
        rpc_retry_budget_s=20,
        rpc_max_attempts=5,
        query_token_keys=keyring_spec(),
        query_token_signing_kid="k-new",
        query_cache_dir=tmp_path_factory.mktemp("pyudf-query-cache"),
        udf_query_url=f"http://127.0.0.1:{port}",
    )
    home = tmp_path_factory.mktemp("pyudf-dagster-home")
    (home / "dagster.yaml").write_text((REPO / "dagster_home" / "dagster.yaml").read_text())
    platform_env = _platform_env(settings, s3_server)
    cli_env = {**os.environ, **platform_env, "DAGSTER_HOME": str(home), **postgres.dagster_env()}
    keys = [r.key for r in complete_ranges(-1, devnet.finalized, RANGE_SIZE)]
    erc20 = next(a for a in DERIVED_ASSETS if a.key == dg.AssetKey("erc20_transfers"))
    world = World(settings, keys, cli_env)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env().items():
            mp.setenv(key, value)  # the test reads the committed datasets as Dagster does
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(block_ranges.name or "", keys)
        for selection in (raw_chain, erc20):
            result = dg.materialize(
                [raw_chain, erc20],
                instance=instance,
                resources=build_resources(settings),
                tags=_ranged(keys),
                selection=dg.AssetSelection.assets(selection),
            )
            assert result.success
        instance.dispose()
        store = s3_store(settings.bucket_datasets, endpoint_url=settings.s3_endpoint_url)
        with DatasetWriter(store, VersionStore(engine_for(settings.state_dsn))) as writer:
            writer.write(
                SECRET_DATASET,
                keys[0],
                PartitionData(pa.table({"label": ["globex's own"], "block_number": [1]})),
            )
        per_range = pl.from_arrow(world.reader.read("erc20_transfers", keys))
        assert isinstance(per_range, pl.DataFrame)
        busy = sorted(
            k
            for k in keys
            if per_range.filter(
                pl.col("block_number").is_between(
                    parse_partition_key(k).start, parse_partition_key(k).last
                )
            ).height
        )
        assert len(busy) >= 2
        log = tmp_path_factory.mktemp("pyudf-uvicorn") / "uvicorn.log"
        with QueryServer(platform_env, port=port, log_file=log) as server:
            yield PyWorld(world, server, busy, platform_env)


def _run(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def materialised(
    pyworld: PyWorld, tmp_path_factory: pytest.TempPathFactory
) -> subprocess.CompletedProcess[str]:
    """`trace udf apply` of the YAML and its module, then the transform over every range in
    one run of the Dagster CLI."""
    folder = tmp_path_factory.mktemp("pyudf-files")
    (folder / "token_flows.py").write_text(MODULE)
    (folder / "token_flows.yaml").write_text(LABELLED_YAML)
    env = pyworld.world.cli_env
    # the organisation's labels for two of the tokens, uploaded as an enrichment dataset
    tokens = sorted(set(pyworld.world.reader.read("erc20_transfers").column("token").to_pylist()))
    labels = "token,label\n" + "".join(f"0x{t.hex()},token {i}\n" for i, t in enumerate(tokens[:2]))
    (folder / "labels.csv").write_text(labels)
    uploaded = _run(
        env,
        str(BIN / "trace"),
        "enrich",
        "upload",
        str(folder / "labels.csv"),
        "--org",
        "acme",
        "--name",
        "token_labels",
        "--schema",
        "token:binary,label:string",
    )
    assert uploaded.returncode == 0, uploaded.stderr
    done = _run(env, str(BIN / "trace"), "udf", "apply", str(folder / "token_flows.yaml"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"applied {UDF}: version 1;")
    sync = _run(env, str(BIN / "trace"), "partitions", "sync", timeout=120)
    assert sync.returncode == 0, sync.stderr
    keys = pyworld.world.keys
    return _run(env, *materialize_command(UDF, keys[0], keys[-1]))


def _function(source: str) -> Any:
    namespace: dict[str, Any] = {}
    exec(compile(source, "token_flows.py", "exec"), namespace)  # noqa: S102 - the test's own module
    return namespace["transform"]


def test_materialised_through_pipes_equals_the_function_run_directly(
    pyworld: PyWorld, materialised: subprocess.CompletedProcess[str]
) -> None:
    assert materialised.returncode == 0, materialised.stderr[-4000:]
    assert materialised.stderr.count("RUN_SUCCESS") == 1  # one run for every range
    # the process's own log lines, reported through Pipes
    assert "rows staged by the Python transform" in materialised.stderr
    assert "to the attempt's staging key" in materialised.stderr
    world = pyworld.world
    committed = world.reader.resolve(UDF)
    assert sorted(committed) == world.keys and all(r.version == 1 for r in committed.values())
    transform = _function(MODULE)
    labels = pl.from_arrow(world.reader.read(LABELS))
    assert isinstance(labels, pl.DataFrame) and labels.height == 2
    expected = []
    for key in world.keys:
        part = pl.from_arrow(world.reader.read("erc20_transfers", [key]))
        assert isinstance(part, pl.DataFrame)
        columns = part.select(["block_number", "token", "from_address"])
        expected.append(transform({"erc20_transfers": columns, LABELS: labels}))
    want = pl.concat(expected)
    got = pl.from_arrow(world.reader.read(UDF, world.keys))
    assert isinstance(got, pl.DataFrame)
    assert got.height == want.height > len(world.keys)  # several tokens per range
    assert_frame_equal(got.sort("first_block", "token"), want.sort("first_block", "token"))
    # the uploaded labels were joined in: the two labelled tokens carry their label
    assert set(got["label"].drop_nulls()) == {"token 0", "token 1"}
    # every committed file is the one file the attempt's process uploaded
    assert all(len(r.manifest.files) == 1 for r in committed.values())
    assert all(r.manifest.files[0].key.endswith("/part-00000.parquet") for r in committed.values())


# -- hostile transforms --------------------------------------------------------------------

HOSTILE_PRELUDE = '''\
import json
import os
import urllib.error
import urllib.request
import uuid

import pyarrow as pa
from dagster_pipes import PipesContext


def _extras():
    return PipesContext.get().extras


def _call(method, path, body=None):
    """A request with the credentials the process was given (its task token)."""
    extras = _extras()
    url = path if path.startswith("http") else extras["query_url"] + path
    request = urllib.request.Request(url, data=body, method=method, headers={
        "Authorization": "Bearer " + extras["token"], "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _query(sql, **more):
    return _call("POST", "/v1/query", json.dumps({"sql": sql, **more}).encode())


def _leak(what):
    """The attempt succeeded: return rows, so the run would commit (and the test fail)."""
    return pa.table({
        "token": pa.array([what.encode()[:200]], pa.binary()),
        "transfers": pa.array([1], pa.int64()),
        "senders": pa.array([1], pa.int64()),
        "first_block": pa.array([0], pa.uint64()),
        "last_block": pa.array([0], pa.uint64()),
    })


def _refused(what, status, body):
    raise PermissionError(f"REFUSED {what}: HTTP {status} {body[:300]!r}")
'''


def _hostile_cases(py: PyWorld) -> dict[str, tuple[str, str]]:
    """{case: (the function's body, what the Dagster failure must say)}."""
    world = py.world
    settings = world.settings
    other = py.busy[1]
    committed_key = world.reader.resolve("erc20_transfers")[py.busy[0]].manifest.files[0].key
    url = sa.make_url(settings.state_dsn)
    secrets = [
        settings.state_dsn,
        settings.data_dsn,
        *(k.split(":", 2)[2] for k in settings.query_token_keys.get_secret_value().split(",")),
        py.platform_env["AWS_SECRET_ACCESS_KEY"] + "@" + "AWS_SECRET_ACCESS_KEY",
    ]
    return {
        "another_org": (
            f"""
def transform(inputs):
    status, body = _query("SELECT * FROM {SECRET_DATASET}")
    if status == 200:
        return _leak("read {SECRET_DATASET}")
    _refused("reading {SECRET_DATASET}", status, body)
""",
            f"REFUSED reading {SECRET_DATASET}: HTTP 404",
        ),
        "another_partition": (
            f"""
def transform(inputs):
    mine = inputs["erc20_transfers"].num_rows
    status, body = _query("SELECT count(*) AS n FROM erc20_transfers")
    if status != 200 or json.loads(body)["rows"] != [[mine]]:
        return _leak("saw rows beyond this partition: " + body.decode()[:100])
    status, body = _query(
        "SELECT count(*) AS n FROM erc20_transfers", pin={{"erc20_transfers": {{"{other}": 1}}}}
    )
    if status == 200:
        return _leak("read partition {other}")
    _refused("reading partition {other}", status, body)
""",
            f"REFUSED reading partition {other}: HTTP 404",
        ),
        "undeclared_column": (
            """
def transform(inputs):
    status, body = _query("SELECT log_index FROM erc20_transfers")
    if status == 200:
        return _leak("read log_index")
    _refused("reading the undeclared column log_index", status, body)
""",
            "REFUSED reading the undeclared column log_index: HTTP 400",
        ),
        "platform_database": (
            f"""
def transform(inputs):
    named = [k for k in os.environ if any(
        w in k.upper() for w in ("DSN", "PG", "DATABASE", "PASSWORD", "SECRET", "AWS", "TRACE"))]
    if named:
        return _leak("the environment names " + ",".join(named))
    import psycopg2
    said = []
    for user in ("{url.username}", "postgres"):
        try:
            psycopg2.connect(host="127.0.0.1", port={url.port}, dbname="{url.database}",
                             user=user, connect_timeout=10).close()
        except psycopg2.OperationalError as exc:
            said.append(str(exc).strip().splitlines()[0])
            continue
        return _leak("connected to the platform's database as " + user)
    raise PermissionError("REFUSED connecting to the platform's database: " + "; ".join(said))
""",
            "REFUSED connecting to the platform's database: ",
        ),
        "platform_processes": (
            f"""
SECRETS = {json.dumps(secrets)}


def transform(inputs):
    refused = []
    for pid in [os.getppid(), 1] + [int(p) for p in os.listdir("/proc") if p.isdigit()]:
        try:
            with open(f"/proc/{{pid}}/environ", "rb") as f:
                seen = f.read().decode("utf-8", "replace")
        except OSError as exc:
            refused.append(type(exc).__name__)
            continue
        found = [s for s in SECRETS if s.split("@")[0] in seen]
        if found:
            return _leak(f"process {{pid}}'s environment holds a platform secret")
    for path in ("/root", "/etc/shadow"):
        try:
            os.listdir(path) if os.path.isdir(path) else open(path, "rb").read(1)
        except OSError as exc:
            refused.append(type(exc).__name__)
            continue
        return _leak("read " + path)
    raise PermissionError(f"REFUSED reading the platform's processes and files: {{len(refused)}}")
""",
            "REFUSED reading the platform's processes and files: ",
        ),
        "fork_bomb": (
            """
def transform(inputs):
    while True:
        os.fork()
""",
            "started too many processes or threads",
        ),
        "memory_exhaustion": (
            """
def transform(inputs):
    hoard = []
    while True:
        hoard.append(bytearray(256 * 2**20))
""",
            "needed more than 2 GiB of memory (TRACE_UDF_PY_MEMORY)",
        ),
        "infinite_loop": (
            """
def transform(inputs):
    while True:
        pass
""",
            "used more than 5 s of CPU (TRACE_UDF_PY_CPU_S)",
        ),
        "printing_1_gb": (
            """
import sys


def transform(inputs):
    line = "x" * (1 << 20)
    for _ in range(1024):
        sys.stdout.write(line)
""",
            "printed more than 16 MB on stdout/stderr (TRACE_UDF_PY_OUTPUT)",
        ),
        "secrets_in_environment": (
            f"""
SECRETS = {json.dumps(secrets)}


def transform(inputs):
    seen = json.dumps(dict(os.environ))
    try:
        with open("/proc/1/environ", "rb") as f:
            seen += f.read().decode("utf-8", "replace")
    except OSError:
        pass
    names = [s.split("@")[-1] if "@" in s else s for s in SECRETS]
    found = [n for s, n in zip(SECRETS, names) if s.split("@")[0] in seen]
    found += [k for k in ("TRACE_STATE_DSN", "TRACE_QUERY_TOKEN_KEYS", "AWS_SECRET_ACCESS_KEY")
              if k in seen]
    if found:
        return _leak("found " + ",".join(found))
    raise PermissionError("REFUSED: no platform secret in os.environ or /proc/1/environ")
""",
            "REFUSED: no platform secret in os.environ or /proc/1/environ",
        ),
        "object_store_outside_prefix": (
            f"""
def transform(inputs):
    upload = _extras()["upload"]["url"]
    route = upload[: upload.index("/v1/tasks/uploads/") + len("/v1/tasks/uploads/")]
    status, body = _call("GET", route + "{committed_key}")
    if status < 300:
        return _leak("read a committed object")
    said = f"GET HTTP {{status}}"
    status, body = _call("PUT", route + "{committed_key}", b"overwritten")
    if status < 300:
        return _leak("overwrote a committed object")
    _refused("the object store outside the prefix (" + said + ", PUT)", status, body)
""",
            "REFUSED the object store outside the prefix (GET HTTP 405, PUT): HTTP 403",
        ),
        "writing_another_prefix": (
            f"""
def transform(inputs):
    upload = _extras()["upload"]["url"]
    route, mine = upload.split("/v1/tasks/uploads/")
    targets = [
        mine.split("/attempt=")[0] + f"/attempt={{uuid.uuid4()}}/part-00000.parquet",
        f"{SECRET_DATASET}/partition={py.busy[0]}/attempt={{uuid.uuid4()}}/part-00000.parquet",
    ]
    for target in targets:
        status, body = _call("PUT", route + "/v1/tasks/uploads/" + target, b"PAR1")
        if status < 300:
            return _leak("wrote " + target)
    _refused("writing another prefix", status, body)
""",
            "REFUSED writing another prefix: HTTP 403",
        ),
        "wrong_schema": (
            """
def transform(inputs):
    return pa.table({"token": pa.array([b"x"]), "amount": pa.array([1.5])})
""",
            "the Python transform returned the columns token, amount; the declaration's schema "
            "is token, transfers, senders, first_block, last_block; nothing was committed",
        ),
        "no_output": (
            """
def transform(inputs):
    os._exit(0)
""",
            "the Python transform wrote no output (nothing at its staging key); nothing was "
            "committed",
        ),
    }


def _declaration(name: str, source: str, requirements: list[str] | None = None) -> UdfDeclaration:
    code: dict[str, Any] = {"kind": "python", "source": source, "function": "transform"}
    if requirements:
        code["requirements"] = requirements
    return UdfDeclaration.model_validate(
        {
            "format_version": 1,
            "name": name,
            "description": "a transform under test",
            "inputs": [
                {"dataset": "erc20_transfers", "columns": ["block_number", "token", "from_address"]}
            ],
            "partitioning": "block_range",
            "mode": "replace",
            "schema": SCHEMA,
            "code": code,
        }
    )


def _materialise(
    py: PyWorld, udf: UdfDeclaration, keys: list[str], env: dict[str, str] | None = None
) -> dg.ExecuteInProcessResult:
    """The transform over `keys`, in process, with the platform's environment (and secrets)."""
    asset = build_udf_asset(udf, 1)
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(block_ranges.name or "", py.world.keys)
    try:
        with pytest.MonkeyPatch.context() as mp:
            for key, value in {**py.platform_env, **(env or {})}.items():
                mp.setenv(key, value)
            return dg.materialize(
                [asset],
                instance=instance,
                resources=build_resources(py.world.settings),
                tags=_ranged(keys),
                raise_on_error=False,
            )
    finally:
        instance.dispose()


CASES = [
    "another_org",
    "another_partition",
    "undeclared_column",
    "platform_database",
    "secrets_in_environment",
    "object_store_outside_prefix",
    "writing_another_prefix",
    "platform_processes",
    "fork_bomb",
    "memory_exhaustion",
    "infinite_loop",
    "printing_1_gb",
    "wrong_schema",
    "no_output",
]
# the packages a case imports besides the runtime's, and its own limits
REQUIREMENTS = {"platform_database": ["psycopg2-binary"]}
LIMITS = {"infinite_loop": {"TRACE_UDF_PY_CPU_S": "5"}}


@pytest.mark.parametrize("case", CASES)
def test_a_hostile_or_broken_transform_is_refused_and_commits_nothing(
    pyworld: PyWorld, case: str
) -> None:
    body, expected = _hostile_cases(pyworld)[case]
    name = f"org_acme__py_{case}"
    udf = _declaration(name, HOSTILE_PRELUDE + textwrap.dedent(body), REQUIREMENTS.get(case))
    result = _materialise(pyworld, udf, pyworld.busy[:1], LIMITS.get(case))
    assert not result.success
    failure = result.failure_data_for_node(name)
    assert failure is not None and failure.user_failure_data is not None, failure
    description = failure.user_failure_data.description or ""
    assert description.startswith(f"{name} partition {pyworld.busy[0]}: "), description
    assert expected in description, description
    assert description.endswith("nothing was committed")
    assert pyworld.world.reader.resolve(name) == {}
    # the committed data it aimed at is untouched
    secret = pyworld.world.reader.read(SECRET_DATASET, [pyworld.world.keys[0]])
    assert secret.column("label").to_pylist() == ["globex's own"]
    transfers = pyworld.world.reader.read("erc20_transfers", pyworld.busy[:1])
    assert transfers.num_rows > 0


def test_a_process_killed_mid_run_is_retried_and_commits_once(pyworld: PyWorld) -> None:
    """The process of the second range kills itself on the step's first try: the step fails,
    Dagster retries it (new attempts, new tokens), and each range is committed once."""
    keys = pyworld.busy[:2]
    second = parse_partition_key(keys[1]).start
    source = MODULE.replace(
        "import polars as pl\n",
        "import polars as pl\nimport os\nimport signal\nfrom dagster_pipes import PipesContext\n",
    ).replace(
        '    transfers = inputs["erc20_transfers"]\n',
        '    transfers = pl.from_arrow(inputs["erc20_transfers"])\n'
        "    first_try = PipesContext.get().retry_number == 0\n"
        f'    if first_try and transfers["block_number"].min() >= {second}:\n'
        "        os.kill(os.getpid(), signal.SIGKILL)\n",
    )
    name = "org_acme__py_retried"
    result = _materialise(pyworld, _declaration(name, source, ["polars>=1.0"]), keys)
    assert result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert not failures and len(retries) == 1
    assert "was killed by signal 9" in str(retries[0].event_specific_data)
    committed = pyworld.world.reader.resolve(name)
    assert sorted(committed) == keys and all(r.version == 1 for r in committed.values())
    t = attempts_table
    with engine_for(pyworld.world.settings.state_dsn).connect() as conn:
        states = conn.execute(
            sa.select(t.c.state, t.c.retry_number, sa.func.count())
            .where(t.c.dataset == name)
            .group_by(t.c.state, t.c.retry_number)
        ).all()
    # the first try's attempts (the first range staged, the second killed) failed; the
    # retry's committed, one per range
    assert sorted((s, r, int(n)) for s, r, n in states) == [("committed", 1, 2), ("failed", 0, 2)]


def test_python_declarations_get_one_line_naming_file_line_and_field(
    pyworld: PyWorld, tmp_path: Path
) -> None:
    engine = engine_for(pyworld.world.settings.state_dsn)
    catalogue = input_catalogue(engine, "acme")
    (tmp_path / "token_flows.py").write_text(MODULE)
    path = tmp_path / "flows.yaml"
    decl = load_udf(YAML, str(path), catalogue, tmp_path)
    assert decl.code.kind == "python" and decl.code.source == MODULE  # stored with the version
    bad = {
        "missing_module": (
            ("module: token_flows.py", "module: nowhere.py"),
            ":20: code.module: no file 'nowhere.py' beside this declaration",
            tmp_path,
        ),
        "outside_folder": (
            ("module: token_flows.py", "module: ../token_flows.py"),
            ":20: code.module: '../token_flows.py' must be a path inside this file's folder",
            tmp_path,
        ),
        "through_the_api": (
            ("module: token_flows.py", "module: token_flows.py"),
            ":20: code.module: modules are read from files by `trace udf apply`; here give the "
            "module's text inline as `source: |`",
            None,
        ),
        "no_function": (
            ("function: transform", "function: transfrom"),
            ":21: code.function: the module defines no top-level function 'transfrom'",
            tmp_path,
        ),
        "bad_requirement": (
            ("requirements: [polars>=1.0]", "requirements: [polars>=>1]"),
            ":23: code.requirements[0]: not a PEP 508 requirement",
            tmp_path,
        ),
        "wrong_frames": (
            ("frames: polars", "frames: pandas"),
            ":22: code.frames: Input should be 'arrow' or 'polars'",
            tmp_path,
        ),
    }
    for case, ((old, new), expected, base) in bad.items():
        assert old in YAML, case
        with pytest.raises(UdfError) as raised:
            load_udf(YAML.replace(old, new), str(path), catalogue, base)
        message = str(raised.value)
        assert "\n" not in message, (case, message)
        assert message.startswith(f"{path}{expected}"), (case, message)
    (tmp_path / "token_flows.py").write_text(
        MODULE.replace("def transform(inputs):", "def transform(inputs)")
    )
    with pytest.raises(UdfError) as raised:
        load_udf(YAML, str(path), catalogue, tmp_path)
    assert str(raised.value) == (
        f"{path}:20: code.module: line 4 of the module does not parse: expected ':'"
    )


# -- launched from the UI ------------------------------------------------------------------

RUN_LOGS = """query($id: ID!) { logsForRun(runId: $id) { __typename
  ... on EventConnection { events { __typename ... on MessageEvent { message }
  ... on ExecutionStepFailureEvent { error { message } } } } } }"""


def test_the_ui_materialises_the_python_transform_over_new_labels(
    pyworld: PyWorld,
    materialised: subprocess.CompletedProcess[str],
    postgres: PostgresServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The organisation uploads new labels, then one range of its transform is backfilled with
    the UI's own GraphQL mutation on a real `dagster dev` (daemon, warm run worker): the run
    goes through Pipes and commits version 2 of that range only, equal to the function over the
    new labels."""
    assert materialised.returncode == 0, materialised.stderr[-4000:]
    world, key = pyworld.world, pyworld.busy[0]
    folder = tmp_path_factory.mktemp("pyudf-ui")
    tokens = sorted(set(world.reader.read("erc20_transfers").column("token").to_pylist()))
    assert len(tokens) >= 3
    (folder / "labels.csv").write_text(
        "token,label\n" + "".join(f"0x{t.hex()},v2 token {i}\n" for i, t in enumerate(tokens[:3]))
    )
    upload = [str(BIN / "trace"), "enrich", "upload", str(folder / "labels.csv")]
    names = ["--org", "acme", "--name", "token_labels", "--schema", "token:binary,label:string"]
    uploaded = _run(world.cli_env, *upload, *names)
    assert uploaded.returncode == 0, uploaded.stderr

    env = {k: v for k, v in world.cli_env.items() if k != "DAGSTER_HOME"}
    with DagsterDev(env, postgres, folder) as dagster:
        add_partitions(dagster, world.keys)
        # what the asset page's "Materialize" dialog sends for one partition, to completion
        backfill_id = dagster.backfill([key], [UDF])
        runs = dagster.graphql(BACKFILL, {"id": backfill_id})["partitionBackfillOrError"]["runs"]
        logs = dagster.graphql(RUN_LOGS, {"id": runs[0]["runId"]})["logsForRun"]
    messages = [e.get("message") or "" for e in logs["events"]]
    errors = [e["error"]["message"] for e in logs["events"] if e.get("error")]
    assert [r["status"] for r in runs] == ["SUCCESS"], errors or messages[-20:]
    # the transform's process reported through Pipes in the UI-launched run
    assert any("to the attempt's staging key" in m for m in messages), messages

    committed = world.reader.resolve(UDF)
    assert committed[key].version == 2  # the new labels changed this range's rows
    assert all(r.version == 1 for k, r in committed.items() if k != key)
    labels = pl.from_arrow(world.reader.read(LABELS))
    assert isinstance(labels, pl.DataFrame) and labels.height == 3
    part = pl.from_arrow(world.reader.read("erc20_transfers", [key]))
    assert isinstance(part, pl.DataFrame)
    columns = part.select(["block_number", "token", "from_address"])
    want = _function(MODULE)({"erc20_transfers": columns, LABELS: labels})
    got = pl.from_arrow(world.reader.read(UDF, [key]))
    assert isinstance(got, pl.DataFrame)
    assert_frame_equal(got.sort("token"), want.sort("token"))
    assert set(got["label"].drop_nulls()) <= {"v2 token 0", "v2 token 1", "v2 token 2"}


@pytest.fixture
def image_opt() -> Iterator[Path]:
    """The image's /opt/trace on this host: a folder a jailed uid can read."""
    folder = Path(tempfile.mkdtemp(prefix="trace-k8s-opt-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_the_pods_command_runs_the_transform_with_pipes_k8s_defaults(
    pyworld: PyWorld, image_opt: Path, tmp_path: Path
) -> None:
    """The container of the pod `TRACE_UDF_LAUNCHER=k8s` submits, run here as a process (no
    cluster): its command (the image's paths mapped to this repository's files and the
    transform's venv), exactly its environment (the Pipes context in a variable, the messages
    on stderr: PipesK8sClient's defaults), its module from the context. It reads the range from
    the real query service with the attempt's token and uploads its Parquet there, equal to
    the function run directly; its log lines and metadata come back through Pipes."""
    key = pyworld.busy[0]
    (tmp_path / "token_flows.py").write_text(MODULE)
    udf, _ = parse_udf(YAML, "token_flows.yaml", tmp_path)
    code = udf.code
    assert isinstance(code, PythonCode)
    staged: dict[str, Any] = {}

    @dg.asset(name=UDF)
    def step(context):  # type: ignore[no-untyped-def]
        settings = get_settings()
        limits = JailLimits.from_settings(settings)
        schema = arrow_schema(as_dataset_declaration(udf))
        attempt = Attempt(uuid.uuid4().hex, udf.name, key, fence=1)
        file_key = data_file_key(udf.name, key, attempt.attempt_id, 0)
        readable = input_catalogue(engine_for(settings.state_dsn), udf.org)
        token, _ = _task_token(udf, key, attempt, file_key, readable, 600)
        extras = _extras_of(udf, code, schema, token, file_key, settings)
        pod, pod_extras = pod_launch(udf, code, key, extras, limits, settings)
        client = ScopedPipesK8sClient()
        with client.pod_session(context, pod, pod_extras) as (session, _, body):
            (container,) = body.spec.containers
            done = subprocess.run(
                _as_here(container.command, code, image_opt),
                env={e.name: e.value for e in container.env},
                capture_output=True,
                text=True,
                timeout=120,
            )
            # what PipesK8sPodLogsMessageReader does with each line of the pod's log
            handler = client.message_reader._handler  # type: ignore[attr-defined]
            for line in (done.stdout + done.stderr).splitlines():
                extract_message_or_forward_to_stdout(handler, line)
        staged.update(code=done.returncode, stderr=done.stderr[-4000:], key=file_key)
        yield from session.get_results(implicit_materializations=False)

    with pytest.MonkeyPatch.context() as mp:
        for name, value in pyworld.platform_env.items():
            mp.setenv(name, value)
        result = dg.materialize([step], raise_on_error=False)
    assert staged["code"] == 0, staged["stderr"]
    assert result.success
    (materialization,) = result.asset_materializations_for_node(UDF)
    store = s3_store(
        pyworld.world.settings.bucket_datasets, endpoint_url=pyworld.world.settings.s3_endpoint_url
    )
    with pytest.MonkeyPatch.context() as mp:
        for name, value in pyworld.platform_env.items():
            mp.setenv(name, value)
        got = pl.read_parquet(io.BytesIO(store.get_bytes(staged["key"])))
    transfers = pl.from_arrow(pyworld.world.reader.read("erc20_transfers", [key]))
    want = _function(MODULE)({"erc20_transfers": transfers})
    assert_frame_equal(got, want, check_dtypes=False)
    assert materialization.metadata["udf/rows"].value == want.height


def _as_here(command: list[str], code: PythonCode, folder: Path) -> list[str]:
    """The container's command with the image's paths mapped to this host: its interpreter is
    the transform's venv (what the image's requirements build installs), the runner and the
    jail's wrapper are copies of the files the Dockerfile copies, readable by a jailed uid."""
    here = {IMAGE_PYTHON: str(build_venv(list(code.requirements)).python)}
    for image_path, source in ((IMAGE_RUNNER, RUNNER_PATH), (IMAGE_JAIL, JAIL_EXEC)):
        copy = folder / Path(image_path).name
        shutil.copyfile(source, copy)
        copy.chmod(0o644)
        here[image_path] = str(copy)
    return [here.get(part, part) for part in command]


def test_the_k8s_launcher_without_a_cluster_fails_in_one_line_and_commits_nothing(
    pyworld: PyWorld, tmp_path: Path
) -> None:
    """`TRACE_UDF_LAUNCHER=k8s` where no cluster is configured: the step says so and how to fix
    it, its attempt's token is revoked, nothing is committed (the launch is the only part that
    differs from the local launcher)."""
    name = "org_acme__py_no_cluster"
    env = {"TRACE_UDF_LAUNCHER": "k8s", "KUBECONFIG": str(tmp_path / "no-kubeconfig")}
    started = time.time()
    result = _materialise(pyworld, _declaration(name, MODULE), pyworld.busy[:1], env)
    assert not result.success
    failure = result.failure_data_for_node(name)
    assert failure is not None and failure.user_failure_data is not None, failure
    description = failure.user_failure_data.description or ""
    assert description.startswith(
        f"{name} partition {pyworld.busy[0]}: the Python transform "
        "could not run: no Kubernetes configuration"
    ), description
    assert "set TRACE_UDF_LAUNCHER=local" in description
    assert description.endswith("nothing was committed")
    assert pyworld.world.reader.resolve(name) == {}
    with engine_for(pyworld.world.settings.state_dsn).connect() as conn:
        revoked = conn.execute(
            sa.select(sa.func.count())
            .select_from(revoked_table)
            .where(revoked_table.c.reason == "the attempt's process ended")
            .where(revoked_table.c.revoked_at >= sa.func.to_timestamp(started - 1))
        ).scalar_one()
    assert revoked >= 1
