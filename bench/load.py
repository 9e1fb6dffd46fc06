"""The load driver: closed-loop HTTP clients in a process of their own.

    python -m bench.load PLAN.json  ->  prints one JSON result line

Each client keeps one keep-alive connection and sends its next request as soon
as the last one answered. The clients join one by one over `ramp_seconds`
(a burst of connections at once tends to land on one gunicorn worker, whose
keep-alive connections then stay with it: one process, one GIL, while the
other idles); then `seconds` are measured. Over that window the driver reports
its own CPU time (so a run can tell whether the driver was the bottleneck),
the CPU time of the processes in `watch_pids` (the API workers) and the whole
machine's busy time. `requests` and the latencies are the window's answers;
`errors` are the window's non-201 answers and broken exchanges, `ramp_errors`
the ramp's.

On a 2-core machine the driver competes with the API for CPU, so it is kept
lean: one thread, non-blocking sockets under one selector, requests written as
bytes, responses parsed only as far as status and Content-Length. (Threads
with http.client cost ~0.4 ms of CPU per request, a fifth of what the API spent.)
"""

from __future__ import annotations

import json
import random
import resource
import selectors
import socket
import sys
import time
import uuid

from bench.processes import cpu_seconds, machine_busy_seconds

HEADER_END = b"\r\n\r\n"
RETRY_SECONDS = 0.01  # after a failed send
ANSWER_WAIT_SECONDS = 30  # past the deadline, an answer still out is an error


class Client:
    """One closed-loop connection: a request out, its answer in, the next one out."""

    def __init__(self, plan: dict, index: int) -> None:
        self.plan, self.index = plan, index
        self.rng = random.Random(index)
        self.api_key = plan["api_keys"][index % len(plan["api_keys"])]
        self.latencies: list[float] = []
        self.errors = self.ramp_errors = self.count = 0
        self.socket: socket.socket | None = None
        self.buffer = b""
        self.started = 0.0

    def connect(self) -> None:
        self.socket = socket.create_connection((self.plan["host"], self.plan["port"]), timeout=30)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket.setblocking(False)
        self.buffer = b""

    def _next_request(self) -> bytes:
        plan = self.plan
        replays = plan.get("replay_keys") or []
        if replays:
            key, body = replays[(self.index + self.count * len(plan["api_keys"])) % len(replays)]
        else:
            accounts, hot = plan["accounts"], plan.get("hot_account")
            source = hot or self.rng.choice(accounts)
            destination = self.rng.choice(accounts)
            while destination == source:
                destination = self.rng.choice(accounts)
            key = uuid.uuid4().hex
            body = {"from_account_id": source, "to_account_id": destination, "amount": 1}
        payload = json.dumps(body).encode()
        head = (f"POST /v1/transfers HTTP/1.1\r\nHost: {plan['host']}\r\n"
                f"Content-Type: application/json\r\nAuthorization: Bearer {self.api_key}\r\n"
                f"X-Idempotency-Key: {key}\r\nContent-Length: {len(payload)}\r\n\r\n")
        return head.encode() + payload

    def send(self) -> None:
        request = self._next_request()
        self.started = time.perf_counter()
        if self.socket is None:
            self.connect()
        self.socket.setblocking(True)  # a request is small: the kernel buffer takes it at once
        self.socket.sendall(request)
        self.socket.setblocking(False)

    def receive(self) -> bool:
        """Reads what arrived; True when a whole response is in (and recorded)."""
        chunk = self.socket.recv(65536)
        if not chunk:
            raise ConnectionError("the server closed the connection")
        self.buffer += chunk
        end = self.buffer.find(HEADER_END)
        if end < 0:
            return False
        head = self.buffer[:end].decode("latin-1")
        length = None
        for line in head.split("\r\n")[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)  # ValueError: a broken exchange
        if length is None:
            raise ValueError("a response without Content-Length")  # this driver reads no other kind
        if len(self.buffer) < end + 4 + length:
            return False
        self.buffer = self.buffer[end + 4 + length:]
        self.latencies.append(time.perf_counter() - self.started)
        self.errors += head[9:12] != "201"
        self.count += 1
        return True

    def fail(self) -> None:
        """A broken exchange counts as an error (not as an answered request);
        the client drops its connection (the next send makes a new one)."""
        self.errors += 1
        self.count += 1
        if self.socket is not None:
            self.socket.close()
        self.socket = None

    def start_window(self) -> None:
        self.latencies.clear()
        self.ramp_errors, self.errors = self.ramp_errors + self.errors, 0


class Window:
    """CPU use between two instants: the driver's, each watched process's and
    the whole machine's."""

    def __init__(self, watch_pids: list[int]) -> None:
        self.watch_pids = watch_pids
        self.started = time.perf_counter()
        self._driver = _own_cpu_seconds()
        self._watched = [cpu_seconds([pid]) for pid in watch_pids]
        self._machine = machine_busy_seconds()

    def close(self) -> dict:
        elapsed = time.perf_counter() - self.started
        watched = [cpu_seconds([pid]) - before
                   for pid, before in zip(self.watch_pids, self._watched, strict=True)]
        busy, total = (after - before
                       for after, before in zip(machine_busy_seconds(), self._machine, strict=True))
        return {"seconds": elapsed, "driver_cpu_seconds": _own_cpu_seconds() - self._driver,
                "watched_cpu_seconds": watched, "machine_busy_seconds": busy, "machine_total_seconds": total}


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def run(plan: dict) -> dict:
    clients = [Client(plan, index) for index in range(plan["clients"])]
    selector = selectors.DefaultSelector()
    ramp_seconds = plan.get("ramp_seconds", 0.0)
    started = time.perf_counter()
    measured_from = started + ramp_seconds
    deadline = measured_from + plan["seconds"]
    # Clients with no request out, and when each sends next: its turn to join,
    # or a retry after a failed send.
    due = {client: started + ramp_seconds * index / len(clients) for index, client in enumerate(clients)}
    waiting: set[Client] = set()  # a request out, its answer not yet in
    window: Window | None = None

    def drop(client: Client) -> None:
        """A broken exchange: an error, and the connection goes."""
        if client.socket is not None:
            selector.unregister(client.socket)
        client.fail()

    def send(client: Client) -> None:
        """A failed send is an error; the client retries on a new connection."""
        connected = client.socket is not None
        try:
            client.send()
        except OSError:
            drop(client) if connected else client.fail()
            due[client] = time.perf_counter() + RETRY_SECONDS
            return
        if not connected:
            selector.register(client.socket, selectors.EVENT_READ, client)
        waiting.add(client)

    while True:
        now = time.perf_counter()
        if window is None and now >= measured_from:
            # Measured from here: the ramp's answers and errors are reported apart.
            for client in clients:
                client.start_window()
            window = Window(plan.get("watch_pids", []))
        if now >= deadline + ANSWER_WAIT_SECONDS:  # answers that never come are errors
            for client in list(waiting):
                drop(client)
            break
        if now >= deadline and not waiting:
            break
        if now < deadline:
            for client in [client for client, at in due.items() if at <= now]:
                del due[client]
                send(client)
            wake_at = min([*due.values(), deadline, *([measured_from] if window is None else [])])
        else:
            wake_at = deadline + ANSWER_WAIT_SECONDS
        for key, _ in selector.select(timeout=max(wake_at - time.perf_counter(), 0.0)):
            client = key.data
            try:
                done = client.receive()
            except (OSError, ValueError):
                drop(client)
                done = True
            if done:
                waiting.discard(client)
                if time.perf_counter() < deadline:
                    send(client)
    used = window.close()
    latencies = sorted(latency for client in clients for latency in client.latencies)
    for client in clients:
        if client.socket is not None:
            client.socket.close()

    def percentile(fraction: float) -> float:
        if not latencies:
            return 0.0
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * fraction))] * 1000, 2)

    return {"requests": len(latencies), "errors": sum(client.errors for client in clients),
            "ramp_errors": sum(client.ramp_errors for client in clients),
            "per_second": round(len(latencies) / used["seconds"], 1),
            "p50_ms": percentile(0.50), "p99_ms": percentile(0.99), "max_ms": percentile(1.0),
            "driver_cpu_percent": round(100 * used["driver_cpu_seconds"] / used["seconds"], 1),
            "window": used}


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        print(json.dumps(run(json.load(file))))
