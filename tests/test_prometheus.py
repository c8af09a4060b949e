"""GET /metrics the Prometheus way: one registry per app, request latency and time to first token per route,
the engine's counters, the run's gauges, swap pause and learner step histograms, process memory and CPU."""

import json
import threading

import anyio
from prometheus_client.parser import text_string_to_metric_families

from paraloop.messages import AdapterSwapped, StepFinished
from paraloop.run.control import run_families
from paraloop.run.status import RunStatus
from paraloop.server.metrics import Metrics
from support.http_harness import running_server


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page (parsed by prometheus_client's parser)."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(page: dict, sample: str, **labels) -> float | None:
    return page.get((sample, tuple(sorted(labels.items()))))


def test_routes_are_timed_and_tokens_counted_in_each_apps_own_registry(tiny_model_path):
    with running_server(tiny_model_path) as one, running_server(tiny_model_path) as two:
        for _ in range(2):
            assert one.post("/v1/completions", {"prompt": "hello", "max_tokens": 4}).status_code == 200
        streamed = one.post(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
        )
        assert streamed.status_code == 200
        assert one.post("/v1/completions", {"prompt": "x", "max_tokens": -1}).status_code == 400
        assert one.get("/no/such/path").status_code == 404
        assert one.request("PROPFIND", "/no/such/dav").status_code == 404
        reply = one.get("/metrics")
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
        page = samples(reply.text)
        route = "/v1/completions"
        assert value(page, "paraloop_http_requests_total", route=route, method="POST", status="200") == 2
        assert value(page, "paraloop_http_requests_total", route=route, method="POST", status="400") == 1
        assert value(page, "paraloop_http_requests_total", route="unmatched", method="GET", status="404") == 1
        assert not [labels for name, labels in page if ("method", "PROPFIND") in labels], "labels stay bounded"
        assert (
            sum(
                v
                for (name, labels), v in page.items()
                if name == "paraloop_http_requests_total" and ("method", "other") in labels
            )
            == 1
        )
        assert value(page, "paraloop_http_request_duration_seconds_count", route=route, method="POST") == 3
        assert value(page, "paraloop_http_time_to_first_token_seconds_count", route=route) == 2, "not the 400"
        assert value(page, "paraloop_http_time_to_first_token_seconds_count", route="/v1/chat/completions") == 1
        ttft = value(page, "paraloop_http_time_to_first_token_seconds_sum", route=route)
        latency = value(page, "paraloop_http_request_duration_seconds_sum", route=route, method="POST")
        assert 0 < ttft <= latency
        stats = one.engine.stats()
        assert value(page, "paraloop_generated_tokens_total") == stats["generated_tokens"] >= 11
        assert value(page, "paraloop_engine_requests_total") == stats["requests_served"]
        assert value(page, "process_resident_memory_bytes") > 1e6
        assert value(page, "process_cpu_seconds_total") > 0
        assert value(page, "paraloop_mlx_active_memory_bytes") > 0
        assert not any(name.endswith("_created") for name, _ in page), "no _created twins"
        other = samples(two.get("/metrics").text)
        assert value(other, "paraloop_http_requests_total", route=route, method="POST", status="200") is None
        assert value(other, "paraloop_generated_tokens_total") == 0, "the second app counts only its own engine"


def test_metrics_need_the_token_when_one_is_set(tiny_model_path):
    with running_server(tiny_model_path, overrides={"server": {"control_token": "t0k"}}) as server:
        assert server.get("/metrics").status_code == 401
        reply = server.get("/metrics", headers={"Authorization": "Bearer t0k"})
        assert reply.status_code == 200 and "paraloop_http_requests_total" in reply.text


def test_a_client_that_hangs_up_mid_stream_is_counted_as_499(tiny_model_path):
    from support.http_harness import raw_request

    with running_server(tiny_model_path) as server:
        sock = raw_request(
            server.port, "/v1/completions", {"prompt": "hello", "max_tokens": 200, "stream": True, "ignore_eos": True}
        )
        sock.recv(1)  # the stream started
        sock.close()
        server.wait_idle()
        deadline = threading.Event()
        for _ in range(100):
            page = samples(server.get("/metrics").text)
            if value(page, "paraloop_http_requests_total", route="/v1/completions", method="POST", status="499"):
                break
            deadline.wait(0.05)
        assert value(page, "paraloop_http_requests_total", route="/v1/completions", method="POST", status="499") == 1


def test_the_runs_gauges_counters_and_histograms():
    metrics = Metrics()
    send, receive = anyio.create_memory_object_stream[int](4)
    send.send_nowait(1)
    status = RunStatus(total_steps=10, mode="sync", run_dir="/tmp/r", prometheus=metrics, queues={"rollouts": send})
    status.record_step(StepFinished(step=1, version=1, metrics={"loss": 0.5, "step_time_s": 1.5}))
    status.record_step(StepFinished(step=2, version=1, metrics={"loss": 0.25, "step_time_s": 0.2}, skipped=True))
    status.record_swap(AdapterSwapped(version=1, pause_s=0.0004))
    status.paused, status.dropped_stale = True, 3
    metrics.add_collector(lambda: run_families(status))
    page = samples(metrics.text().decode())
    assert value(page, "paraloop_step") == 2 and value(page, "paraloop_total_steps") == 10
    assert value(page, "paraloop_adapter_version") == 1 and value(page, "paraloop_paused") == 1
    assert value(page, "paraloop_skipped_steps_total") == 1 and value(page, "paraloop_dropped_stale_total") == 3
    assert value(page, "paraloop_queue_depth", queue="rollouts") == 1
    assert value(page, "paraloop_metric", name="loss") == 0.25
    assert value(page, "paraloop_learner_step_seconds_count") == 2
    assert value(page, "paraloop_learner_step_seconds_bucket", le="1.0") == 1
    assert value(page, "paraloop_swap_pause_seconds_count") == 1
    assert value(page, "paraloop_swap_pause_seconds_bucket", le="0.0005") == 1
    send.close()
    receive.close()


def test_the_grafana_example_uses_only_names_paraloop_exports():
    """docs/grafana-dashboard.json: valid JSON whose queries name metrics that exist (or their histogram series)."""
    import re
    from pathlib import Path

    board = json.loads((Path(__file__).resolve().parents[1] / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    metrics = Metrics()
    send, receive = anyio.create_memory_object_stream[int](1)
    status = RunStatus(total_steps=1, mode="sync", run_dir="/tmp/r", queues={"rollouts": send})
    status.record_step(StepFinished(step=1, version=1, metrics={"reward_mean": 0.5, "loss": 0.1, "kl": 0.0}))
    metrics.add_collector(lambda: run_families(status))
    from paraloop.server.metrics import engine_families

    metrics.add_collector(
        lambda: engine_families(
            {
                "generated_tokens": 1.0,
                "requests_served": 1.0,
                "swaps": 1.0,
                "tokens_per_s": 1.0,
                "queue_depth": 0.0,
                "waiting_requests": 0.0,
                "active_rows": 0.0,
                "version": 0.0,
            }
        )
    )
    metrics.requests.labels("/r", "GET", "200").inc()
    metrics.latency.labels("/r", "GET").observe(0.1)
    metrics.ttft.labels("/r").observe(0.1)
    exported = {name for name, _ in samples(metrics.text().decode())}
    for expr in exprs:
        for name in re.findall(r"\b(?:paraloop|process)_[a-z_]+", expr):
            assert name in exported, f"{name} (in {expr!r}) is not exported"
    send.close()
    receive.close()
