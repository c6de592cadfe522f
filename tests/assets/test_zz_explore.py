import time, pytest
from tests.utils.fault_proxy import Fault, FaultProxy
from trace_resources.chain.extract import ChainClient
from trace_resources.chain.rpc import RetryPolicy
from trace_resources.chain.ranges import BlockRange
from tests.conftest import CHAIN_ID

CASES = [
    Fault("missing_block", methods={"eth_getBlockByNumber"}, blocks={60}),
    Fault("truncate_txs", methods={"eth_getBlockByNumber"}, blocks={60}),
    Fault("truncate_txs", methods={"eth_getBlockReceipts"}, blocks={60}),
    Fault("missing_logs", blocks={60}),
    Fault("jsonrpc_error", methods={"eth_getLogs"}),
    Fault("http_429", methods={"eth_getLogs"}),
    Fault("jsonrpc_error", methods={"eth_getBlockTransactionCountByNumber"}, code=-32603),
    Fault("drop"),
    Fault("timeout", methods={"eth_getBlockReceipts"}, count=1, delay=5),
    Fault("jsonrpc_error", methods={"eth_getLogs"}, count=3),
]

@pytest.mark.parametrize("fault", CASES)
def test_explore(devnet, fault, capfd):
    with FaultProxy(devnet.url, [fault]) as p:
        c = ChainClient(p.url, CHAIN_ID, collect_timeout_s=3, timeout_s=2, retry=RetryPolicy(max_attempts=3, budget_s=4))
        t0 = time.monotonic()
        try:
            d = c.extract_range(BlockRange(50, 99))
            res = {k: v.num_rows for k, v in d.tables.items()}
        except Exception as e:
            res = f"{type(e).__name__}: {e}"
        dt = time.monotonic() - t0
        c.close()
        err = capfd.readouterr().err
        print("\nRESULT", fault.kind, fault.methods, f"{dt:.2f}s", p.injected, res)
        print("STDERR", err[-600:])
