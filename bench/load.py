"""The load driver: closed-loop HTTP clients in a process of their own.

    python -m bench.load PLAN.json  ->  prints one JSON result line

Each client thread keeps one keep-alive connection and sends its next request
as soon as the last one answered, for `seconds`. The driver reports its own
CPU time, so a run can tell whether the driver was the bottleneck.
"""

from __future__ import annotations

import http.client
import json
import random
import resource
import sys
import threading
import time
import uuid


def client_loop(plan: dict, index: int, results: list, deadline: float) -> None:
    rng = random.Random(index)
    connection = http.client.HTTPConnection(plan["host"], plan["port"], timeout=30)
    api_key = plan["api_keys"][index % len(plan["api_keys"])]
    accounts, hot = plan["accounts"], plan.get("hot_account")
    replays = plan.get("replay_keys") or []
    latencies, errors, count = [], 0, 0
    while time.perf_counter() < deadline:
        if replays:
            key, body = replays[(index + count * len(plan["api_keys"])) % len(replays)]
        else:
            source = hot or rng.choice(accounts)
            destination = rng.choice(accounts)
            while destination == source:
                destination = rng.choice(accounts)
            key = uuid.uuid4().hex
            body = {"from_account_id": source, "to_account_id": destination, "amount": 1}
        payload = json.dumps(body)
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}",
                   "X-Idempotency-Key": key}
        started = time.perf_counter()
        try:
            connection.request("POST", "/v1/transfers", body=payload, headers=headers)
            response = connection.getresponse()
            response.read()
            ok = response.status == 201
        except (OSError, http.client.HTTPException):
            connection.close()
            ok = False
        latencies.append(time.perf_counter() - started)
        errors += not ok
        count += 1
    connection.close()
    results.append((latencies, errors))


def run(plan: dict) -> dict:
    results: list = []
    cpu_before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    deadline = started + plan["seconds"]
    threads = [threading.Thread(target=client_loop, args=(plan, index, results, deadline))
               for index in range(plan["clients"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    cpu_after = resource.getrusage(resource.RUSAGE_SELF)
    latencies = sorted(latency for chunk, _ in results for latency in chunk)
    errors = sum(count for _, count in results)

    def percentile(fraction: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(len(latencies) * fraction))] * 1000, 2)

    cpu_seconds = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"requests": len(latencies), "errors": errors,
            "per_second": round(len(latencies) / elapsed, 1),
            "p50_ms": percentile(0.50), "p99_ms": percentile(0.99), "max_ms": percentile(1.0),
            "driver_cpu_percent": round(100 * cpu_seconds / elapsed, 1)}


if __name__ == "__main__":
    with open(sys.argv[1]) as file:
        print(json.dumps(run(json.load(file))))
