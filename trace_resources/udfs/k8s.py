"""Python transforms in a pod of their own: the production launcher (`TRACE_UDF_LAUNCHER=k8s`),
through Dagster's `PipesK8sClient`, with the limits and environment of the local jail.

    udf_pod(limits, image=..., namespace=..., ...) -> UdfPod    the ONE place that builds a
                                                                 transform's pod (its spec,
                                                                 command and environment)
    udf_pod_body(pod, bootstrap_env, name) -> V1Pod              the body the client submits
                                                                 (dagster_k8s' build_pod_body)
    ScopedPipesK8sClient.run_launch(context, pod, extras)        runs it to its end; its exit
                                                                 code and why it was stopped

The pod holds what the local jail holds and nothing more:
- the environment is the same allow-list as locally (`python.BASE_ENV`) plus Dagster Pipes'
  own variables, whose context carries the attempt's extras (the task token, the query
  service's URL, the inputs, the module's source): no DSN, no object-store key, no signing key;
  `enableServiceLinks: false` keeps Kubernetes' per-service variables out, and no service
  account token is mounted;
- its container runs the jail's wrapper (`jail_exec.py`, not as root: the limits without a
  uid of its own) around the runner, so CPU seconds, open files, processes, file size and
  printed output are limited as locally; around it Kubernetes enforces the wall time
  (`activeDeadlineSeconds`), memory (`resources.limits.memory`, = TRACE_UDF_PY_MEMORY), a CPU
  rate of TRACE_UDF_PY_CPU_S / TRACE_UDF_PY_TIMEOUT_S cores (a pod busy for its whole wall time
  uses exactly its CPU seconds) and disk (`ephemeral-storage` = file size + output; its only
  writable folder is an emptyDir at /tmp of the file size);
- it runs as the fixed unprivileged uid TRACE_UDF_PY_UID_BASE (non-root, no privilege
  escalation, every capability dropped, read-only root filesystem, RuntimeDefault seccomp, its
  own user namespace where the cluster supports it) and `restartPolicy: Never`: Dagster retries
  a step, never Kubernetes a pod;
- the namespace's NetworkPolicy (infra/deploy/k8s/) lets pods labelled `POD_LABELS` reach the
  query service and DNS only.

The image (`TRACE_UDF_K8S_IMAGE:<tag>`, infra/deploy/k8s/Dockerfile.udf-runner) holds Python,
pyarrow, polars, dagster-pipes, the runner and the jail's wrapper; a transform's requirements
are installed at build time, in the tag its requirements name (`image_tag`): a pod installs
nothing, so it needs no network beyond the query service.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import dagster as dg
import kubernetes
from dagster._core.pipes.client import PipesClientCompletedInvocation
from dagster._core.pipes.context import PipesSession
from dagster_k8s.client import DagsterK8sError, DagsterKubernetesClient, WaitForPodState
from dagster_k8s.pipes import (
    PipesK8sClient,
    PipesK8sPodLogsMessageReader,
    build_pod_body,
    get_pod_name,
)
from dagster_pipes import DAGSTER_PIPES_CONTEXT_ENV_VAR

from trace_resources.udfs.jail import STOPPED_EXIT, JailLimits
from trace_resources.udfs.jail_exec import messages
from trace_resources.udfs.python import BASE_ENV, udf_pipes_session
from trace_resources.udfs.venvs import checked_requirements

__all__ = [
    "IMAGE_JAIL",
    "IMAGE_PYTHON",
    "IMAGE_RUNNER",
    "POD_LABELS",
    "POD_START_S",
    "ScopedPipesK8sClient",
    "UdfPod",
    "UdfPodError",
    "image_tag",
    "pod_outcome",
    "udf_pod",
    "udf_pod_body",
]

# where infra/deploy/k8s/Dockerfile.udf-runner puts things
IMAGE_PYTHON = "/usr/local/bin/python"
IMAGE_RUNNER = "/opt/trace/trace_udf_runner.py"
IMAGE_JAIL = "/opt/trace/jail_exec.py"
POD_TMP = "/tmp"
POD_JAIL_DIR = "/tmp/trace-udf-jail"
# what the namespace's NetworkPolicy selects (infra/deploy/k8s/udf-networkpolicy.yaml)
POD_LABELS = {"trace.dev/role": "udf"}
CONTAINER = "udf"
# one environment variable reaches the process through execve: at most 128 KiB on Linux
MAX_CONTEXT_CHARS = 120_000
JAIL_SAID = "trace-udf-jail: stopped: the UDF "
# how long a pod may take to be scheduled and pull its image, on top of its wall time (the
# deadline counts from its start): the launcher waits that long, and the task token lives it
POD_START_S = 600


class UdfPodError(Exception):
    """The transform's pod could not be run (refused, never started); one line saying why."""


def image_tag(requirements: Sequence[str]) -> str:
    """The runner image's tag for a transform with these requirements: `base` without any,
    else `req-` and a hash of the normalised, sorted requirements (the image's build argument
    REQUIREMENTS holds them, space-separated)."""
    wanted = checked_requirements(requirements)
    if not wanted:
        return "base"
    return "req-" + hashlib.sha256(json.dumps(wanted).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class UdfPod:
    """What `PipesK8sClient` is given to start one attempt's pod."""

    image: str
    namespace: str
    command: Sequence[str]
    env: Mapping[str, str]
    meta: Mapping[str, Any]
    spec: Mapping[str, Any]
    wait_timeout_s: float
    requirements: Sequence[str] = field(default_factory=list)


def _cpu(limits: JailLimits) -> str:
    return f"{max(100, math.ceil(1000 * limits.cpu_s / limits.timeout_s))}m"


def udf_pod(
    limits: JailLimits,
    *,
    repository: str,
    namespace: str,
    requirements: Sequence[str] = (),
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
) -> UdfPod:
    """One attempt's pod, from the jail's limits (see the module's docstring)."""
    env = dict(BASE_ENV)
    jail = asdict(limits) | {"jail_dir": POD_JAIL_DIR, "status": None, "env_keys": list(env)}
    command = [IMAGE_PYTHON, "-I", "-S", IMAGE_JAIL, "--spec", json.dumps(jail)]
    command += ["--", IMAGE_PYTHON, "-I", IMAGE_RUNNER]
    uid = limits.uid_base
    resources = {
        "cpu": _cpu(limits),
        "memory": str(limits.memory),
        "ephemeral-storage": str(limits.file_size + limits.output),
    }
    spec = {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": math.ceil(limits.timeout_s),
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "hostUsers": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": uid,
            "runAsGroup": uid,
            "fsGroup": uid,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": CONTAINER,
                "workingDir": POD_TMP,
                "resources": {"limits": resources, "requests": dict(resources)},
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": uid,
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "privileged": False,
                    "capabilities": {"drop": ["ALL"]},
                },
                # the jail's last words ("trace-udf-jail: stopped: ...") become the
                # container's termination message
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "volumeMounts": [{"name": "tmp", "mountPath": POD_TMP}],
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": str(limits.file_size)}}],
    }
    meta = {
        "labels": {**(labels or {}), **POD_LABELS},
        "annotations": dict(annotations or {}),
    }
    return UdfPod(
        image=f"{repository}:{image_tag(requirements)}",
        namespace=namespace,
        command=command,
        env=env,
        meta=meta,
        spec=spec,
        wait_timeout_s=limits.timeout_s + POD_START_S,
        requirements=list(requirements),
    )


def udf_pod_body(pod: UdfPod, bootstrap_env: Mapping[str, str], name: str) -> Any:
    """The `V1Pod` PipesK8sClient submits for `pod`, with Pipes' bootstrap variables."""
    context = bootstrap_env.get(DAGSTER_PIPES_CONTEXT_ENV_VAR, "")
    if len(context) > MAX_CONTEXT_CHARS:
        raise UdfPodError(
            f"the transform's Pipes context is {len(context)} characters once encoded, more "
            f"than a pod's environment variable holds ({MAX_CONTEXT_CHARS}): shorten its module"
        )
    return build_pod_body(
        pod_name=name,
        image=pod.image,
        command=list(pod.command),
        env_vars={**pod.env, **bootstrap_env},
        base_pod_meta=pod.meta,
        base_pod_spec=pod.spec,
    )


def _jail_said(message: str | None) -> str | None:
    lines = [line for line in (message or "").splitlines() if line.startswith(JAIL_SAID)]
    return lines[-1].removeprefix(JAIL_SAID).strip() if lines else None


def pod_outcome(pod: Any, limits: JailLimits) -> tuple[int, str | None]:
    """How a finished pod ended, as the local jail says it: (exit code, negative for a death
    by a signal; why it was stopped at a limit, or None)."""
    said = messages(asdict(limits))
    status = pod.status
    if status.reason == "DeadlineExceeded":
        return -9, said["timeout"]
    for container in status.container_statuses or []:
        ended = container.state.terminated if container.state else None
        if ended is None:
            continue
        if ended.reason == "OOMKilled":
            return -9, said["memory"]
        if ended.exit_code == STOPPED_EXIT:
            return STOPPED_EXIT, _jail_said(ended.message) or "was stopped at a limit"
        if ended.exit_code > 128:
            return -(ended.exit_code - 128), None
        return int(ended.exit_code), None
    if status.reason == "Evicted":
        if "ephemeral" in (status.message or ""):
            return -9, (
                f"wrote more than {limits.file_size + limits.output} bytes of files and output "
                "(TRACE_UDF_PY_FILE_SIZE + TRACE_UDF_PY_OUTPUT)"
            )
        return -9, None  # the node's pressure, not the transform's doing: retried
    waiting = [
        c.state.waiting for c in status.container_statuses or [] if c.state and c.state.waiting
    ]
    reason = waiting[0].reason if waiting else (status.reason or status.phase)
    if waiting or status.phase in ("Failed", "Succeeded"):
        raise UdfPodError(f"its pod never ran ({reason})")
    raise UdfPodError(f"its pod had not ended when the launcher stopped waiting ({reason})")


class ScopedPipesK8sClient(PipesK8sClient):
    """Dagster's Kubernetes Pipes client, run with exactly the pod `udf_pod` builds, and
    returning how the pod ended (the stock `run` raises on a failed pod and loses what the
    process reported)."""

    def run_launch(
        self,
        *,
        context: dg.AssetExecutionContext,
        pod: UdfPod,
        extras: Mapping[str, Any],
        limits: JailLimits,
    ) -> tuple[PipesClientCompletedInvocation, int, str | None]:
        try:
            self._load_k8s_config()
        except kubernetes.config.ConfigException as exc:
            raise UdfPodError(
                f"no Kubernetes configuration ({exc}): run Dagster inside the cluster or set "
                "KUBECONFIG, or set TRACE_UDF_LAUNCHER=local"
            ) from None
        client = DagsterKubernetesClient.production_client()
        try:
            with self.pod_session(context, pod, extras) as (session, name, body):
                client.core_api.create_namespaced_pod(pod.namespace, body)
                try:
                    finished = self._wait(context, client, pod, name)
                finally:
                    client.core_api.delete_namespaced_pod(name, pod.namespace)
        except kubernetes.client.ApiException as exc:
            raise UdfPodError(
                f"the Kubernetes API refused a call in namespace {pod.namespace!r} ({exc.status} "
                f"{exc.reason}): the Dagster run's service account needs the role in "
                "infra/deploy/k8s/dagster-run-rbac.yaml there"
            ) from None
        try:
            code, stop = pod_outcome(finished, limits)
        except UdfPodError as exc:
            if "ImagePull" in str(exc) or "ErrImage" in str(exc):
                raise UdfPodError(f"{exc}: {_build_hint(pod)}") from None
            raise
        return PipesClientCompletedInvocation(session), code, stop

    @contextmanager
    def pod_session(
        self, context: dg.AssetExecutionContext, pod: UdfPod, extras: Mapping[str, Any]
    ) -> Iterator[tuple[PipesSession, str, Any]]:
        """The Pipes session of one attempt, with its pod's name and the body to submit."""
        with udf_pipes_session(self, context, extras) as session:
            name = get_pod_name(context.run_id, context.op_execution_context.op.name)
            yield session, name, udf_pod_body(pod, session.get_bootstrap_env_vars(), name)

    def _wait(self, context: dg.AssetExecutionContext, client: Any, pod: UdfPod, name: str) -> Any:
        """The pod once it has ended, its log (the process's Pipes messages) read to its end.
        Unlike the stock client, the log is read as well when the container ended before it
        was ever seen ready (a transform that fails at once still says why)."""
        waiting = {
            "wait_time_between_attempts": self.poll_interval,
            "wait_timeout": pod.wait_timeout_s,
        }
        try:
            client.wait_for_pod(
                name, pod.namespace, wait_for_state=WaitForPodState.Ready, **waiting
            )
        except DagsterK8sError:
            pass  # it ended (or never started): how is read from its status below
        reader = self.message_reader
        if isinstance(reader, PipesK8sPodLogsMessageReader):
            try:
                reader.consume_pod_logs(
                    context=context,
                    core_api=client.core_api,
                    pod_name=name,
                    namespace=pod.namespace,
                )
            except kubernetes.client.ApiException:
                pass  # no log: the container never ran
        try:
            client.wait_for_pod(
                name,
                pod.namespace,
                wait_for_state=WaitForPodState.Terminated,
                **waiting,
            )
        except DagsterK8sError:
            pass
        return client.core_api.read_namespaced_pod(name, pod.namespace)


def _build_hint(pod: UdfPod) -> str:
    requirements = " ".join(checked_requirements(pod.requirements))
    return (
        "build and push its image with `docker build -f infra/deploy/k8s/Dockerfile.udf-runner "
        f"--build-arg REQUIREMENTS='{requirements}' -t {pod.image} .`"
    )
