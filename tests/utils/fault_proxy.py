"""The fault-injecting JSON-RPC proxy moved to `infra/local/fault_proxy.py` (the benchmarks'
provider proxy, `infra/local/rpc_provider.py`, builds on it); the tests keep importing it here."""

from infra.local.fault_proxy import (
    FAULT_KINDS,
    Fault,
    FaultKind,
    FaultProxy,
    RequestRecord,
)

__all__ = ["FAULT_KINDS", "Fault", "FaultKind", "FaultProxy", "RequestRecord"]
