"""Start node processes by forking one process that has already imported torch.

Importing torch takes seconds of CPU, and the first optimizer a process builds imports
torch._dynamo, which takes about as long again. A mesh of six nodes that each start a fresh
interpreter spends most of its start-up importing the same code six times over, on as few as two
cores. The launcher instead starts one fork server, which does the imports once, and forks every
local node from it: a node starts with its imports done and only builds its own module.

Forking is safe because the server never starts a thread, a ZeroMQ context, a CUDA context or a
torch thread pool: it imports and forks. Each node sets its own thread count and opens its own
sockets after the fork.

The launcher talks to the server over its stdin and stdout, one JSON object per line:
  launcher -> server  {"argv": [...], "env": {...}, "log": PATH, "cwd": PATH, "append": BOOL}
  server -> launcher  {"pid": N}                  the node of the request, in request order
  server -> launcher  {"exited": N, "code": C}    a node ended (C as subprocess: -9 = SIGKILL)
The server exits when its stdin closes; nodes it started run on, as nodes started by hand do.
"""
from __future__ import annotations

import ctypes
import json
import os
import queue
import select
import subprocess
import sys
import threading
import traceback
from pathlib import Path

NODE_ENVIRONMENT = {
    # glibc keeps freed ~1 MB message buffers instead of returning their pages to the OS, so a
    # receiver does not page-fault on every message (benchmarks/transport.py: +20-25% at 1 MB).
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "268435456",
}
REAP_S = 0.05
"""How often the server looks for ended nodes: the launcher learns of an exit this late."""
MALLOC_MMAP_THRESHOLD, MALLOC_TRIM_THRESHOLD = -3, -1  # mallopt(3) parameters of glibc


def node_environment() -> dict[str, str]:
    """The environment of a node process, forked or executed: this one's, plus NODE_ENVIRONMENT
    and the data folder made absolute (a node may run in another folder)."""
    env = {**NODE_ENVIRONMENT, **os.environ, "PYTHONUNBUFFERED": "1"}
    if env.get("DNI_MESH_DATA"):
        env["DNI_MESH_DATA"] = str(Path(env["DNI_MESH_DATA"]).resolve())
    return env


class ForkServerFailed(RuntimeError):
    """The fork server died or could not start a node; the message quotes its output."""


class ForkedProcess:
    """A node forked by the server, with the part of `subprocess.Popen` the launcher uses."""

    def __init__(self, pid: int, server: ForkServer):
        self.pid = pid
        self.server = server
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self.server.wait_exit(self.pid, timeout)
        if code is None:
            raise subprocess.TimeoutExpired(f"node pid {self.pid}", timeout)
        self.returncode = code
        return code


class ForkServer:
    """The launcher's side: starts the server process at once (its imports overlap whatever the
    launcher does next) and forks nodes from it."""

    def __init__(self, env: dict[str, str] | None = None):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dni_mesh.forkserver"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, start_new_session=True)
        self.pids: queue.Queue[int | None] = queue.Queue()
        self.requesting = threading.Lock()  # a request and its pid reply, one caller at a time
        self.exits: dict[int, int] = {}
        self.exited = threading.Condition()
        self.errors: list[str] = []
        threading.Thread(target=self.read_replies, daemon=True).start()
        threading.Thread(target=self.read_errors, daemon=True).start()

    def read_replies(self) -> None:
        for line in self.process.stdout:
            reply = json.loads(line)
            if "pid" in reply:
                self.pids.put(reply["pid"])
            else:
                with self.exited:
                    self.exits[reply["exited"]] = reply["code"]
                    self.exited.notify_all()
        self.pids.put(None)  # the server is gone: a start waiting for a pid must not hang

    def read_errors(self) -> None:
        for line in self.process.stderr:
            self.errors.append(line.decode(errors="replace"))
            del self.errors[:-20]

    def start(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path,
              append: bool = False) -> ForkedProcess:
        """Fork a node running `dni-mesh ARGV`, its output to log (appended to, or replacing it).
        Safe from several threads: the server answers in request order, so each caller holds
        the lock from its request to its reply."""
        request = {"argv": argv, "env": env, "log": str(log), "cwd": str(cwd), "append": append}
        with self.requesting:
            try:
                self.process.stdin.write(json.dumps(request).encode() + b"\n")
                self.process.stdin.flush()
            except BrokenPipeError:
                pass  # the server is gone; the None below says so
            pid = self.pids.get()
            if pid is None:
                self.pids.put(None)  # for every later start: the server stays gone
        if pid is None:
            code = self.process.wait()
            raise ForkServerFailed(f"the fork server (pid {self.process.pid}) exited with code "
                                   f"{code} before it started {argv}; its output:\n"
                                   + "".join(self.errors))
        return ForkedProcess(pid, self)

    def exit_code(self, pid: int) -> int | None:
        with self.exited:
            return self.exits.get(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        with self.exited:
            self.exited.wait_for(lambda: pid in self.exits, timeout)
            return self.exits.get(pid)

    def close(self) -> None:
        """Stop the server (started nodes are the launcher's to stop, by pid)."""
        try:
            self.process.stdin.close()
        except BrokenPipeError:
            pass  # it is gone already
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def serve() -> None:
    """The server's loop: import once, then fork a node per request and report when each ends."""
    import torch
    torch.set_num_threads(1)  # no thread pool may exist at a fork; each node sets its own count
    import torch._dynamo  # noqa: F401  what the first optimizer of every node would import
    import dni_mesh.cli  # noqa: F401
    import dni_mesh.node  # noqa: F401
    replies = sys.stdout.buffer
    stdin, pending, children = sys.stdin.fileno(), b"", set()
    while True:
        readable, _, _ = select.select([stdin], [], [], REAP_S)
        if readable:
            data = os.read(stdin, 1 << 16)
            if not data:
                return
            pending += data
            *requests, pending = pending.split(b"\n")
            for request in requests:
                replies.flush()  # nothing buffered may be written twice, by parent and child
                pid = os.fork()
                if pid == 0:
                    run_child(json.loads(request))
                children.add(pid)
                replies.write(json.dumps({"pid": pid}).encode() + b"\n")
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                replies.write(json.dumps({"exited": pid, "code": code}).encode() + b"\n")
        replies.flush()


def run_child(request: dict) -> None:
    """In the forked node: become a process of its own (session, output, folder, environment),
    run `dni-mesh node ...` and exit with its code; never return into the server's loop."""
    code = 1
    try:
        os.setsid()  # as start_new_session: the launcher kills the node's group by its pid
        mode = os.O_APPEND if request["append"] else os.O_TRUNC
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | mode, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        tune_malloc(request["env"])
        from dni_mesh.cli import main
        code = main(request["argv"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def tune_malloc(env: dict[str, str]) -> None:
    """Apply the MALLOC_*_ settings of env, which glibc reads only when a process starts."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: the settings are glibc's
    for name, parameter in (("MALLOC_MMAP_THRESHOLD_", MALLOC_MMAP_THRESHOLD),
                            ("MALLOC_TRIM_THRESHOLD_", MALLOC_TRIM_THRESHOLD)):
        if name in env:
            libc.mallopt(parameter, int(env[name]))


if __name__ == "__main__":
    serve()
