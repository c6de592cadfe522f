"""Work a run would otherwise repeat in every fork of the warm run worker, done once when the
worker starts (it is one of the worker's preloaded modules, `run_launcher.DEFAULT_PRELOAD`):
httpx imports its transport (httpcore, h11) only when the first client is made, and the RPC
clients' TLS context loads the CA bundle. Both cost ~0.5 s per run when each fork did them
(measured with py-spy on the runs of a `trace backfill`). Starts no thread: the worker forks."""

from __future__ import annotations

import httpx

from trace_resources.chain.rpc import tls_context

httpx.HTTPTransport(verify=tls_context()).close()
