"""Tell the running Dagster deployment that a transform was applied: its webserver's GraphQL
`reloadRepositoryLocation`, the mutation behind the UI's Deployment > Reload (and
`DagsterGraphQLClient.reload_repository_location`, whose query this is), so the new asset
appears without a restart.

A plain HTTP POST (httpx) rather than dagster-graphql's client: the query service imports no
Dagster. The apply never fails because of the reload: `reload_code_location` answers what
happened in one line (`TRACE_DAGSTER_URL` unset, the UI down, the location failing to load).
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx

__all__ = ["ReloadOutcome", "reload_code_location"]

RELOAD = """
mutation TraceReloadCodeLocation($location: String!) {
  reloadRepositoryLocation(repositoryLocationName: $location) {
    __typename
    ... on WorkspaceLocationEntry {
      name
      locationOrLoadError { __typename ... on PythonError { message } }
    }
    ... on ReloadNotSupported { message }
    ... on RepositoryLocationNotFound { message }
    ... on UnauthorizedError { message }
    ... on PythonError { message }
  }
}
"""
# a code location loads the platform's assets and every transform: seconds, not minutes
TIMEOUT_S = 120.0
MANUAL = "Deployment > Reload in the Dagster UI"


@dataclass(frozen=True)
class ReloadOutcome:
    reloaded: bool | None  # None: no Dagster URL configured, nothing was tried
    message: str


def _first_line(text: object) -> str:
    lines = str(text).strip().splitlines()
    return lines[0][:300] if lines else ""


def reload_code_location(
    url: str | None, location: str = "trace", timeout_s: float = TIMEOUT_S
) -> ReloadOutcome:
    """Reload `location` on the Dagster webserver at `url`; never raises."""
    if not url:
        return ReloadOutcome(
            None,
            f"no Dagster URL configured (TRACE_DAGSTER_URL): reload the code location to "
            f"materialise it ({MANUAL}; a new `dagster` command loads it at start)",
        )
    endpoint = url.rstrip("/") + "/graphql"
    try:
        response = httpx.post(
            endpoint,
            json={"query": RELOAD, "variables": {"location": location}},
            timeout=timeout_s,
        )
        response.raise_for_status()
        body = response.json()
    except (httpx.HTTPError, ValueError) as exc:
        why = _first_line(exc) or type(exc).__name__
        return ReloadOutcome(
            False,
            f"the Dagster webserver at {url} did not answer ({why}); "
            f"the transform is stored: reload the code location when it is up ({MANUAL})",
        )
    if body.get("errors"):
        return ReloadOutcome(
            False, f"Dagster refused the reload: {_first_line(body['errors'][0].get('message'))}"
        )
    result = (body.get("data") or {}).get("reloadRepositoryLocation") or {}
    kind = result.get("__typename")
    if kind != "WorkspaceLocationEntry":
        return ReloadOutcome(
            False,
            f"Dagster did not reload {location!r}: {kind}: {_first_line(result.get('message'))}",
        )
    loaded = result.get("locationOrLoadError") or {}
    if loaded.get("__typename") != "RepositoryLocation":
        return ReloadOutcome(
            False,
            f"Dagster reloaded {location!r} but it failed to load: "
            f"{_first_line(loaded.get('message'))}",
        )
    return ReloadOutcome(True, f"reloaded the Dagster code location {location!r} at {url}")
