"""The kv739 library in forked Python processes (os.fork), loaded through ctypes.

Usage: python3 fork.py workers|inherit LIBRARY RUN_TAG HOST:PORT...
Exits 0 and prints "pyfork: all checks passed" when every check holds.

workers: the parent calls kv739_init and kv739_shutdown, then forks 10 workers; each calls
  kv739_init with one server and puts 200 keys of its own. The parent then reads every key
  back: no put may fail, and every acknowledged one must be stored.
inherit: the parent's session is open, and a parent thread is writing through it, when it
  forks; each child uses the inherited session (it must work, on a fresh session of the
  child's own), then calls kv739_shutdown and kv739_init itself and works again.

Every call is timed against KV739_TIMEOUT_MS (KV739_INIT_TIMEOUT_MS for init) plus a slack,
and every process arms signal.alarm so that a hang kills it instead of leaving it behind.
"""

import ctypes
import os
import signal
import sys

from kv739 import load
import threading
import time
import warnings

MAX_VALUE_SIZE = 2048
WORKERS = 10
KEYS = 200
CHILD_KEYS = 20
SLACK_MS = 3000
ALARM_S = 180
CHILD_ALARM_S = 120

# Python 3.12 warns about fork in a process with threads (the library's runtime has some);
# what this script checks is that the library copes with exactly that.
warnings.simplefilter("ignore", DeprecationWarning)


def env_ms(name, default):
    try:
        ms = int(os.environ.get(name, ""))
    except ValueError:
        return default
    return ms if ms > 0 else default


CALL_BOUND_MS = env_ms("KV739_TIMEOUT_MS", 10000) + SLACK_MS
INIT_BOUND_MS = env_ms("KV739_INIT_TIMEOUT_MS", 5000) + SLACK_MS


class Checker:
    def __init__(self):
        self.failures = []
        self.lock = threading.Lock()

    def fail(self, message):
        with self.lock:
            self.failures.append(f"[pid {os.getpid()}] {message}")

    def check(self, what, got, want):
        if got != want:
            self.fail(f"{what}: got {got!r}, expected {want!r}")

    def timed(self, what, bound_ms, call, *args):
        started = time.monotonic()
        rc = call(*args)
        took_ms = (time.monotonic() - started) * 1000
        if took_ms > bound_ms:
            self.fail(f"{what} took {took_ms:.0f} ms (bound {bound_ms} ms)")
        return rc

    def report(self):
        for failure in self.failures:
            print(failure, file=sys.stderr)
        sys.stderr.flush()


def server_list(servers):
    encoded = [s.encode() for s in servers]
    return (ctypes.c_char_p * (len(encoded) + 1))(*encoded, None)


class Run:
    def __init__(self, lib, tag, servers):
        self.lib, self.tag, self.servers = lib, tag, servers
        self.c = Checker()

    def key(self, who, n, k):
        return f"{self.tag}-py{who}{n}-key{k}".encode()

    def value(self, who, n, k):
        return f"value of py {who} {n} key {k} in {self.tag}".encode()

    def init(self, servers):
        return self.c.timed("init", INIT_BOUND_MS, self.lib.kv739_init, server_list(servers))

    def shutdown(self):
        return self.c.timed("shutdown", SLACK_MS, self.lib.kv739_shutdown)

    def put(self, key, value, buf):
        return self.c.timed(f"put {key!r}", CALL_BOUND_MS, self.lib.kv739_put, key, value, buf)

    def get(self, key, buf):
        return self.c.timed(f"get {key!r}", CALL_BOUND_MS, self.lib.kv739_get, key, buf)

    def puts(self, who, n, keys):
        buf = ctypes.create_string_buffer(MAX_VALUE_SIZE + 1)
        failed = 0
        for k in keys:
            rc = self.put(self.key(who, n, k), self.value(who, n, k), buf)
            failed += rc == -1
            self.c.check(f"put {who} {n} key {k}", rc, 1)
        return failed

    def read_back(self, who, n, count):
        buf = ctypes.create_string_buffer(MAX_VALUE_SIZE + 1)
        for k in range(count):
            self.c.check(f"get {who} {n} key {k}", self.get(self.key(who, n, k), buf), 0)
            self.c.check(f"value of {who} {n} key {k}", buf.value, self.value(who, n, k))

    def fork(self, body, n):
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            signal.alarm(CHILD_ALARM_S)
            # A checker of the child's own: the parent's failures are not the child's, and
            # its lock may have been held by a parent thread at the fork.
            self.c = Checker()
            code = 100
            try:
                body(n)
                self.c.report()
                code = min(len(self.c.failures), 100)
            finally:
                sys.stdout.flush()
                os._exit(code)
        return pid

    def reap(self, pids, what):
        for n, pid in enumerate(pids):
            _, status = os.waitpid(pid, 0)
            if not os.WIFEXITED(status) or os.WEXITSTATUS(status) != 0:
                self.c.fail(f"{what} {n} (pid {pid}) ended with status {status:#x}")

    # -- workers

    def worker(self, w):
        self.c.check("worker init", self.init([self.servers[w % len(self.servers)]]), 0)
        failed = self.puts("worker", w, range(KEYS))
        self.c.check("worker shutdown", self.shutdown(), 0)
        print(f"py worker {w}: {KEYS - failed} puts acknowledged, {failed} returned -1")

    def workers(self):
        buf = ctypes.create_string_buffer(MAX_VALUE_SIZE + 1)
        parent_key = f"{self.tag}-pyparent".encode()
        self.c.check("init", self.init(self.servers), 0)
        self.c.check("parent put", self.put(parent_key, b"before the fork", buf), 1)
        self.c.check("shutdown", self.shutdown(), 0)
        pids = [self.fork(self.worker, w) for w in range(WORKERS)]
        self.reap(pids, "worker")
        self.c.check("re-init", self.init(self.servers), 0)
        for w in range(WORKERS):
            self.read_back("worker", w, KEYS)
        self.c.check("parent get", self.get(parent_key, buf), 0)
        self.c.check("parent value", buf.value, b"before the fork")
        self.c.check("final shutdown", self.shutdown(), 0)

    # -- inherit

    def inheritor(self, n):
        buf = ctypes.create_string_buffer(MAX_VALUE_SIZE + 1)
        half = CHILD_KEYS // 2
        self.puts("child", n, range(half))
        self.c.check("parent key in child", self.get(f"{self.tag}-pyparent".encode(), buf), 0)
        self.c.check("parent value in child", buf.value, b"before the fork")
        self.read_back("child", n, half)
        self.c.check("child shutdown", self.shutdown(), 0)
        self.c.check("get after shutdown", self.lib.kv739_get(b"k", buf), -1)
        self.c.check("child init", self.init(self.servers), 0)
        self.puts("child", n, range(half, CHILD_KEYS))
        self.read_back("child", n, CHILD_KEYS)
        self.c.check("child final shutdown", self.shutdown(), 0)

    def inherit(self):
        buf = ctypes.create_string_buffer(MAX_VALUE_SIZE + 1)
        self.c.check("init", self.init(self.servers), 0)
        self.c.check("parent put", self.put(f"{self.tag}-pyparent".encode(), b"before the fork", buf), 1)
        stop = threading.Event()
        busy = [0]

        def writer():
            out = ctypes.create_string_buffer(MAX_VALUE_SIZE + 1)
            key = f"{self.tag}-pyparent-busy".encode()
            while not stop.is_set():
                rc = self.put(key, f"busy {busy[0]}".encode(), out)
                self.c.check("busy put", rc in (0, 1), True)
                busy[0] += 1

        thread = threading.Thread(target=writer)
        thread.start()
        pids = []
        for n in range(WORKERS):
            before, started = busy[0], time.monotonic()
            while busy[0] == before and time.monotonic() - started < 0.2:
                time.sleep(0.001)
            pids.append(self.fork(self.inheritor, n))
        self.puts("parent", 0, range(CHILD_KEYS))
        self.reap(pids, "child")
        stop.set()
        thread.join(timeout=CALL_BOUND_MS / 1000 + 5)
        self.c.check("busy writer stopped", thread.is_alive(), False)
        self.c.check("busy writer wrote", busy[0] > 0, True)
        self.read_back("parent", 0, CHILD_KEYS)
        for n in range(WORKERS):
            self.read_back("child", n, CHILD_KEYS)
        self.c.check("final shutdown", self.shutdown(), 0)


def main(argv):
    if len(argv) < 5 or argv[1] not in ("workers", "inherit"):
        print(__doc__, file=sys.stderr)
        return 2
    signal.alarm(ALARM_S)
    run = Run(load(argv[2]), argv[3], argv[4:])
    getattr(run, argv[1])()
    run.c.report()
    failures = len(run.c.failures)
    print("pyfork: all checks passed" if not failures else f"pyfork: {failures} checks failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
