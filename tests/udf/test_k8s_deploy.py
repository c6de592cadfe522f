"""The production launcher of Python transforms (`TRACE_UDF_LAUNCHER=k8s`), validated offline:
no cluster, no services. The deployment files under infra/deploy/k8s/ load into kubernetes'
own models (a misspelt field fails); the pod Dagster's PipesK8sClient would submit for the
token-flows transform, built from the deployment's ConfigMap in a real in-process
materialisation with a real Pipes session, deserialises into `V1Pod` without unknown fields,
holds the jail's limits and security context, is selected by the NetworkPolicy, and holds no
platform secret in any environment variable (the Pipes context decoded too); the Role allows
exactly what the client calls; the runner image puts the files where the pod runs them."""

from __future__ import annotations

import json
import re
import secrets
import tomllib
from base64 import b64encode
from pathlib import Path
from typing import Any

import dagster as dg
import kubernetes
import pytest
import yaml
from dagster_pipes import (
    DAGSTER_PIPES_CONTEXT_ENV_VAR,
    DAGSTER_PIPES_MESSAGES_ENV_VAR,
    PipesDefaultContextLoader,
    decode_env_var,
)
from kubernetes.utils import parse_quantity

from tests.deploy.manifests import KINDS, as_model, manifests
from tests.udf.test_python_udfs import MODULE, UDF, YAML
from trace_assets.udf_python import _extras, _task_token, pod_launch
from trace_resources.registry import arrow_schema
from trace_resources.settings import QuerySettings, Settings, byte_size
from trace_resources.storage.paths import data_file_key
from trace_resources.storage.records import Attempt
from trace_resources.udfs import as_dataset_declaration
from trace_resources.udfs.declaration import InputDataset, PythonCode, parse_udf
from trace_resources.udfs.jail import STOPPED_EXIT, JailLimits
from trace_resources.udfs.k8s import (
    IMAGE_JAIL,
    IMAGE_PYTHON,
    IMAGE_RUNNER,
    POD_LABELS,
    ScopedPipesK8sClient,
    image_tag,
    pod_outcome,
)
from trace_resources.udfs.python import BASE_ENV

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "infra" / "deploy" / "k8s"
PARTITION = "0-99"


@pytest.fixture(scope="module")
def deployed() -> dict[str, list[Any]]:
    by_kind: dict[str, list[Any]] = {}
    for _, model in manifests():
        by_kind.setdefault(model.kind, []).append(model)
    return by_kind


def test_the_deployment_files_are_kubernetes_objects_and_a_typo_fails(
    deployed: dict[str, list[Any]],
) -> None:
    assert set(deployed) == set(KINDS)
    policy = yaml.safe_load_all((DEPLOY / "udf-networkpolicy.yaml").read_text())
    doc = list(policy)[1]
    doc["spec"]["egress"][0]["ports"][0]["prot"] = "TCP"  # a misspelt field
    with pytest.raises(Exception, match="prot"):
        as_model(kubernetes.client.V1NetworkPolicy, doc)
    doc = list(yaml.safe_load_all((DEPLOY / "dagster-run-rbac.yaml").read_text()))[1]
    doc["rules"][0]["verb"] = doc["rules"][0].pop("verbs")
    with pytest.raises(Exception, match="verb"):
        as_model(kubernetes.client.V1Role, doc)


def _platform_secrets(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Distinct values for every secret the platform holds, set in this process's env."""
    values = {
        "TRACE_STATE_DSN": f"postgresql://trace:{secrets.token_hex(12)}@db.internal/trace_state",
        "TRACE_DATA_DSN": f"postgresql://trace:{secrets.token_hex(12)}@db.internal/trace_data",
        "TRACE_QUERY_TOKEN_KEYS": f"k1:HS256:{secrets.token_urlsafe(40)}",
        "TRACE_QUERY_URL_SIGNING_KEY": secrets.token_urlsafe(40),
        "TRACE_SECRETS_KEYS": f"k1:{b64encode(secrets.token_bytes(32)).decode()}",
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "AWS_SESSION_TOKEN": secrets.token_urlsafe(60),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def _secret_fragments(values: dict[str, str]) -> set[str]:
    """Each secret, and each part of it long enough to be telling (a DSN's password, a key
    without its id)."""
    fragments = set(values.values())
    for value in values.values():
        fragments |= {part for part in re.split(r"[:@/,]", value) if len(part) >= 16}
    settings = QuerySettings()
    for name in ("state_dsn", "data_dsn"):
        fragments.add(getattr(settings, name))
    for name in ("query_token_keys", "query_url_signing_key", "secrets_keys"):
        fragments.add(getattr(settings, name).get_secret_value())
    return fragments


@pytest.fixture(scope="module")
def configmap(deployed: dict[str, list[Any]]) -> dict[str, str]:
    (found,) = [c for c in deployed["ConfigMap"] if c.metadata.name == "trace-udf-launcher"]
    return dict(found.data)


def _pod_body_in_a_real_step(tmp_path: Path) -> tuple[Any, str, JailLimits, PythonCode]:
    """The body of the pod the Python UDF step would submit, built in a real materialisation
    (a Pipes session on a real asset context, PipesK8sClient's own injector and reader)."""
    (tmp_path / "token_flows.py").write_text(MODULE)
    udf, _ = parse_udf(YAML, "token_flows.yaml", tmp_path)
    code = udf.code
    assert isinstance(code, PythonCode)
    settings = Settings()
    limits = JailLimits.from_settings(settings)
    schema = arrow_schema(as_dataset_declaration(udf))
    attempt = Attempt("a" * 32, udf.name, PARTITION, fence=1)
    file_key = data_file_key(udf.name, PARTITION, attempt.attempt_id, 0)
    readable = {"erc20_transfers": InputDataset("erc20_transfers", schema, "block_range")}
    token, _ = _task_token(udf, PARTITION, attempt, file_key, readable, 600)
    extras = _extras(udf, code, schema, token, file_key, settings)
    pod, pod_extras = pod_launch(udf, code, PARTITION, extras, limits, settings)
    built: dict[str, Any] = {}

    @dg.asset(name=UDF)
    def step(context):  # type: ignore[no-untyped-def]
        # the launcher's own code path up to the API call (PipesK8sClient's injector and
        # reader: the context in an env variable, the messages on stderr)
        with ScopedPipesK8sClient().pod_session(context, pod, pod_extras) as (_, _, body):
            built["body"] = body
        return dg.MaterializeResult()

    assert dg.materialize([step]).success
    return built["body"], token, limits, code


def test_the_pod_holds_the_jails_limits_and_no_platform_secret(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    configmap: dict[str, str],
    deployed: dict[str, list[Any]],
) -> None:
    for name, value in configmap.items():
        monkeypatch.setenv(name, value)
    leaked = _platform_secrets(monkeypatch)
    body, token, limits, code = _pod_body_in_a_real_step(tmp_path)

    # what the API server would get deserialises back into the same V1Pod, field by field
    wire = kubernetes.client.ApiClient().sanitize_for_serialization(body)
    assert as_model(kubernetes.client.V1Pod, wire) == body

    # the limits are the ConfigMap's jail settings
    assert limits.timeout_s == float(configmap["TRACE_UDF_PY_TIMEOUT_S"])
    assert limits.memory == byte_size(configmap["TRACE_UDF_PY_MEMORY"])
    spec = body.spec
    (container,) = spec.containers
    assert spec.restart_policy == "Never"
    assert spec.active_deadline_seconds == int(configmap["TRACE_UDF_PY_TIMEOUT_S"])
    assert spec.automount_service_account_token is False
    assert spec.enable_service_links is False
    quantity = {k: parse_quantity(v) for k, v in container.resources.limits.items()}
    assert quantity == {
        "memory": byte_size(configmap["TRACE_UDF_PY_MEMORY"]),
        "cpu": int(configmap["TRACE_UDF_PY_CPU_S"]) / float(configmap["TRACE_UDF_PY_TIMEOUT_S"]),
        "ephemeral-storage": byte_size(configmap["TRACE_UDF_PY_FILE_SIZE"])
        + byte_size(configmap["TRACE_UDF_PY_OUTPUT"]),
    }
    assert container.resources.requests == container.resources.limits
    # inside the container the jail's wrapper holds the rest of the limits
    assert container.command[:4] == [IMAGE_PYTHON, "-I", "-S", IMAGE_JAIL]
    assert container.command[-3:] == [IMAGE_PYTHON, "-I", IMAGE_RUNNER]
    jail = json.loads(container.command[container.command.index("--spec") + 1])
    assert {k: jail[k] for k in ("timeout_s", "cpu_s", "nofile", "nproc", "output")} == {
        "timeout_s": limits.timeout_s,
        "cpu_s": int(configmap["TRACE_UDF_PY_CPU_S"]),
        "nofile": int(configmap["TRACE_UDF_PY_NOFILE"]),
        "nproc": int(configmap["TRACE_UDF_PY_NPROC"]),
        "output": byte_size(configmap["TRACE_UDF_PY_OUTPUT"]),
    }
    assert jail["memory"] == limits.memory and jail["file_size"] == limits.file_size
    assert jail["jail_dir"].startswith("/tmp/")

    # security: non-root fixed uid, nothing to escalate, read-only root, /tmp an emptyDir
    uid = int(configmap["TRACE_UDF_PY_UID_BASE"])
    assert spec.security_context.run_as_non_root is True
    assert spec.security_context.run_as_user == uid
    assert spec.security_context.seccomp_profile.type == "RuntimeDefault"
    sc = container.security_context
    assert (sc.run_as_non_root, sc.run_as_user) == (True, uid)
    assert sc.allow_privilege_escalation is False and sc.privileged is False
    assert sc.read_only_root_filesystem is True
    assert sc.capabilities.drop == ["ALL"] and not sc.capabilities.add
    (mount,) = container.volume_mounts
    (volume,) = [v for v in spec.volumes if v.name == mount.name]
    assert mount.mount_path == "/tmp" and not mount.read_only
    assert parse_quantity(volume.empty_dir.size_limit) == limits.file_size

    # the image its requirements name, in the namespace the deployment restricts
    assert container.image == f"{configmap['TRACE_UDF_K8S_IMAGE']}:{image_tag(code.requirements)}"
    assert container.image.endswith(":req-" + image_tag(["polars >= 1.0"]).removeprefix("req-"))
    namespace = configmap["TRACE_UDF_K8S_NAMESPACE"]
    policies = [p for p in deployed["NetworkPolicy"] if p.metadata.namespace == namespace]
    selected = [
        p
        for p in policies
        if (p.spec.pod_selector.match_labels or {}).items() <= body.metadata.labels.items()
    ]
    assert {p.metadata.name for p in selected} == {"default-deny", "udf-egress-query-service"}
    assert POD_LABELS.items() <= body.metadata.labels.items()

    # the environment: the allow-list and Pipes' own variables, no platform secret anywhere
    env = {e.name: e.value for e in container.env}
    assert set(env) == set(BASE_ENV) | {
        DAGSTER_PIPES_CONTEXT_ENV_VAR,
        DAGSTER_PIPES_MESSAGES_ENV_VAR,
    }
    assert all(e.value_from is None for e in container.env)
    assert not container.env_from
    context = decode_env_var(env[DAGSTER_PIPES_CONTEXT_ENV_VAR])[
        PipesDefaultContextLoader.DIRECT_KEY
    ]
    extras = context["extras"]
    assert extras["token"] == token
    assert extras["query_url"] == configmap["TRACE_UDF_QUERY_URL"]
    assert extras["module_source"] == MODULE
    assert decode_env_var(env[DAGSTER_PIPES_MESSAGES_ENV_VAR]) == {"stdio": "stderr"}
    seen = json.dumps(context) + json.dumps(wire)
    found = [f for f in _secret_fragments(leaked) if f in seen]
    assert found == [], f"platform secrets in the pod: {found}"
    assert token not in json.dumps(wire["spec"]["containers"][0]["command"])


def test_the_role_allows_what_pipes_k8s_client_calls_and_no_more(
    deployed: dict[str, list[Any]], configmap: dict[str, str]
) -> None:
    # the UDF namespace's Role, its binding, and the run pods' account (dagster.yaml's
    # K8sRunLauncher service_account_name)
    namespace = configmap["TRACE_UDF_K8S_NAMESPACE"]
    (role,) = [r for r in deployed["Role"] if r.metadata.namespace == namespace]
    (binding,) = [b for b in deployed["RoleBinding"] if b.role_ref.name == role.metadata.name]
    (account,) = [a for a in deployed["ServiceAccount"] if a.metadata.name == "trace-dagster-run"]
    granted = {
        (resource, verb)
        for rule in role.rules
        for resource in rule.resources
        for verb in rule.verbs
        if rule.api_groups == [""]
    }
    # create_namespaced_pod, list_namespaced_pod (wait_for_pod), read_namespaced_pod,
    # read_namespaced_pod_log (the Pipes messages), delete_namespaced_pod,
    # list_namespaced_event (the client's diagnostics)
    assert granted == {
        ("pods", "create"),
        ("pods", "get"),
        ("pods", "list"),
        ("pods", "delete"),
        ("pods/log", "get"),
        ("events", "list"),
    }
    assert binding.role_ref.name == role.metadata.name and binding.role_ref.kind == "Role"
    (subject,) = binding.subjects
    assert (subject.kind, subject.name, subject.namespace) == (
        "ServiceAccount",
        account.metadata.name,
        account.metadata.namespace,
    )


def test_the_runner_image_holds_what_the_pod_runs_at_the_locked_versions() -> None:
    dockerfile = (DEPLOY / "Dockerfile.udf-runner").read_text()
    copies = dict(
        (dst, src)
        for src, dst in re.findall(r"^COPY (?:--chmod=\S+ )?(\S+) (\S+)$", dockerfile, re.M)
    )
    assert {IMAGE_RUNNER, IMAGE_JAIL} <= set(copies)
    assert copies[IMAGE_RUNNER] == "trace_resources/udfs/runner.py"
    assert copies[IMAGE_JAIL] == "trace_resources/udfs/jail_exec.py"
    assert all((REPO / copies[d]).is_file() for d in (IMAGE_RUNNER, IMAGE_JAIL))
    locked = {
        p["name"]: p["version"] for p in tomllib.loads((REPO / "uv.lock").read_text())["package"]
    }
    pins = dict(re.findall(r"\b(pyarrow|polars|dagster-pipes)==(\S+)", dockerfile))
    assert pins == {name: locked[name] for name in ("pyarrow", "polars", "dagster-pipes")}
    assert re.search(r"^FROM python:3\.11", dockerfile, re.M)  # IMAGE_PYTHON is its python
    assert re.search(r"^USER 64100:64100$", dockerfile, re.M)
    assert Settings().udf_py_uid_base == 64100


def _finished(status: dict[str, Any]) -> Any:
    return as_model(kubernetes.client.V1Pod, {"metadata": {"name": "p"}, "status": status})


def _ended(exit_code: int, reason: str = "Error", message: str = "") -> dict[str, Any]:
    terminated = {"exitCode": exit_code, "reason": reason, "message": message}
    return {
        "phase": "Failed",
        "containerStatuses": [
            {
                "name": "udf",
                "image": "i",
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {"terminated": terminated},
            }
        ],
    }


def test_how_a_pod_ended_is_said_as_the_jail_says_it() -> None:
    limits = JailLimits(timeout_s=60, memory=2**30, file_size=2**20, output=10**6)
    deadline = _finished({"phase": "Failed", "reason": "DeadlineExceeded"})
    assert pod_outcome(deadline, limits) == (-9, "ran longer than 60 s (TRACE_UDF_PY_TIMEOUT_S)")
    oom = _finished(_ended(137, "OOMKilled"))
    assert pod_outcome(oom, limits) == (
        -9,
        "needed more than 1 GiB of memory (TRACE_UDF_PY_MEMORY)",
    )
    jail_said = "x\ntrace-udf-jail: stopped: the UDF started too many processes or threads\n"
    stopped = _finished(_ended(STOPPED_EXIT, message=jail_said))
    assert pod_outcome(stopped, limits) == (STOPPED_EXIT, "started too many processes or threads")
    assert pod_outcome(_finished(_ended(137)), limits) == (-9, None)  # killed: retried
    assert pod_outcome(_finished(_ended(1)), limits) == (1, None)
    assert pod_outcome(_finished(_ended(0, "Completed")), limits) == (0, None)
