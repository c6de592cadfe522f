"""Extract verified raw block ranges with cryo used as a library.

cryo 0.3.2 raises a message-less `RustPanic` on any failure (the cause goes to stderr), does
not retry HTTP 429/5xx (only JSON-RPC rate-limit errors), has no request timeout, and returns
fewer rows without an error when a node drops logs or transactions, so Trace (1) checks
inputs first and says itself what is wrong, (2) retries failed or incomplete extractions with
backoff inside a budget, and (3) verifies every range before anything is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cryo
import numpy as np
import polars as pl
import pyarrow as pa

from trace_resources.chain.crosscheck import (
    Check,
    CheckStatus,
    NodeEvidence,
    check_against_node,
    fetch_evidence,
    probe_checks,
)
from trace_resources.chain.endpoints import Endpoints, FailoverRpc
from trace_resources.chain.ranges import BlockRange
from trace_resources.chain.rpc import RetryPolicy, Rpc
from trace_resources.chain.schemas import RAW_DATASETS, RAW_SCHEMAS, RawDataset
from trace_resources.chain.verify import VerificationReport, verify_range
from trace_resources.errors import (
    RangeIncompleteError,
    RangeNotFinalizedError,
    RpcFaultError,
    RpcRefusedError,
    RpcUnreachableError,
    UnknownDatasetError,
    WrongChainIdError,
)
from trace_resources.settings import RpcEndpoint

__all__ = ["ChainClient", "RangeData", "BlockRef", "ChainHead"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BlockRef:
    number: int
    hash: str
    parent_hash: str

    def as_dict(self) -> dict[str, Any]:
        return {"number": self.number, "hash": self.hash, "parent_hash": self.parent_hash}


@dataclass(frozen=True)
class ChainHead:
    chain_id: int
    latest: int
    finalized: int
    safe: int | None = None  # None: the node has no `safe` tag


@dataclass
class RangeData:
    """The verified raw tables of one block range."""

    block_range: BlockRange
    tables: dict[RawDataset, pa.Table]
    first: BlockRef
    last: BlockRef
    endpoint: str | None = None  # the endpoint that served it (its name, never its URL)

    @property
    def source(self) -> dict[str, Any]:
        """Source block hashes (and the endpoint) recorded in each committed manifest."""
        source: dict[str, Any] = {
            "range": self.block_range.key,
            "first": self.first.as_dict(),
            "last": self.last.as_dict(),
        }
        if self.endpoint is not None:
            source["endpoint"] = self.endpoint
        return source


class _CryoFailed(Exception):
    """cryo panicked; the cause is on stderr. `headers`: the range's headers, if Trace's own
    batch of them was answered meanwhile (what the diagnosis reads)."""

    headers: dict[int, Any] | None = None


def _hex(value: bytes) -> str:
    return "0x" + value.hex()


def to_schema(frame: pl.DataFrame, dataset: RawDataset, extra: Mapping[str, pa.Array]) -> pa.Table:
    """cryo's frame as Trace's explicit schema for `dataset` (columns selected, types cast)."""
    schema = RAW_SCHEMAS[dataset]
    source = frame.to_arrow()
    columns = []
    for f in schema:
        column = extra[f.name] if f.name in extra else source.column(f.name)
        columns.append(column.cast(f.type))
    return pa.Table.from_arrays(columns, schema=schema)


class ChainClient:
    """Everything Trace asks of a chain: head, finality, and verified range extraction."""

    def __init__(
        self,
        rpc_url: str,
        chain_id: int,
        *,
        requests_per_second: int | None = None,
        max_concurrent_requests: int = 32,
        timeout_s: float = 10.0,
        collect_timeout_s: float = 300.0,
        retry: RetryPolicy | None = None,
        endpoints: Sequence[RpcEndpoint] = (),
        parallel: int = 1,
        verify_receipts: bool = False,
        verify_transactions_root: bool = False,
        finality: str | int = "finalized",
    ) -> None:
        """`rpc_url` and `requests_per_second` name the one endpoint, unless `endpoints`
        (with their limits, in failover order) are given; `max_concurrent_requests` is cryo's
        cap per collect on an endpoint without a concurrency limit; `parallel` is how many
        ranges the caller extracts at once (the endpoints' budgets are shared among them);
        `finality` is the head `head()` calls finalized: the `finalized` or `safe` tag, or a
        depth in blocks below `latest` (ChainConfig.finality)."""
        self.finality = finality
        self.verify_receipts = verify_receipts
        self.verify_transactions_root = verify_transactions_root
        self.chain_id = chain_id
        self.max_concurrent_requests = max_concurrent_requests
        self.collect_timeout_s = collect_timeout_s
        self.retry = retry or RetryPolicy()
        self.endpoints = Endpoints(
            endpoints or [RpcEndpoint(url=rpc_url, requests_per_second=requests_per_second)],
            timeout_s=timeout_s,
            retry=self.retry,
            parallel=parallel,
            default_cryo_concurrency=max_concurrent_requests,
        )
        self.rpc = FailoverRpc(self.endpoints)
        self._checks: dict[int, dict[Check, CheckStatus]] = {}  # by endpoint
        self._checks_lock = threading.Lock()

    @property
    def rpc_url(self) -> str:
        """The URL of the endpoint in use (the next one after a failover)."""
        return self.endpoints.budgets[self.endpoints.current].endpoint.url

    def close(self) -> None:
        self.rpc.close()

    def serves(self, method: str) -> bool:
        """Whether the endpoint in use serves `method` (its profile's `unsupported` list)."""
        return self.endpoints.budgets[self.endpoints.current].endpoint.serves(method)

    # -- head and preflight ------------------------------------------------------------

    def check_chain_id(self) -> None:
        reported = int(self.rpc.call("eth_chainId"), 16)
        if reported != self.chain_id:
            raise WrongChainIdError(
                f"the endpoint {self.rpc_url} serves chain id {reported}, but Trace is "
                f"configured for chain id {self.chain_id}: point TRACE_RPC_URL at a node of "
                f"chain {self.chain_id}, or set TRACE_CHAIN_ID={reported} if that chain is meant"
            )

    def head(self) -> ChainHead:
        """Chain id, latest and finalized block numbers (the chain id is checked)."""
        self.check_chain_id()
        tag = self.finality if isinstance(self.finality, str) else "latest"
        latest, finalized = (
            int(block["number"], 16)
            for block in self.rpc.batch("eth_getBlockByNumber", [["latest", False], [tag, False]])
        )
        if isinstance(self.finality, int):  # a depth: final once that many blocks are above
            finalized = max(latest - self.finality, -1)
        return ChainHead(chain_id=self.chain_id, latest=latest, finalized=finalized)

    def heads(self) -> ChainHead:
        """Latest, safe and finalized block numbers in one batch, without the chain id check
        (the head follower reads them several times a second; it checks the id at start)."""
        latest, safe, finalized = self.rpc.batch(
            "eth_getBlockByNumber", [["latest", False], ["safe", False], ["finalized", False]]
        )
        head = int(latest["number"], 16)
        safe_number = int(safe["number"], 16) if safe else None
        final = int(finalized["number"], 16)
        if self.finality == "safe" and safe_number is not None:  # the chain's finality
            final = safe_number
        elif isinstance(self.finality, int):
            final = max(head - self.finality, -1)
        return ChainHead(chain_id=self.chain_id, latest=head, finalized=final, safe=safe_number)

    def block_ref(self, number: int) -> tuple[BlockRef, int] | None:
        """(number, hash, parent hash) and timestamp of one block, or None if the node lacks it."""
        block = self.rpc.call("eth_getBlockByNumber", [hex(number), False])
        if not block:
            return None
        ref = BlockRef(int(block["number"], 16), block["hash"], block["parentHash"])
        return ref, int(block["timestamp"], 16)

    def block_time_s(self, at: int, sample: int = 1000) -> float | None:
        """The chain's average block time over the `sample` blocks up to `at`, from their
        timestamps (one-second granularity on Monad, so averaged over many blocks); None if
        the chain is too short to tell."""
        start = max(0, at - sample)
        if at - start < 2:
            return None
        first, last = self.block_ref(start), self.block_ref(at)
        if first is None or last is None or last[1] <= first[1]:
            return None
        return (last[1] - first[1]) / (at - start)

    def preflight(self, ranges: Sequence[BlockRange], datasets: Sequence[str]) -> ChainHead:
        """Check everything cryo would otherwise fail on with a message-less panic."""
        unknown = [d for d in datasets if d not in RAW_DATASETS]
        if unknown:
            raise UnknownDatasetError(
                f"unknown raw dataset(s) {', '.join(map(repr, unknown))}: "
                f"Trace extracts {', '.join(RAW_DATASETS)}"
            )
        head = self.head()
        beyond = [r for r in ranges if r.last > head.finalized]
        if beyond:
            raise RangeNotFinalizedError(
                f"block range {beyond[0].key} ends at block {beyond[0].last}, past the chain's "
                f"finalized block {head.finalized} (latest {head.latest}); Trace commits only "
                "finalized blocks. Wait until the chain-head sensor adds this range, or "
                "materialise an earlier range"
            )
        return head

    # -- verification against the node's headers (crosscheck.py) ------------------------

    def node_checks(self, index: int | None = None) -> dict[Check, CheckStatus]:
        """Which header, receipts and transactions checks endpoint `index` (default: the one
        in use) allows, probed once per endpoint and client; one it does not allow, or that is
        off, is logged with why, never skipped silently."""
        index = self.endpoints.current if index is None else index
        with self._checks_lock:
            checks = self._checks.get(index)
            if checks is None:
                label = self.endpoints.label(index)
                checks = self._checks[index] = probe_checks(self.endpoints.rpc(index))
                for status in checks.values():
                    if not status.possible:
                        log.warning("range verification against %s: %s", label, status)
                if not self.verify_receipts:
                    log.info(
                        "range verification against %s: receipts roots and logs are not "
                        "checked against eth_getBlockReceipts (off: TRACE_VERIFY_RECEIPTS=true "
                        "turns it on; the logs bloom and counts are still checked)",
                        label,
                    )
                if not self.verify_transactions_root:
                    log.info(
                        "range verification against %s: transactions roots and hashes are not "
                        "recomputed (off: one call per transaction; "
                        "TRACE_VERIFY_TRANSACTIONS_ROOT=true turns it on)",
                        label,
                    )
            return checks

    def node_evidence(
        self,
        block_range: BlockRange,
        index: int | None = None,
        headers: dict[int, dict[str, Any] | None] | None = None,
    ) -> NodeEvidence:
        """Endpoint `index`'s (default: the one in use) evidence for `block_range`, for the
        checks it allows (with the range's `headers`, if already fetched from it)."""
        index = self.endpoints.current if index is None else index
        allowed = self.node_checks(index).items()
        checks = frozenset(c for c, status in allowed if status.possible)
        if not self.verify_receipts:
            checks -= {"receipts_root"}
        if not self.verify_transactions_root:
            checks -= {"transactions_root", "transaction_hashes"}
        return fetch_evidence(self.endpoints.rpc(index), block_range, checks, headers)

    # -- extraction ----------------------------------------------------------------------

    def extract_range(self, block_range: BlockRange) -> RangeData:
        """Extract blocks, transactions and logs of one finalized range, verified complete."""
        self.preflight([block_range], RAW_DATASETS)
        return self.extract_verified(block_range)

    def extract_verified(
        self,
        block_range: BlockRange,
        collect_slots: threading.Semaphore | None = None,
        endpoint: int | None = None,
    ) -> RangeData:
        """Extract and verify on `endpoint` (default: the one in use; a run's ranges take
        `self.endpoints.assign()` in turn), failing over to the next one when it keeps
        failing; every call for the range goes to that one endpoint. With several endpoints,
        the range's first and last block hashes (and the first's parent hash) must be the
        same at every endpoint that answers (`Endpoints.cross_check`)."""

        def on(index: int) -> RangeData:
            data = self._extract_verified_on(index, block_range, collect_slots)
            data.endpoint = self.endpoints.label(index)
            if len(self.endpoints) > 1:
                # the first block's parent too: it is what links the range to the one before
                hashes = {data.first.number: data.first.hash, data.last.number: data.last.hash}
                if data.first.number > 0:
                    hashes[data.first.number - 1] = data.first.parent_hash
                self.endpoints.cross_check(
                    index, hashes, f"blocks {block_range.start}..{block_range.last}"
                )
            return data

        return self.endpoints.run(on, prefer=endpoint)

    def _extract_verified_on(
        self,
        index: int,
        block_range: BlockRange,
        collect_slots: threading.Semaphore | None = None,
    ) -> RangeData:
        """Extract and verify, retrying failed or incomplete extractions inside the budget.

        `collect_slots` bounds how many ranges are being collected from the node at once:
        a caller extracting ranges on more threads than slots verifies one range while the
        next one is collected, instead of leaving the node idle during verification.
        """
        started = time.monotonic()
        retrying = self.retry.retrying(
            lambda exc: isinstance(exc, _CryoFailed | RangeIncompleteError)
        )
        try:
            for attempt in retrying:
                with attempt:
                    data = self._extract_once(index, block_range, collect_slots)
                    return data
        except _CryoFailed as exc:
            self.check_chain_id()  # a clear error if the endpoint went away or changed
            self._raise_if_blocks_missing(block_range, index, exc.headers)
            raise RpcFaultError(
                f"cryo could not extract blocks {block_range.start}..{block_range.last} from "
                f"{self.endpoints.label(index)} after retrying for "
                f"{time.monotonic() - started:.1f} s ({exc}). "
                "cryo prints the cause on stderr (see the step's stderr log); it is usually "
                "the node rate limiting (HTTP 429) or failing (5xx): lower "
                "TRACE_RPC_REQUESTS_PER_SECOND or retry later"
            ) from exc
        raise AssertionError("unreachable: tenacity reraises")

    def _raise_if_blocks_missing(
        self, block_range: BlockRange, index: int, headers: dict[int, Any] | None = None
    ) -> None:
        """Name the blocks the node does not have: cryo panics on them without detail.

        A diagnosis after cryo failed, from the headers the failed attempt fetched, or else
        one attempt without retries: if it fails too, the caller's RpcFaultError still says
        what failed.
        """
        numbers = list(block_range.blocks())
        if headers is None:
            try:
                answers = self.endpoints.rpc(index).batch(
                    "eth_getBlockByNumber",
                    [[hex(n), False] for n in numbers],
                    retry=RetryPolicy(max_attempts=1, budget_s=self.retry.budget_s),
                )
            except (RpcFaultError, RpcRefusedError, RpcUnreachableError):
                return
            headers = dict(zip(numbers, answers, strict=True))
        report = VerificationReport(block_range)
        report.add(
            "missing blocks (the node returned no block for them)",
            [n for n in numbers if headers.get(n) is None],
        )
        report.raise_if_incomplete()

    def _extract_once(
        self, index: int, block_range: BlockRange, collect_slots: threading.Semaphore | None
    ) -> RangeData:
        # the caller's bound on ranges collected at once, and the endpoint's own
        with collect_slots or contextlib.nullcontext(), self.endpoints.collect_slots[index]:
            frames, headers = asyncio.run(self._collect_all(index, block_range))
        numbers = frames["blocks"]["block_number"].to_numpy()
        counts = np.array(
            [len((headers.get(int(n)) or {}).get("transactions") or ()) for n in numbers],
            dtype=np.uint32,
        )
        tables: dict[RawDataset, pa.Table] = {
            "blocks": to_schema(
                frames["blocks"], "blocks", {"transaction_count": pa.array(counts, pa.uint32())}
            ),
            "transactions": to_schema(frames["transactions"], "transactions", {}),
            "logs": to_schema(frames["logs"], "logs", {}),
        }
        report = verify_range(block_range, **tables)
        if report.ok:
            # fetched once the tables agree with each other, outside the collection slot: in
            # a backfill it overlaps the next range's collection, and a faulty extraction
            # (retried anyway) costs no evidence
            evidence = self.node_evidence(block_range, index, headers)
            check_against_node(report, tables, evidence)
        report.raise_if_incomplete()
        blocks = tables["blocks"].sort_by("block_number")
        first, last = (
            blocks.slice(0, 1).to_pylist()[0],
            blocks.slice(blocks.num_rows - 1).to_pylist()[0],
        )
        return RangeData(
            block_range=block_range,
            tables=tables,
            first=BlockRef(
                first["block_number"], _hex(first["block_hash"]), _hex(first["parent_hash"])
            ),
            last=BlockRef(
                last["block_number"], _hex(last["block_hash"]), _hex(last["parent_hash"])
            ),
        )

    def headers(self, block_range: BlockRange, rpc: Rpc | None = None) -> dict[int, Any]:
        """The range's headers (`eth_getBlockByNumber` without transaction bodies), in one
        batch from `rpc` (default: the endpoint in use): the transaction counts the blocks
        dataset carries, and what verification checks the extracted data against."""
        numbers = list(block_range.blocks())
        answers = (rpc or self.rpc).batch(
            "eth_getBlockByNumber", [[hex(n), False] for n in numbers]
        )
        return dict(zip(numbers, answers, strict=True))

    async def _collect_all(
        self, index: int, block_range: BlockRange
    ) -> tuple[dict[RawDataset, pl.DataFrame], dict[int, Any]]:
        budget = self.endpoints.budgets[index]  # the endpoint's limits, shared (endpoints.py)
        kwargs: dict[str, Any] = {
            "blocks": [block_range.cryo_spec],
            "rpc": self.endpoints.cryo_url(index),  # the endpoint, or its batching relay
            "include_columns": ["all"],
            "verbose": False,
        }

        async def collect(dataset: RawDataset) -> pl.DataFrame:
            # cryo has no request timeout: a node that holds a request would hang it forever
            try:
                return await asyncio.wait_for(
                    cryo.async_collect(
                        dataset, output_format="polars", **kwargs, **budget.cryo_kwargs(dataset)
                    ),
                    self.collect_timeout_s,
                )
            except TimeoutError:
                raise _CryoFailed(
                    f"cryo.collect({dataset!r}) did not finish within "
                    f"{self.collect_timeout_s:.0f} s"
                ) from None
            except Exception as exc:  # cryo raises pyo3's RustPanic with no detail
                raise _CryoFailed(f"cryo.collect({dataset!r}) failed: {exc}") from None

        heading = asyncio.create_task(
            asyncio.to_thread(self.headers, block_range, self.endpoints.rpc(index))
        )
        try:
            if budget.sequential_collects:  # a rate-limited endpoint: one collect at a time
                collected = [await collect(d) for d in RAW_DATASETS]
            else:
                collected = await asyncio.gather(*(collect(d) for d in RAW_DATASETS))
        except _CryoFailed as exc:
            try:  # for the diagnosis: which blocks the node lacks
                exc.headers = await heading
            except Exception:  # noqa: BLE001 (the diagnosis then asks again)
                pass
            raise
        frames: dict[RawDataset, pl.DataFrame] = dict(zip(RAW_DATASETS, collected, strict=True))
        return frames, await heading
