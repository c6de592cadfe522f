"""The deployment files as their platforms read them, for the tests of infra/deploy/: the
Kubernetes resources `kubectl apply -k infra/deploy/k8s` would send (each parsed strictly into
kubernetes' own model: a misspelt field fails), and what a container's command runs."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator, Mapping, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import click
import kubernetes
import yaml
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "infra" / "deploy"
K8S = DEPLOY / "k8s"
ECS = DEPLOY / "ecs"
KINDS: dict[str, type] = {
    "Namespace": kubernetes.client.V1Namespace,
    "ConfigMap": kubernetes.client.V1ConfigMap,
    "NetworkPolicy": kubernetes.client.V1NetworkPolicy,
    "ServiceAccount": kubernetes.client.V1ServiceAccount,
    "Role": kubernetes.client.V1Role,
    "RoleBinding": kubernetes.client.V1RoleBinding,
    "Deployment": kubernetes.client.V1Deployment,
    "Service": kubernetes.client.V1Service,
}
# a custom resource (External Secrets Operator): no model in the kubernetes client; its fields
# are checked by tests/deploy/test_deploy_files.py
CUSTOM_KINDS = {"ExternalSecret"}


def as_model(model: type, doc: dict[str, Any]) -> Any:
    """A manifest as a kubernetes model; an unknown field anywhere raises."""
    return k8s_model_from_dict(model, k8s_snake_case_dict(model, doc))


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def k8s_documents() -> Iterator[tuple[str, dict[str, Any]]]:
    """Every resource of kustomization.yaml's `resources`, as YAML, with its file's name."""
    for name in kustomization()["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            if doc is not None:
                yield name, doc


def manifests() -> Iterator[tuple[str, Any]]:
    """The resources with a kubernetes model, as models."""
    for name, doc in k8s_documents():
        kind = doc.get("kind")
        if kind in CUSTOM_KINDS:
            continue
        assert kind in KINDS, f"{name}: no model for kind {kind!r}"
        yield name, as_model(KINDS[kind], doc)


def _module_runs(module: str) -> bool:
    """`python -m module` runs something: a module with a `__main__` guard, or a package with a
    `__main__` module."""
    spec = importlib.util.find_spec(module)
    if spec is None:
        return False
    if spec.submodule_search_locations is not None:
        return importlib.util.find_spec(f"{module}.__main__") is not None
    assert spec.origin is not None
    return 'if __name__ == "__main__":' in Path(spec.origin).read_text()


def check_command(argv: Sequence[str], files: Mapping[str, Path]) -> click.Context | None:
    """Raise unless `argv` runs a real entry point of the image with arguments it accepts:
    `python -m <module>` of this repository, or a console script of the locked packages whose
    click command parses the arguments (an unknown option or subcommand fails). `files` maps the
    paths in the container to the repository's files put there (a workspace.yaml)."""
    exe, *args = argv
    if exe == "python":
        assert args[:1] == ["-m"] and len(args) == 2, f"{argv}: expected `python -m <module>`"
        assert _module_runs(args[1]), f"{argv}: {args[1]} is no runnable module"
        return None
    found = list(entry_points(group="console_scripts", name=exe))
    assert len(found) == 1, f"{argv}: {exe} is no console script of the environment"
    command: click.Command = importlib.import_module(found[0].module).cli
    rest = [str(files.get(a, a)) for a in args]
    prog, ctx = exe, None
    while isinstance(command, click.Group):
        ctx = command.make_context(prog, rest, parent=ctx)
        prog, *rest = [*ctx._protected_args, *ctx.args]
        sub = command.get_command(ctx, prog)
        assert sub is not None, f"{argv}: {exe} has no subcommand {prog!r}"
        command = sub
    return command.make_context(prog, rest, parent=ctx)
