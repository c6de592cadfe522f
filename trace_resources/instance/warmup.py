"""Work a run would otherwise repeat in every fork of the warm run worker, done once when the
worker starts (it is one of the worker's preloaded modules, `run_launcher.DEFAULT_PRELOAD`).
Starts no thread: the worker forks.

- httpx imports its transport (httpcore, h11) only when the first client is made, and the RPC
  clients' TLS context loads the CA bundle: ~0.5 s per run when each fork did them (py-spy on
  the runs of a `trace backfill`).
- (The code location's repository and jobs are built by `trace_assets.run_warmup`, preloaded
  after the code location: this package does not import the assets.)
- The modules a run imports after the worker's preloads (found by diffing `sys.modules` in a
  forked run of the raw datasets): Dagster's run-worker internals, the instance's storage, the
  keccak backend, pyarrow's Acero, numpy.ma, the IDNA codec.
"""

from __future__ import annotations

import importlib

import httpx

from trace_resources.chain.rpc import tls_context

RUN_IMPORTS = (
    "cryo._args",
    "cryo._spec",
    "dagster._core.definitions.repository_definition.repository_data_builder",
    "dagster._core.execution.plan.active",
    "dagster._core.executor.in_process",
    "dagster._core.instance.factory",
    "dagster._core.storage.root",
    "dagster._core.storage.sqlite_storage",
    "dagster._core.system_config.composite_descent",
    "dagster._core.utility_ops",
    "dagster._core.workspace.autodiscovery",
    "dagster._utils.temp_file",
    "dagster._utils.test.definitions",
    "encodings.idna",
    "eth_hash.backends.pycryptodome",
    "numpy.ma",
    "pyarrow.acero",
    "trace_resources.instance.storage",
    "trace_resources.storage.migrations.ops",
    "upath.implementations.local",
)


def warm_up() -> None:
    httpx.HTTPTransport(verify=tls_context()).close()
    for name in RUN_IMPORTS:
        importlib.import_module(name)


warm_up()
