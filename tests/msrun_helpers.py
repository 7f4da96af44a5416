"""Launching scripts/msrun_launcher.sh from the tests: a free scheduler port, and no process left behind.

Ports: msrun's scheduler listens on the master port; each worker's own server takes a port from a fixed
range (256 ports from 8118 per node rank, whatever the master port) and steps over ports already in use.
So only the master port is chosen here: by binding port 0 (the kernel's ephemeral range), and a launch
whose scheduler still finds it taken (someone got it between that probe and the scheduler's bind) is
started again on a new port.

Cleanup: msrun starts every worker in a session of its own (setsid), so killing the launcher's process
group misses them, and workers outlive an msrun that is killed. Every launch therefore marks its processes
with an environment variable, and leaving the `with` block kills each process that carries the mark,
whether the test passed, failed or timed out.
"""
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
import uuid

from conftest import PROJECT_ROOT

LAUNCHER = PROJECT_ROOT / "scripts" / "msrun_launcher.sh"
HOST = "127.0.0.1"
MARK = "MINDPRETRAIN_TEST_LAUNCH"           # environment variable naming the launch a process belongs to
WORKER_PORTS = (8118, 256)                  # MindSpore's worker server ports: 8118 + 256 * node rank, 256 each
PORT_ATTEMPTS = 5
REGISTRATION_TIMEOUT = 300                  # msrun's cluster_time_out: a hang guard, not a performance bound


class LaunchFailed(AssertionError):
    """The job did not do what the test waited for; the message carries the launcher and worker logs."""


def free_master_port(workers):
    """A port nobody listens on now, outside the worker servers' ranges."""
    start, span = WORKER_PORTS
    for _ in range(20):
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if not start <= port < start + span * workers:
            return port
    raise RuntimeError(f"no free port outside {start}..{start + span * workers - 1}")


def marked_pids(mark):
    """Pids of this user's processes whose environment holds MARK=mark (Linux /proc)."""
    needle = f"{MARK}={mark}".encode()
    return [int(entry) for entry in os.listdir("/proc")
            if entry.isdigit() and needle in _proc_bytes(entry, "environ").split(b"\0")]


def listening_pids(port):
    """Pids of the processes holding a listening TCP socket on `port` (any address), from /proc."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table, encoding="ascii") as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:   # 0A: LISTEN
                inodes.add(fields[9])
    if not inodes:
        return set()
    return {int(pid) for pid in filter(str.isdigit, os.listdir("/proc")) if _socket_inodes(pid) & inodes}


def _socket_inodes(pid):
    """Inodes of the sockets process `pid` holds open (fds that close while being read are skipped)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return set()
    inodes = set()
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    return inodes


def _proc_bytes(pid, name):
    """/proc/<pid>/<name>, or nothing when the process is gone or another user's."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as handle:
            return handle.read()
    except OSError:
        return b""


def _environment(pid):
    return dict(item.split("=", 1) for item in _proc_bytes(pid, "environ").decode(errors="replace").split("\0")
                if "=" in item)


class MsrunJob:
    """One msrun launch of `command` (a script and its arguments) on `workers` local CPU workers, JOIN True.

    Use as a context manager; `wait()` or `wait_until(...)` inside it. Worker N logs to
    `log_dir/worker_N.log`, the launcher's own output is kept in `output`.
    """

    def __init__(self, command, workers, log_dir):
        self.command, self.workers, self.log_dir = command, workers, log_dir
        self.mark = uuid.uuid4().hex
        self.process = self.port = None
        self._output = tempfile.TemporaryFile()

    def __enter__(self):
        self._start()
        return self

    def __exit__(self, *exc_info):
        self.kill()
        self._output.close()

    def _start(self):
        self.port = free_master_port(self.workers)
        args = [self.command, str(self.workers), str(self.workers), HOST, str(self.port), "0", str(self.log_dir),
                "True", str(REGISTRATION_TIMEOUT)]
        self.process = subprocess.Popen(["bash", str(LAUNCHER), *args], cwd=PROJECT_ROOT,
                                        env=dict(os.environ, **{MARK: self.mark}), stdout=self._output,
                                        stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self):
        """SIGKILL the launcher's process group and every process of this launch, then reap the launcher."""
        if self.process is None:
            return
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for _ in range(10):
            pids = marked_pids(self.mark)
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)
        self.process.wait()

    def _port_taken(self):
        """Another process listens on the scheduler's port (it got it between the probe and the scheduler's
        bind). Read from the kernel's socket table, not from a log line, so MindSpore's log level cannot hide it."""
        owners = listening_pids(self.port)
        return bool(owners) and not owners & set(marked_pids(self.mark))

    def wait_until(self, condition, timeout, what):
        """Poll until `condition()` holds; restart on a new port if the scheduler's was taken.

        Raises LaunchFailed (with the logs) when the job ends first or `timeout` seconds pass.
        """
        deadline = time.monotonic() + timeout
        for _ in range(PORT_ATTEMPTS):
            while time.monotonic() < deadline:
                if self._port_taken():
                    break
                if condition():
                    return
                if self.process.poll() is not None:
                    raise LaunchFailed(f"msrun exited ({self.process.returncode}) before {what}:\n{self.report()}")
                time.sleep(0.5)
            else:
                raise LaunchFailed(f"no {what} within {timeout} s:\n{self.report()}")
            self.kill()
            self._start()
        raise LaunchFailed(f"the scheduler port was taken {PORT_ATTEMPTS} times:\n{self.report()}")

    def wait(self, timeout):
        """The launcher's exit code, once it has exited (restarting it if its scheduler port was taken)."""
        self.wait_until(lambda: self.process.poll() is not None, timeout, "msrun's exit")
        return self.process.returncode

    def worker_pid(self, rank):
        """The pid of the worker process of `rank` (the one running the script, not a helper it spawned), or None."""
        script = self.command.split()[0]
        for pid in marked_pids(self.mark):
            environment = _environment(pid)
            if (environment.get("MS_ROLE") == "MS_WORKER" and environment.get("RANK_ID") == str(rank)
                    and script in _proc_bytes(pid, "cmdline").decode(errors="replace")):
                return pid
        return None

    @property
    def output(self):
        self._output.seek(0)
        return self._output.read().decode(errors="replace")

    def logs(self):
        """The workers' logs, rank by rank."""
        return "".join(path.read_text(errors="replace") for path in
                       (self.log_dir / f"worker_{rank}.log" for rank in range(self.workers)) if path.exists())

    def report(self):
        return f"{self.output[-3000:]}\n{self.logs()[-4000:]}"


# --- what a worker log may hold ---------------------------------------------------------------------------------

OWN_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) mindpretrain(\.\w+)*: ")
ERROR_LINE_PREFIX = "run_mindformer.py: error: "


def sort_log_lines(text):
    """(error lines, foreign lines) of a run's stderr or worker log: the `run_mindformer.py: error:` lines, and
    every line that is neither one of them nor a line of the `mindpretrain` logger (its format:
    mindpretrain/utils/logging.py), e.g. a traceback or MindSpore's own [WARNING]/[INFO] lines."""
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(ERROR_LINE_PREFIX)]
    foreign = [line for line in lines if not line.startswith(ERROR_LINE_PREFIX) and not OWN_LOG_LINE.match(line)]
    return errors, foreign


def worker_log(job, rank):
    """Worker `rank`'s log of an MsrunJob ('' when it has not been written)."""
    path = job.log_dir / f"worker_{rank}.log"
    return path.read_text(errors="replace") if path.exists() else ""
