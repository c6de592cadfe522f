"""The deployment files of infra/deploy/, validated offline (no cluster, no AWS account):

- the Kubernetes resources of kustomization.yaml parse strictly into kubernetes' own models, and
  they hold together (each Service selects a Deployment's port, each referenced ConfigMap,
  Secret and account exists, K8sRunLauncher's names are the manifests');
- the CloudFormation template of the ECS variant passes cfn-lint, and a misspelt property fails;
- each production dagster.yaml loads through Dagster's own instance config validation, its
  classes' config schemas resolve from the environment the deployment gives, and the run
  launcher (K8sRunLauncher, EcsRunLauncher) is instantiated from it;
- every container's command, in both variants, is a real entry point of the one image
  (infra/deploy/Dockerfile) with arguments it accepts, and every setting they are given is one
  Trace or Dagster reads (a misspelt variable would be silently ignored otherwise)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from cfnlint.api import lint_all  # type: ignore[import-untyped]
from dagster._config import process_config, resolve_to_config_type
from dagster._core.errors import DagsterInvalidConfigError
from dagster._core.instance.ref import InstanceRef
from dagster._core.launcher import RunLauncher
from dagster._core.run_coordinator import RunCoordinator
from dagster._core.workspace.config_schema import ensure_workspace_config
from dagster._serdes.config_class import ConfigurableClassData
from dagster_aws.ecs import EcsRunLauncher
from dagster_k8s import K8sRunLauncher

from tests.deploy.manifests import (
    DEPLOY,
    ECS,
    K8S,
    REPO,
    as_model,
    check_command,
    k8s_documents,
    kustomization,
    manifests,
)
from trace_resources.settings import QuerySettings

# the processes each variant runs, by component (services.yaml's labels; trace.yaml's names)
COMPONENTS = {
    "code-location",
    "webserver",
    "daemon",
    "query-api",
    "alert-sink",
    "alert-deliverer",
    "head-follower",
}
# what Dagster's storage config reads from the environment (both dagster.yaml)
DAGSTER_PG_ENV = {
    "TRACE_DAGSTER_PG_USER",
    "TRACE_DAGSTER_PG_PASSWORD",
    "TRACE_DAGSTER_PG_HOST",
    "TRACE_DAGSTER_PG_DB",
    "TRACE_DAGSTER_PG_PORT",
}
# read by boto3 / Dagster themselves
OTHER_ENV = {"AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "DAGSTER_HOME"}
OTHER_ENV |= {"DAGSTER_CURRENT_IMAGE"}
LOCATION = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["dagster"][
    "code_location_name"
]


def _unknown_settings(names: set[str]) -> set[str]:
    """The names no Trace setting (TRACE_<field>), Dagster storage config or library reads."""
    fields = {f"TRACE_{name.upper()}" for name in QuerySettings.model_fields}
    return names - fields - DAGSTER_PG_ENV - OTHER_ENV


# -- Kubernetes --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[str, dict[str, Any]]:
    """kind -> name -> model (ExternalSecret: its YAML)."""
    by_kind: dict[str, dict[str, Any]] = {}
    for _, model in manifests():
        by_kind.setdefault(model.kind, {})[model.metadata.name] = model
    for _, doc in k8s_documents():
        if doc["kind"] == "ExternalSecret":
            by_kind.setdefault("ExternalSecret", {})[doc["metadata"]["name"]] = doc
    return by_kind


def _generated_configmaps() -> dict[str, dict[str, str]]:
    """kustomization.yaml's configMapGenerator: name -> file name -> the file's text."""
    k = kustomization()
    assert k["generatorOptions"]["disableNameSuffixHash"] is True  # mounted by name
    return {
        g["name"]: {f: (K8S / f).read_text() for f in g["files"]} for g in k["configMapGenerator"]
    }


def _container_files(home: str) -> dict[str, Path]:
    """The paths in the containers of the files mounted from the instance's ConfigMap."""
    (files,) = _generated_configmaps().values()
    return {f"{home}/{name}": K8S / name for name in files}


def test_every_kubernetes_resource_parses_strictly_and_the_services_are_all_there(
    k8s: dict[str, dict[str, Any]],
) -> None:
    deployments = k8s["Deployment"]
    components = {
        d.spec.template.metadata.labels["app.kubernetes.io/component"] for d in deployments.values()
    }
    assert components == COMPONENTS
    # only the processes that answer on a port have a Service
    assert set(k8s["Service"]) == {
        "trace-code-location",
        "trace-dagster-webserver",
        "trace-query-api",
    }
    # a misspelt field in a Deployment's container fails
    (doc,) = [d for _, d in k8s_documents() if d["metadata"]["name"] == "trace-query-api"][:1]
    doc["spec"]["template"]["spec"]["containers"][0]["evnFrom"] = []
    with pytest.raises(Exception, match="evnFrom|evn_from"):
        as_model(type(deployments["trace-query-api"]), doc)


def test_the_kubernetes_resources_reference_each_other_correctly(
    k8s: dict[str, dict[str, Any]],
) -> None:
    configmaps = set(k8s["ConfigMap"]) | set(_generated_configmaps())
    (external,) = k8s["ExternalSecret"].values()
    secret_name = external["spec"]["target"]["name"]
    secret_keys = {d["secretKey"] for d in external["spec"]["data"]}
    assert external["apiVersion"].startswith("external-secrets.io/")
    assert external["spec"]["secretStoreRef"]["kind"] in {"SecretStore", "ClusterSecretStore"}
    assert all(
        d["remoteRef"]["key"] and d["remoteRef"]["property"] for d in external["spec"]["data"]
    )
    accounts = set(k8s["ServiceAccount"])
    for name, d in k8s["Deployment"].items():
        spec = d.spec.template.spec
        assert d.metadata.namespace == "trace"
        assert d.spec.selector.match_labels.items() <= d.spec.template.metadata.labels.items()
        assert spec.service_account_name in accounts, name
        assert spec.security_context.run_as_non_root is True
        for volume in spec.volumes:
            if volume.config_map is not None:
                assert volume.config_map.name in configmaps, (name, volume.name)
        for c in spec.containers:
            assert c.security_context.allow_privilege_escalation is False
            for source in c.env_from:
                if source.config_map_ref is not None:
                    assert source.config_map_ref.name in configmaps, (name, source)
                else:
                    assert source.secret_ref.name == secret_name, (name, source)
    for name, s in k8s["Service"].items():
        (target,) = [
            d
            for d in k8s["Deployment"].values()
            if s.spec.selector.items() <= d.spec.template.metadata.labels.items()
        ]
        ports = {
            p.name: p.container_port for c in target.spec.template.spec.containers for p in c.ports
        }
        for port in s.spec.ports:
            assert port.target_port in ports, (name, port.target_port)

    # every variable given is one that something reads
    given = set(k8s["ConfigMap"]["trace-endpoints"].data) | secret_keys
    given |= set(k8s["ConfigMap"]["trace-udf-launcher"].data)
    assert _unknown_settings(given) == set()
    assert DAGSTER_PG_ENV <= given
    # no secret in a ConfigMap: the DSNs and keys are only in the secret store
    assert not {"TRACE_STATE_DSN", "TRACE_DATA_DSN"} & set(k8s["ConfigMap"]["trace-endpoints"].data)

    # the webserver and the daemon may start runs' Jobs; the workers may not call the API
    bindings = [b for b in k8s["RoleBinding"].values() if b.metadata.namespace == "trace"]
    (binding,) = [b for b in bindings if any(s.name == "trace-dagster" for s in b.subjects)]
    role = k8s["Role"][binding.role_ref.name]
    assert any(
        "batch" in r.api_groups and "jobs" in r.resources and "create" in r.verbs
        for r in role.rules
    )
    for name in ("trace-dagster-webserver", "trace-dagster-daemon"):
        assert k8s["Deployment"][name].spec.template.spec.service_account_name == "trace-dagster"
    workers = [
        d
        for n, d in k8s["Deployment"].items()
        if n not in ("trace-dagster-webserver", "trace-dagster-daemon")
    ]
    assert all(d.spec.template.spec.automount_service_account_token is False for d in workers)
    assert k8s["Deployment"]["trace-dagster-daemon"].spec.replicas == 1
    assert k8s["Deployment"]["trace-dagster-daemon"].spec.strategy.type == "Recreate"

    # the transforms' pods reach the query service at its Service's name and port
    url = k8s["ConfigMap"]["trace-udf-launcher"].data["TRACE_UDF_QUERY_URL"]
    (port,) = k8s["Service"]["trace-query-api"].spec.ports
    assert url == f"http://trace-query-api.trace.svc.cluster.local:{port.port}"


def test_every_kubernetes_command_is_a_real_entry_point_of_the_image(
    k8s: dict[str, dict[str, Any]],
) -> None:
    home = "/opt/dagster/dagster_home"
    files = _container_files(home)
    parsed: dict[str, click.Context | None] = {}
    for name, d in k8s["Deployment"].items():
        (c,) = d.spec.template.spec.containers
        parsed[name] = check_command(c.command, files)
        for probe in (c.readiness_probe, c.liveness_probe):
            if probe is not None and probe._exec is not None:
                check_command(probe._exec.command, files)
    for name in ("trace-dagster-webserver", "trace-dagster-daemon"):
        # the workspace they load is the ConfigMap's, mounted at DAGSTER_HOME
        c = k8s["Deployment"][name].spec.template.spec.containers[0]
        env = {e.name: e.value for e in c.env}
        assert env["DAGSTER_HOME"] == home
        volumes = {v.name: v for v in k8s["Deployment"][name].spec.template.spec.volumes}
        mounted = {
            m.mount_path: volumes[m.name].config_map.name
            for m in c.volume_mounts
            if volumes[m.name].config_map is not None and m.sub_path == files[m.mount_path].name
        }
        assert mounted == dict.fromkeys(files, "trace-dagster-instance")
    server = parsed["trace-code-location"]
    assert server is not None
    assert server.params["module_name"] == "trace_assets.definitions"
    assert server.params["location_name"] == LOCATION
    import trace_assets.definitions as definitions

    assert server.params["attribute"] in vars(definitions)

    # the workspace file, valid for Dagster, points at the code location's Service
    workspace: dict[str, Any] = ensure_workspace_config(  # type: ignore[assignment]
        yaml.safe_load((K8S / "workspace.yaml").read_text()), str(K8S / "workspace.yaml")
    )
    (entry,) = workspace["load_from"]
    (service_port,) = k8s["Service"]["trace-code-location"].spec.ports
    assert entry["grpc_server"] == {
        "host": "trace-code-location.trace.svc.cluster.local",
        "port": service_port.port,
        "location_name": LOCATION,
    }
    assert server.params["port"] == service_port.port


# -- the production dagster.yaml ---------------------------------------------------------------


def _instance_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    values = {
        "TRACE_DAGSTER_PG_USER": "dagster",
        "TRACE_DAGSTER_PG_PASSWORD": "pw-from-the-secret-store",
        "TRACE_DAGSTER_PG_HOST": "db.example.internal",
        "TRACE_DAGSTER_PG_DB": "dagster",
        "TRACE_DAGSTER_PG_PORT": "5432",
        "TRACE_BUCKET_RESULTS": "trace-prod-results",
        "TRACE_S3_REGION": "us-east-1",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def _resolved(data: ConfigurableClassData, base: type) -> dict[str, Any]:
    """Dagster's own validation of one configurable class's config (as rehydrate does)."""
    import importlib

    klass = getattr(importlib.import_module(data.module_name), data.class_name)
    assert issubclass(klass, base), data
    result = process_config(resolve_to_config_type(klass.config_type()), data.config_dict)
    if not result.success:
        raise DagsterInvalidConfigError("invalid", result.errors, data.config_dict)
    return dict(result.value or {})


def _load_instance(
    home: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[InstanceRef, dict[str, Any]]:
    env = _instance_env(monkeypatch)
    ref = InstanceRef.from_dir(str(home))  # the whole file against Dagster's instance schema
    storage = ref.storage_data
    assert storage is not None
    from trace_resources.instance.storage import PooledPostgresStorage

    pg = _resolved(storage, PooledPostgresStorage)["postgres_db"]
    assert (pg["hostname"], pg["password"], pg["port"]) == (
        env["TRACE_DAGSTER_PG_HOST"],
        env["TRACE_DAGSTER_PG_PASSWORD"],
        5432,
    )
    # the steps' logs go to the results bucket the environment names
    logs = ref.compute_logs_data
    from dagster_aws.s3.compute_log_manager import S3ComputeLogManager

    manager = logs.rehydrate()  # a boto3 client only: no AWS call
    assert isinstance(manager, S3ComputeLogManager)
    assert manager._s3_bucket == env["TRACE_BUCKET_RESULTS"]
    coordinator = ref.run_coordinator_data
    assert coordinator is not None
    assert isinstance(coordinator.rehydrate(), RunCoordinator)
    settings: dict[str, Any] = dict(ref.settings)
    assert settings["run_monitoring"]["enabled"] is True
    return ref, env


def _prod_home(tmp_path: Path, source: Path) -> Path:
    home = tmp_path / source.parent.name
    home.mkdir()
    (home / "dagster.yaml").write_text(source.read_text())
    return home


def test_the_k8s_instance_loads_k8s_run_launcher_with_the_manifests_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, k8s: dict[str, dict[str, Any]]
) -> None:
    ref, _ = _load_instance(_prod_home(tmp_path, K8S / "dagster.yaml"), monkeypatch)
    data = ref.run_launcher_data
    assert data is not None and (data.module_name, data.class_name) == (
        "dagster_k8s",
        "K8sRunLauncher",
    )
    config = _resolved(data, RunLauncher)
    assert config["load_incluster_config"] is True
    # the names it uses are the manifests'
    generated = _generated_configmaps()
    assert config["instance_config_map"] in generated
    assert "dagster.yaml" in generated[config["instance_config_map"]]
    assert config["service_account_name"] in k8s["ServiceAccount"]
    assert set(config["env_config_maps"]) <= set(k8s["ConfigMap"])
    (external,) = k8s["ExternalSecret"].values()
    assert config["env_secrets"] == [external["spec"]["target"]["name"]]
    assert config["job_namespace"] == k8s["Deployment"]["trace-dagster-daemon"].metadata.namespace
    daemon = k8s["Deployment"]["trace-dagster-daemon"].spec.template.spec.containers[0]
    assert any(m.mount_path == config["dagster_home"] for m in daemon.volume_mounts)

    # instantiated as the daemon would, only reaching the API server through a kubeconfig
    # instead of the pod's in-cluster account (no cluster here: nothing is called)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:1"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    offline = {
        **data.config_dict,
        "load_incluster_config": False,
        "kubeconfig_file": str(kubeconfig),
    }
    launcher = ConfigurableClassData(
        data.module_name, data.class_name, yaml.safe_dump(offline)
    ).rehydrate()
    assert isinstance(launcher, K8sRunLauncher)
    assert launcher.job_namespace == "trace"

    # a misspelt key is refused by Dagster's validation
    bad = {**data.config_dict, "job_namespac": "trace"}
    with pytest.raises(DagsterInvalidConfigError, match="job_namespac"):
        _resolved(
            ConfigurableClassData(data.module_name, data.class_name, yaml.safe_dump(bad)),
            RunLauncher,
        )


def test_the_ecs_instance_loads_ecs_run_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, _ = _load_instance(_prod_home(tmp_path, ECS / "dagster.yaml"), monkeypatch)
    data = ref.run_launcher_data
    assert data is not None and (data.module_name, data.class_name) == (
        "dagster_aws.ecs",
        "EcsRunLauncher",
    )
    # the run tasks take the daemon's task's network, roles and secrets; no lookup by tag
    config = _resolved(data, RunLauncher)
    assert config["use_current_ecs_task_config"] is True and config["secrets_tag"] is None
    launcher = data.rehydrate()  # boto3 clients only: no AWS call
    assert isinstance(launcher, EcsRunLauncher)
    # a misspelt key is refused
    bad = {**data.config_dict, "run_resource": {}}
    with pytest.raises(DagsterInvalidConfigError, match="run_resource"):
        _resolved(
            ConfigurableClassData(data.module_name, data.class_name, yaml.safe_dump(bad)),
            RunLauncher,
        )


# -- ECS (CloudFormation) ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return yaml.safe_load((ECS / "trace.yaml").read_text())


def _lint_errors(text: str) -> list[str]:
    """cfn-lint's errors and warnings (its informational rules aside)."""
    return [f"{m.rule.id} {m.message}" for m in lint_all(text) if m.rule.id[0] in "EW"]


def test_the_cloudformation_template_passes_cfn_lint_and_a_typo_fails() -> None:
    text = (ECS / "trace.yaml").read_text()
    assert _lint_errors(text) == []
    broken = text.replace("DesiredCount:", "DesiredCuont:", 1)
    assert any("DesiredCuont" in e for e in _lint_errors(broken))


def test_every_ecs_task_runs_a_real_entry_point_with_secrets_from_secrets_manager(
    template: dict[str, Any],
) -> None:
    resources = template["Resources"]
    tasks = {
        c["Name"]: (name, c)
        for name, r in resources.items()
        if r["Type"] == "AWS::ECS::TaskDefinition"
        for c in r["Properties"]["ContainerDefinitions"]
    }
    assert set(tasks) == COMPONENTS
    services = [r for r in resources.values() if r["Type"] == "AWS::ECS::Service"]
    assert {s["Properties"]["TaskDefinition"]["Ref"] for s in services} == {
        name for name, _ in tasks.values()
    }
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    for component, (_, c) in tasks.items():
        env = {e["Name"]: e["Value"] for e in c["Environment"]}
        home = env["DAGSTER_HOME"]
        # the image puts the ECS instance and workspace there (infra/deploy/Dockerfile)
        assert re.search(
            rf"^COPY infra/deploy/ecs/dagster\.yaml infra/deploy/ecs/workspace\.yaml {home}/$",
            dockerfile,
            re.M,
        )
        files = {f"{home}/{f}": ECS / f for f in ("dagster.yaml", "workspace.yaml")}
        check_command(c["Command"], files)
        secrets = {s["Name"]: s["ValueFrom"] for s in c["Secrets"]}
        assert all(v["Fn::Sub"] == f"${{PlatformSecretArn}}:{k}::" for k, v in secrets.items())
        assert not set(secrets) & set(env), component
        assert {"TRACE_STATE_DSN", "TRACE_DATA_DSN", "TRACE_SECRETS_KEYS"} <= set(secrets)
        assert _unknown_settings(set(env) | set(secrets)) == set(), component
        assert DAGSTER_PG_ENV <= set(env) | set(secrets)
    # the webserver and the daemon find the code location through Cloud Map
    workspace: dict[str, Any] = ensure_workspace_config(  # type: ignore[assignment]
        yaml.safe_load((ECS / "workspace.yaml").read_text()), str(ECS / "workspace.yaml")
    )
    (entry,) = workspace["load_from"]
    discovery = resources["CodeLocationDiscovery"]["Properties"]["Name"]
    namespace = resources["Namespace"]["Properties"]["Name"]
    assert entry["grpc_server"]["host"] == f"{discovery}.{namespace}"
    assert entry["grpc_server"]["location_name"] == LOCATION
    command = tasks["code-location"][1]["Command"]
    assert str(entry["grpc_server"]["port"]) == command[command.index("-p") + 1]
    # the daemon is never two at once (it starts the runs)
    (daemon,) = [
        s for s in services if s["Properties"]["TaskDefinition"]["Ref"] == tasks["daemon"][0]
    ]
    assert daemon["Properties"]["DesiredCount"] == 1
    assert daemon["Properties"]["DeploymentConfiguration"]["MaximumPercent"] == 100


# -- the image ---------------------------------------------------------------------------------


def test_the_image_installs_exactly_the_lock() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    syncs = re.findall(r"^RUN uv sync ([^&\n]*)", dockerfile, re.M)
    assert syncs and all("--frozen" in s and "--no-dev" in s for s in syncs)
    assert re.search(r"^COPY pyproject\.toml uv\.lock \./$", dockerfile, re.M)
    # the same uv as the UDF runner's image
    uv = re.findall(r"ghcr\.io/astral-sh/uv:(\S+)", dockerfile)
    assert uv == re.findall(
        r"ghcr\.io/astral-sh/uv:(\S+)", (K8S / "Dockerfile.udf-runner").read_text()
    )
    # every package the services run is copied in
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"][
        "targets"
    ]["wheel"]["packages"]
    copied = re.findall(r"^COPY (\S+) \1$", dockerfile, re.M)
    assert sorted(copied) == sorted(packages)
    assert re.search(r"^USER 10001:10001$", dockerfile, re.M)
