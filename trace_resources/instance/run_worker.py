"""The warm run-worker pool behind `WarmRunLauncher` (trace_resources/instance/run_launcher.py).

Dagster's default launcher starts every run as a fresh Python process (`spawn` in the code
server), which re-imports dagster, polars, pyarrow, duckdb, boto3, SQLAlchemy and the code
location before the first step: 4 s on a quiet 2-core machine, 7-11 s under load. This server
imports the heavy third-party modules once and forks one child per run. The child runs exactly
`dagster api execute_run` (Dagster's own run-worker entry point, the one the Docker and K8s
launchers run), so the run, its events, its cancellation and its failure handling are Dagster's;
only the interpreter start and the imports are shared. The launcher replaces the server when
the preloaded project code changes on disk, so an edited asset takes effect on the next run.

Protocol (Unix socket, one connection per run): the launcher sends the serialized
`ExecuteRunArgs` and a newline; the server forks and answers the child's pid and a newline.

The server is single-threaded and never runs user code itself, so forking it is safe. A run
lives no longer than the server: each child gets SIGTERM when the server exits, however it
exits (`PR_SET_PDEATHSIG`), and Dagster's run worker turns it into a cancellation of the run.
The server exits when its stdin closes (the launcher's process ended, was killed or disposed of
it: `make dev` stopping), which stops its runs; on `retire` read from stdin (the launcher
replaces a pool whose code changed) it takes no more runs and exits once its runs have ended,
so runs under way finish on the code they started with.
"""

from __future__ import annotations

import argparse
import importlib
import os
import selectors
import signal
import socket
import sys
import threading

from trace_resources import taps
from trace_resources.processes import die_with_parent, watch_parent

STOP_GRACE_S = 5.0  # a run still going this long after its SIGTERM is killed


def _run_child(serialized_args: str) -> int:
    """In the forked child: Dagster's `dagster api execute_run` on these args."""
    from dagster._cli.api import execute_run_command

    command = execute_run_command.callback
    assert command is not None
    try:
        command(input_json=serialized_args, compressed_input_json=None)
    except SystemExit as exc:  # the command exits non-zero when the run worker failed
        return int(exc.code or 0) if isinstance(exc.code, int) else 1
    return 0


def _fork_run(
    serialized_args: str, listener: socket.socket, conn: socket.socket, alive: tuple[int, int]
) -> int:
    server = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    # child: drop the server's descriptors and signal dispositions, then run
    code = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # the server gone (killed too): SIGTERM, which Dagster turns into a cancellation, and
        # SIGKILL if the run is still going STOP_GRACE_S later (EOF on `alive`: only the
        # server holds its write end)
        die_with_parent(signal.SIGTERM, server)
        os.close(alive[1])
        watch_parent(alive[0], STOP_GRACE_S, term=False)
        listener.close()
        conn.close()
        os.close(0)
        os.open(os.devnull, os.O_RDONLY)  # fd 0 again, so nothing reads the launcher's pipe
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        code = _run_child(serialized_args)
    except BaseException:  # noqa: BLE001 - a child must never return into the server loop
        import traceback

        traceback.print_exc()
    finally:
        # os._exit skips atexit: the run's wire taps send what they hold first (up to 5 s)
        taps.reset()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _read_request(conn: socket.socket) -> str:
    chunks: list[bytes] = []
    while True:
        chunk = conn.recv(1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break
    return b"".join(chunks).decode().strip()


def serve(socket_path: str, preload: list[str]) -> None:
    for name in preload:
        importlib.import_module(name)
    if threading.active_count() != 1:
        # forking a process with threads can copy a held lock into the child
        raise SystemExit(
            f"run worker: preloading {preload} started threads "
            f"({[t.name for t in threading.enumerate()]}); remove the module that starts them "
            "from preload_modules"
        )
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal goes to the launcher

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    listener.bind(socket_path)
    listener.listen(16)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "listener")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    runs: dict[int, int] = {}  # pidfd -> pid of each run under way
    alive = os.pipe()  # its runs see EOF when this process is gone
    retiring = False
    sys.stderr.write(f"run worker ready (pid {os.getpid()}, {len(preload)} modules preloaded)\n")
    try:
        while not (retiring and not runs):
            for key, _ in sel.select():
                if key.data == "stdin":
                    data = os.read(0, 4096)
                    if not data:  # launcher gone or done with us: stop now, runs with us
                        return
                    if b"retire" in data and not retiring:  # replaced: finish the runs
                        retiring = True
                        sel.unregister(listener)
                        listener.close()
                        os.unlink(socket_path)
                elif key.data == "run":  # a run ended
                    sel.unregister(key.fd)
                    os.close(key.fd)
                    runs.pop(key.fd, None)
                elif not retiring:
                    conn, _ = listener.accept()
                    with conn:
                        request = _read_request(conn)
                        if not request:
                            continue
                        pid = _fork_run(request, listener, conn, alive)
                        conn.sendall(f"{pid}\n".encode())
                    try:
                        pidfd = os.pidfd_open(pid)
                    except ProcessLookupError:  # ended already
                        continue
                    runs[pidfd] = pid
                    sel.register(pidfd, selectors.EVENT_READ, "run")
    finally:
        if not retiring:
            listener.close()
            if os.path.exists(socket_path):
                os.unlink(socket_path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="Unix socket path to listen on")
    parser.add_argument("--preload", nargs="*", default=[], help="modules imported once")
    args = parser.parse_args()
    serve(args.socket, args.preload)


if __name__ == "__main__":
    main()
