"""Watching must not slow training: the demo's steps per second with and without someone watching.

One process trains the demo (``onthefly demo``'s model and data, ``Trainer`` as ``quickstart``
builds it, validation every epoch) on a background thread for the whole benchmark, with the
dashboard attached (its server in a process of its own, as a user has it). The main thread only
sleeps and reads ``run.global_step`` at the edges of timed windows, under three conditions:

* ``none``: the server is up, nobody watches;
* ``page``: the real dashboard page open in headless Chromium (driven by Playwright), as a user has
  it: it loads, connects its WebSocket and polls what it polls. The window starts once the page
  is connected; the browser is closed after it;
* ``poll``: one scripted client, in a process of its own, calling every endpoint the page uses
  (cycled, one after the other) at 2 requests a second in total, timing each answer.

Rounds alternate the order (none page poll, poll page none, ...), so a machine whose speed drifts
weighs on every condition alike; each round's ratio compares its own windows. Printed: steps per
second per window, each round's ratios and their median against the targets (page >= 0.97x, poll
>= 0.95x), the polling client's p50/p95 latency per endpoint, the page's own requests (read from
its Resource Timing entries), and where the CPU went in each condition: the training thread and
the rest of the training process per step, the server process, the watcher's processes and the
rest of the machine (other work on a shared machine, the noise in these figures). Beside each
ratio: the training thread's CPU time a step with no watcher over with one, which tells a step
made dearer (work added to the training process, caches) from a step that waited for a core.
Linux only (CPU times from /proc).

    .venv/bin/python benchmarks/watching.py [--rounds 6] [--seconds 10] [--threads N] [--quick]

Needs the built dashboard (``bash scripts/setup.sh``) and Chromium at /usr/bin/chromium
(``apt-get install -y chromium``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
PAGE_TARGET = 0.97
POLL_TARGET = 0.95
POLL_RATE = 2.0  # requests a second, all endpoints together
CHART_METRICS = ("train_loss", "val_loss,val_accuracy", "lr", "throughput")  # main.ts: the 4 charts
CONDITIONS = ("none", "page", "poll")
CONNECT_TIMEOUT = 60.0  # seconds for the page to load and connect its WebSocket
SETTLE = 1.0  # seconds after a watcher is set up (or gone) before a window starts
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- CPU accounting (Linux /proc) -------------------------------------------------------------
def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a live process has used; 0 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (the browser under Playwright's driver, the client)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children[ppid].append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def machine_cpu() -> tuple[float, float]:
    """(busy, stolen): CPU seconds the whole machine has run anyone's work, and seconds the
    hypervisor gave its CPUs to other machines."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(values[:7]) - values[3] - values[4]  # user..softirq without idle, iowait (guest is in user)
    return busy / CLK_TCK, values[7] / CLK_TCK


class CpuSnapshot:
    """The CPU counters a window is measured between (read from the main thread)."""

    def __init__(self, training_thread: int, server_pid: int) -> None:
        self.wall = time.perf_counter()
        self.process = time.process_time()  # every thread of this process
        self.thread = time.clock_gettime(time.pthread_getcpuclockid(training_thread))
        self.server = process_cpu(server_pid)
        self.watchers = {pid: process_cpu(pid) for pid in descendants(os.getpid()) if pid != server_pid}
        self.machine, self.stolen = machine_cpu()


# ---- the training, on a background thread ----------------------------------------------------
class Training:
    """The demo training with its dashboard attached, run by ``Trainer.fit`` on a thread of its
    own until :meth:`stop`. The main thread reads ``run.global_step`` (an int: a plain read)."""

    def __init__(self, samples: int) -> None:
        import torch
        from torch import nn

        from onthefly import Trainer
        from onthefly.demo import demo_data
        from onthefly.launch import attach_dashboard

        torch.manual_seed(0)
        train, val, _ = demo_data(samples, 0)
        model = nn.Sequential(nn.Linear(28 * 28, 64), nn.ReLU(), nn.Linear(64, 2))  # the demo's
        self.trainer = Trainer(model=model, optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
                               loss_fn=nn.CrossEntropyLoss(), train_loader=train, val_loader=val,
                               project="bench-watching", run_name="baseline", progress=False)
        self.run = self.trainer.run
        self.steps_per_epoch = len(train)
        self.server = attach_dashboard(self.run)  # the server process: up in every condition
        self.torch_threads: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._train, name="training", daemon=True)
        self.thread.start()
        assert self.thread.ident is not None
        self.thread_id: int = self.thread.ident  # its CPU clock is read from the main thread

    def _train(self) -> None:
        import torch

        self.torch_threads = torch.get_num_threads()  # as the training thread sees it
        try:
            self.trainer.fit(10**6)
        except BaseException as exc:
            self.error = exc

    @property
    def step(self) -> int:
        if self.error is not None:
            raise RuntimeError(f"training failed: {self.error!r}") from self.error
        return self.run.global_step

    def stop(self) -> None:
        if self.thread.is_alive():
            self.run.request("stop")
            self.thread.join(60)
        self.server.stop()


# ---- watchers ----------------------------------------------------------------------------------
def endpoint_of(url: str) -> str:
    """A request's endpoint, ids replaced by placeholders (the page's requests, grouped)."""
    path = url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
    path = re.sub(r"^api/runs/\d+", "api/runs/{id}", path)
    path = re.sub(r"/samples/\d+/history$", "/samples/{i}/history", path)
    path = re.sub(r"^api/clusterings/\d+", "api/clusterings/{id}", path)
    name = "/" + path
    if name.endswith("/metrics"):
        match = re.search(r"[?&]names=([^&]*)", url)
        name += f" {match.group(1).replace('%2C', ',')}" if match else ""
    return name


class PageWatcher:
    """The dashboard page in headless Chromium, open from :meth:`open` to :meth:`close`. The
    browser is started for each window and closed after it (the driver stays, idle)."""

    def __init__(self, url: str, server: Any) -> None:
        from playwright.sync_api import sync_playwright

        self.url, self.server = url, server
        self.playwright = sync_playwright().start()
        self.browser: Any = None
        self.page: Any = None
        self.launch_seconds = 0.0  # the browser's start
        self.load_seconds = 0.0  # the page's load, until its WebSocket is connected
        self._first_entry = 0

    def open(self) -> None:
        started = time.perf_counter()
        self.browser = self.playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        self.launch_seconds = time.perf_counter() - started
        context = self.browser.new_context(viewport={"width": 1400, "height": 1000})
        # Every request the page makes stays in its Resource Timing buffer (250 by default).
        context.add_init_script("performance.setResourceTimingBufferSize(1000000)")
        self.page = context.new_page()
        started = time.perf_counter()
        self.page.goto(self.url, wait_until="load")
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while not self.server.attached:  # the server reports its WebSocket clients to us
            if time.monotonic() > deadline:
                raise RuntimeError("the dashboard page did not connect its WebSocket in time")
            time.sleep(0.05)
        self.load_seconds = time.perf_counter() - started

    def mark(self) -> None:
        """The window starts: requests from here on are the window's."""
        self._first_entry = self.page.evaluate("performance.getEntriesByType('resource').length")

    def requests(self) -> list[tuple[str, float]]:
        """(endpoint, seconds) of each API request the page made since :meth:`mark`."""
        entries = self.page.evaluate(
            "(first) => performance.getEntriesByType('resource').slice(first)"
            ".map(e => [e.name, (e.responseEnd - e.startTime) / 1000])", self._first_entry)
        return [(endpoint_of(name), seconds) for name, seconds in entries if "/api/" in name]

    def close(self) -> None:
        if self.browser is not None:
            self.browser.close()
            self.browser = None

    def stop(self) -> None:
        self.close()
        self.playwright.stop()


class PollingClient:
    """The scripted client: this file run with ``--poll-client`` in a process of its own (its
    HTTP work must not share the training process's GIL). Told the URL and token on its stdin,
    it says "ready", polls from "go" until its stdin ends, then prints its timings."""

    def __init__(self, base: str, token: str, rate: float) -> None:
        self.process = subprocess.Popen([sys.executable, __file__, "--poll-client"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps({"base": base, "token": token, "rate": rate}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"the polling client did not start: {line!r}")

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def finish(self) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.close()
        result: dict[str, Any] = json.loads(self.process.stdout.read())
        self.process.wait(30)
        return result


class PageEndpoints:
    """Every endpoint the page calls, with its parameters (dashboard/src/app.ts, main.ts,
    distribution.ts, samples.ts, history.ts, clusters.ts, slices.ts), in turn. The event log is
    read as a poller would: after the last event it has, with the page's page size; a sample's
    history is asked for the rows the last table page showed, one after the other."""

    def __init__(self, run_id: int) -> None:
        self.run = f"/api/runs/{run_id}"
        self.last_seq = 0
        self.rows = [0]
        self.row = 0
        self.turn = 0
        self.names = ["/api/session", "/api/runs/{id}",
                      *(f"/api/runs/{{id}}/metrics {names}" for names in CHART_METRICS),
                      "/api/events", "/api/runs/{id}/distribution", "/api/runs/{id}/samples",
                      "/api/runs/{id}/samples/{i}/history", "/api/runs/{id}/clusters", "/api/slices"]

    def next(self) -> tuple[str, str, dict[str, Any]]:
        """(endpoint, path, query parameters) of the next request."""
        name = self.names[self.turn % len(self.names)]
        self.turn += 1
        run = self.run
        if name.startswith("/api/runs/{id}/metrics "):
            return name, f"{run}/metrics", {"names": name.split(" ", 1)[1], "points": 2000}  # CHART_POINTS
        if name == "/api/events":
            return name, "/api/events", {"after_seq": self.last_seq, "limit": 10_000}
        if name == "/api/runs/{id}/distribution":
            return name, f"{run}/distribution", {"bins": 50}
        if name == "/api/runs/{id}/samples":  # the table as it opens: worst losses first, 50 rows
            return name, f"{run}/samples", {"sort": "loss", "order": "desc", "limit": 50, "offset": 0}
        if name == "/api/runs/{id}/samples/{i}/history":
            self.row += 1
            return name, f"{run}/samples/{self.rows[self.row % len(self.rows)]}/history", {}
        return name, name.replace("/api/runs/{id}", run), {}

    def saw(self, name: str, answer: Any) -> None:
        if name == "/api/events":
            self.last_seq = max(int(answer.get("last_seq") or 0), self.last_seq)
        elif name == "/api/runs/{id}/samples":
            self.rows = [row["index"] for row in answer.get("rows", [])] or self.rows


def poll_client() -> None:
    """The polling client's process: the page's endpoints in turn, one request at a time, at
    ``rate`` requests a second (a late answer delays the next request; no burst to catch up)."""
    import httpx

    config = json.loads(sys.stdin.readline())
    client = httpx.Client(base_url=config["base"], timeout=60,
                          headers={"Authorization": f"Bearer {config['token']}"})
    endpoints = PageEndpoints(client.get("/api/session").json()["runs"][-1]["id"])
    go, done = threading.Event(), threading.Event()

    def read_stdin() -> None:
        if sys.stdin.readline().strip() == "go":
            go.set()
        sys.stdin.read()  # end of file: stop
        done.set()
        go.set()

    threading.Thread(target=read_stdin, daemon=True).start()
    print("ready", flush=True)
    go.wait()
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    started = time.perf_counter()
    next_at = started
    while not done.is_set():
        wait = next_at - time.perf_counter()
        if wait > 0 and done.wait(wait):
            break
        next_at = max(next_at + 1 / config["rate"], time.perf_counter())
        name, path, params = endpoints.next()
        sent = time.perf_counter()
        try:
            response = client.get(path, params=params)
            answer = response.json()
        except (httpx.HTTPError, ValueError):
            errors[name] += 1
            continue
        latencies[name].append(time.perf_counter() - sent)
        if response.status_code == 200:
            endpoints.saw(name, answer)
        else:
            errors[name] += 1
    print(json.dumps({"seconds": time.perf_counter() - started, "latencies": latencies, "errors": errors}),
          flush=True)


# ---- the benchmark -------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def order_of(round_index: int) -> tuple[str, ...]:
    return CONDITIONS if round_index % 2 == 0 else tuple(reversed(CONDITIONS))


def measure_window(training: Training, seconds: float, condition: str, page: PageWatcher,
                   base: str) -> dict[str, Any]:
    """One timed window under ``condition``: the watcher set up first, taken down after."""
    client: PollingClient | None = None
    window: dict[str, Any] = {"condition": condition}
    if condition == "page":
        page.open()
        window["launch_seconds"], window["load_seconds"] = page.launch_seconds, page.load_seconds
    elif condition == "poll":
        client = PollingClient(base, training.server.token, POLL_RATE)
    time.sleep(SETTLE)
    if condition == "page":
        page.mark()
    if client is not None:
        client.go()
    step0 = training.step
    start = CpuSnapshot(training.thread_id, training.server.pid)
    time.sleep(seconds)
    step1 = training.step
    end = CpuSnapshot(training.thread_id, training.server.pid)
    wall, steps = end.wall - start.wall, step1 - step0
    watchers = sum(cpu - start.watchers.get(pid, 0.0) for pid, cpu in end.watchers.items())
    ours = (end.process - start.process) + (end.server - start.server) + watchers
    window.update(
        steps=steps, wall=wall, rate=steps / wall,
        thread_ms=1000 * (end.thread - start.thread) / max(steps, 1),
        process_ms=1000 * (end.process - start.process) / max(steps, 1),
        others_in_process=((end.process - start.process) - (end.thread - start.thread)) / wall,
        server=(end.server - start.server) / wall, watchers=watchers / wall,
        rest_of_machine=max(0.0, (end.machine - start.machine) - ours) / wall,
        stolen=(end.stolen - start.stolen) / wall,
    )
    if condition == "page":
        window["requests"] = page.requests()
        page.close()
    if client is not None:
        window["client"] = client.finish()
    time.sleep(SETTLE)  # the watcher's teardown stays out of the next window
    return window


def ratio_in(measured: list[dict[str, Any]], condition: str, key: str) -> float:
    """``key`` under ``condition`` over ``key`` with no watcher, in one round."""
    by = {w["condition"]: w[key] for w in measured}
    return float(by[condition] / by["none"])


WINDOW_FIGURES = ("rate", "thread_ms", "process_ms", "others_in_process", "server", "watchers",
                  "rest_of_machine", "stolen")


def describe(window: dict[str, Any]) -> str:
    return (f"{window['rate']:7.1f} steps/s  ms/step: thread {window['thread_ms']:.2f} process "
            f"{window['process_ms']:.2f}  cores: other threads {window['others_in_process']:.2f} server "
            f"{window['server']:.2f} watchers {window['watchers']:.2f} rest of machine "
            f"{window['rest_of_machine']:.2f} stolen {window['stolen']:.2f}")


def print_latencies(title: str, latencies: dict[str, list[float]], seconds: float,
                    errors: dict[str, int] | None = None) -> None:
    total = sum(len(v) for v in latencies.values())
    print(f"\n{title}: {total} requests in {seconds:.0f} s ({total / max(seconds, 1e-9):.2f} a second)")
    print(f"  {'endpoint':<46} {'n':>5} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    everything: list[float] = []
    for name in sorted(latencies):
        values = latencies[name]
        everything += values
        failed = f"  ({errors[name]} failed)" if errors and errors.get(name) else ""
        print(f"  {name:<46} {len(values):>5} {1000 * percentile(values, 50):>8.1f} "
              f"{1000 * percentile(values, 95):>8.1f} {1000 * max(values):>8.1f}{failed}")
    if everything:
        print(f"  {'all':<46} {len(everything):>5} {1000 * percentile(everything, 50):>8.1f} "
              f"{1000 * percentile(everything, 95):>8.1f} {1000 * max(everything):>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="rounds of the three conditions")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds each condition is timed, per round")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds trained before the first window")
    parser.add_argument("--samples", type=int, default=60_000, help="training samples (the demo's: 60000)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2 rounds of 4 s")
    parser.add_argument("--poll-client", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.poll_client:
        poll_client()
        return
    if args.quick:
        args.rounds, args.seconds, args.warmup = 2, 4.0, 4.0
    if not Path(CHROMIUM).is_file():
        sys.exit(f"{CHROMIUM} is missing: apt-get install -y chromium")
    home = tempfile.mkdtemp(prefix="otf-watching-")  # the session's store: ~3 MB an epoch
    os.environ["ONTHEFLY_HOME"] = home
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()

    training = Training(args.samples)
    base = training.server.url.split("/?")[0]
    page = PageWatcher(training.server.url, training.server)
    try:
        time.sleep(args.warmup)
        print(f"cores: {os.cpu_count()} (usable: {len(os.sched_getaffinity(0))}); torch threads: {threads} "
              f"(training thread: {training.torch_threads}); device: {training.trainer.device}; "
              f"{training.steps_per_epoch} steps an epoch; server pid {training.server.pid} "
              f"(niceness {os.getpriority(os.PRIO_PROCESS, training.server.pid)}); "
              f"{args.rounds} rounds x {args.seconds:.0f} s; warm-up {args.warmup:.0f} s, "
              f"{training.step} steps", flush=True)
        print("cpu columns: training thread and whole training process in ms a step; the rest in cores "
              "(cpu seconds a second): other threads of the training process, server process, "
              "watcher's processes (browser + Playwright driver, or the client), rest of the machine "
              "(other people's work), stolen by the hypervisor",
              flush=True)
        windows: list[list[dict[str, Any]]] = []
        for r in range(args.rounds):
            measured: list[dict[str, Any]] = []
            for condition in order_of(r):
                window = measure_window(training, args.seconds, condition, page, base)
                measured.append(window)
                loaded = (f"  (browser started in {window['launch_seconds']:.1f} s, page loaded and "
                          f"connected in {window['load_seconds']:.1f} s)" if "load_seconds" in window else "")
                print(f"round {r + 1} {condition:<4} {describe(window)}{loaded}", flush=True)
            windows.append(measured)
            rates = {w["condition"]: w["rate"] for w in measured}
            print(f"round {r + 1}: page/none {rates['page'] / rates['none']:.3f}  "
                  f"poll/none {rates['poll'] / rates['none']:.3f}", flush=True)
    finally:
        page.stop()
        training.stop()
        print(f"trained {training.run.epoch} epochs, {training.run.global_step} steps", flush=True)
        shutil.rmtree(home, ignore_errors=True)

    by_condition: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for measured in windows:
        for w in measured:
            by_condition[w["condition"]].append(w)
    print("\nper condition (median over rounds):")
    for condition in CONDITIONS:
        ws = by_condition[condition]

        medians = {key: statistics.median(w[key] for w in ws) for key in WINDOW_FIGURES}
        print(f"  {condition:<4} {describe(medians)}")
    none_rates = [w["rate"] for w in by_condition["none"]]
    if len(none_rates) > 1:
        spread = statistics.stdev(none_rates) / statistics.mean(none_rates)
        print(f"  noise: no-watcher windows vary by {100 * spread:.1f} % (coefficient of variation), "
              f"{min(none_rates):.1f}-{max(none_rates):.1f} steps/s")

    page_latencies: dict[str, list[float]] = defaultdict(list)
    for w in by_condition["page"]:
        for name, seconds in w["requests"]:
            page_latencies[name].append(seconds)
    print_latencies("the page's own API requests (Resource Timing, as the page waited for them)", page_latencies,
                    sum(w["wall"] for w in by_condition["page"]))
    poll_latencies: dict[str, list[float]] = defaultdict(list)
    poll_errors: dict[str, int] = defaultdict(int)
    for w in by_condition["poll"]:
        for name, values in w["client"]["latencies"].items():
            poll_latencies[name] += values
        for name, count in w["client"]["errors"].items():
            poll_errors[name] += count
    print_latencies(f"polling client ({POLL_RATE:g} requests a second, endpoints in turn)", poll_latencies,
                    sum(w["client"]["seconds"] for w in by_condition["poll"]), poll_errors)

    print()
    for condition, target in (("page", PAGE_TARGET), ("poll", POLL_TARGET)):
        ratios = [ratio_in(measured, condition, "rate") for measured in windows]
        # The training thread's CPU time a step, none / watched: whether the step itself got dearer.
        cpu = [1 / ratio_in(measured, condition, "thread_ms") for measured in windows]
        ratio = statistics.median(ratios)
        print(f"{condition}/none: median {ratio:.3f} (rounds: {', '.join(f'{x:.3f}' for x in ratios)})  "
              f"target >= {target:.2f}: {'met' if ratio >= target else 'NOT met'}  "
              f"[training thread cpu a step, none/{condition}: median {statistics.median(cpu):.3f}]")


if __name__ == "__main__":
    main()
