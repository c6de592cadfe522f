"""Compile the devnet Solidity contracts offline with solc-js (from ``node_modules``).

Usage::

    python -m infra.devnet.compile [--force]

Every ``infra/devnet/contracts/<Name>.sol`` is compiled with solc's standard-JSON API (run
through ``node``) into ``infra/devnet/build/<Contract>.json`` holding the ABI, creation and
runtime bytecode, the function selectors computed by solc (``methodIdentifiers``) and the
event topics (keccak-256 of the event signatures, computed with ``cast keccak``). A source
file is only recompiled when the hash of its text, the compiler version or the settings
changed. By convention a source file holds a contract named like the file.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DEVNET_DIR = Path(__file__).resolve().parent
REPO_ROOT = DEVNET_DIR.parent.parent
CONTRACTS_DIR = DEVNET_DIR / "contracts"
BUILD_DIR = DEVNET_DIR / "build"
NODE_MODULES = REPO_ROOT / "node_modules"
SOLC_DIR = NODE_MODULES / "solc"
CAST_BIN = NODE_MODULES / ".bin" / "cast"

# Bump when the shape of the build json changes, to invalidate old caches.
ARTIFACT_FORMAT = 1

SETTINGS: dict[str, Any] = {
    "optimizer": {"enabled": True, "runs": 200},
    # Cancun: supported by anvil and by Monad (PUSH0, MCOPY, transient storage).
    "evmVersion": "cancun",
    "outputSelection": {
        "*": {
            "*": [
                "abi",
                "evm.bytecode.object",
                "evm.deployedBytecode.object",
                "evm.methodIdentifiers",
            ]
        }
    },
}

# Reads a standard-JSON input on stdin, writes {"version", "output"} on stdout.
_NODE_SCRIPT = r"""
const solc = require(process.argv[1]);
let input = '';
process.stdin.setEncoding('utf8');
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const output = JSON.parse(solc.compile(input));
  process.stdout.write(JSON.stringify({ version: solc.version(), output }));
});
"""

_NPM_HINT = "run `npm install` in the repository root ({root}) to install solc-js and foundry"


class DevnetToolError(RuntimeError):
    """A required external tool (node, solc-js, cast) is missing or failed."""


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise DevnetToolError(
            "`node` was not found on PATH; install Node.js (>= 18) and "
            + _NPM_HINT.format(root=REPO_ROOT)
        )
    return node


def solc_version() -> str:
    """Version of the solc-js package in node_modules (without starting node)."""
    package_json = SOLC_DIR / "package.json"
    if not (SOLC_DIR / "soljson.js").is_file() or not package_json.is_file():
        raise DevnetToolError(
            f"solc-js is missing from {SOLC_DIR}; " + _NPM_HINT.format(root=REPO_ROOT)
        )
    return str(json.loads(package_json.read_text())["version"])


def _cast() -> str:
    if not CAST_BIN.exists():
        raise DevnetToolError(
            f"cast is missing from {CAST_BIN}; " + _NPM_HINT.format(root=REPO_ROOT)
        )
    return str(CAST_BIN)


def _source_hash(source: str, version: str) -> str:
    h = hashlib.sha256()
    h.update(f"format={ARTIFACT_FORMAT}\nsolc={version}\n".encode())
    h.update(json.dumps(SETTINGS, sort_keys=True).encode())
    h.update(b"\n")
    h.update(source.encode())
    return h.hexdigest()


def _canonical_type(param: dict[str, Any]) -> str:
    type_ = str(param["type"])
    if type_.startswith("tuple"):
        inner = ",".join(_canonical_type(c) for c in param.get("components", []))
        return f"({inner}){type_[len('tuple') :]}"
    return type_


def _keccak_many(texts: list[str]) -> list[str]:
    """keccak-256 of each text, via ``cast keccak`` (Python's hashlib has no keccak)."""
    cast = _cast()
    out = []
    for text in texts:
        res = subprocess.run([cast, "keccak", text], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise DevnetToolError(f"`cast keccak {text!r}` failed: {res.stderr.strip()}")
        out.append(res.stdout.strip().lower())
    return out


def _run_solc(source_name: str, source: str) -> tuple[str, dict[str, Any]]:
    node = _node()
    solc_version()  # existence check with a clear message
    std_input = {
        "language": "Solidity",
        "sources": {source_name: {"content": source}},
        "settings": SETTINGS,
    }
    res = subprocess.run(
        [node, "-e", _NODE_SCRIPT, str(SOLC_DIR)],
        input=json.dumps(std_input),
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise DevnetToolError(f"solc-js failed for {source_name}: {res.stderr.strip()[-2000:]}")
    payload = json.loads(res.stdout)
    output = payload["output"]
    errors = [e for e in output.get("errors", []) if e.get("severity") == "error"]
    if errors:
        msgs = "\n".join(e.get("formattedMessage", e.get("message", "")) for e in errors)
        raise DevnetToolError(f"compilation of {source_name} failed:\n{msgs}")
    for warning in output.get("errors", []):
        log.warning("solc: %s", warning.get("formattedMessage", warning.get("message", "")).strip())
    return str(payload["version"]), output


def _is_fresh(artifact_path: Path, source_hash: str) -> bool:
    if not artifact_path.is_file():
        return False
    try:
        return json.loads(artifact_path.read_text()).get("sourceHash") == source_hash
    except (OSError, ValueError):
        return False


def compile_contracts(force: bool = False) -> dict[str, Path]:
    """Compile every contract source that changed; return {contract name: artifact path}."""
    version = solc_version()
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, Path] = {}
    for sol in sorted(CONTRACTS_DIR.glob("*.sol")):
        source = sol.read_text()
        source_hash = _source_hash(source, version)
        main_artifact = BUILD_DIR / f"{sol.stem}.json"
        if not force and _is_fresh(main_artifact, source_hash):
            log.debug("%s is up to date", main_artifact)
            artifacts[sol.stem] = main_artifact
            continue
        log.info("compiling %s with solc-js %s", sol.name, version)
        full_version, output = _run_solc(sol.name, source)
        for name, contract in output["contracts"][sol.name].items():
            abi = contract["abi"]
            events = [item for item in abi if item.get("type") == "event"]
            signatures = [
                f"{e['name']}({','.join(_canonical_type(i) for i in e['inputs'])})" for e in events
            ]
            topics = _keccak_many(signatures)
            artifact = {
                "contractName": name,
                "sourceName": sol.name,
                "sourceHash": source_hash,
                "compiler": {"name": "solc-js", "version": full_version, "settings": SETTINGS},
                "abi": abi,
                "bytecode": "0x" + contract["evm"]["bytecode"]["object"],
                "deployedBytecode": "0x" + contract["evm"]["deployedBytecode"]["object"],
                "methodIdentifiers": contract["evm"]["methodIdentifiers"],
                "eventTopics": dict(zip(signatures, topics, strict=True)),
            }
            path = BUILD_DIR / f"{name}.json"
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(artifact, indent=2, sort_keys=True) + "\n")
            tmp.replace(path)
            artifacts[name] = path
        if sol.stem not in artifacts:
            raise DevnetToolError(f"{sol.name} must define a contract named {sol.stem}")
    return artifacts


def load_artifact(name: str) -> dict[str, Any]:
    """Return the build json of contract ``name``, compiling first if it is missing or stale."""
    artifacts = compile_contracts()
    if name not in artifacts:
        raise DevnetToolError(f"no contract {name!r} in {CONTRACTS_DIR}")
    data: dict[str, Any] = json.loads(artifacts[name].read_text())
    return data


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="recompile even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        artifacts = compile_contracts(force=args.force)
    except DevnetToolError as exc:
        log.error("%s", exc)
        return 1
    for name, path in artifacts.items():
        log.info("%s -> %s", name, path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
