"""Palette on Ray Serve, on a simulated two-node Ray cluster on this machine (real Ray, CPU only).

One cluster (a head node with 2 CPUs and a worker node with 1, small object stores) and one Serve
application for the whole module, deployed as `palette serve --ray` and deploy/serve_config.yaml
deploy it (`build_app`, the proxy hook first). The application autoscales between 1 and 2 replicas,
at most one per node, each a whole pipeline on the embedded default model with 4 sampler rows; the
first test scales it from 1 to 2 under load and the later ones use both. Every call has a deadline,
so a fault shows as a failure, never as a hang. The last test removes the worker node.

Tests that fail when the proxy hook stops working (a Ray upgrade moved the internals it uses): every
check of initial metadata, UNAVAILABLE on replica loss, retry-after-ms on a stream, DEADLINE_EXCEEDED
as the replica's code, and health while the replicas are saturated.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from palette.client import GeneratedImage, PaletteClient, PaletteError
from palette.v1 import palette_pb2 as pb
from palette.v1 import palette_pb2_grpc as pb_grpc
from ray_fixtures import free_port, health_status, jax_cache_env
from server_fixtures import CHUNK_STEPS, NUM_SLOTS, png_bytes, running_server, wait_until

ray = pytest.importorskip("ray", reason="the ray extra (palette[ray]) is not installed")
from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402
from ray.serve.config import HTTPOptions, gRPCOptions  # noqa: E402

from palette.server.ray_app import (APP_NAME, DEPLOYMENT_NAME, LOGGING, ROUTE_PREFIX, SERVICER_FUNCTIONS,  # noqa: E402
                                    build_app)

# Starting the cluster's processes from this process, which has jax loaded, makes jax warn about fork();
# subprocess execs the Ray binaries at once, so nothing runs forked.
pytestmark = [pytest.mark.ray, pytest.mark.filterwarnings(r"ignore:os\.fork\(\) was called:RuntimeWarning")]

MB = 1024 * 1024
QUEUE = 8  # Generate requests a replica lets wait for rows
ARGS = dict(
    pipeline=dict(num_slots=NUM_SLOTS, chunk_steps=CHUNK_STEPS), core=dict(max_queued_requests=QUEUE),
    min_replicas=1, max_replicas=2, target_ongoing_requests=1, max_replicas_per_node=1,
    # React within seconds (Serve's defaults take tens of seconds); never scale down during the module.
    autoscaling=dict(metrics_interval_s=1, look_back_period_s=2, upscale_delay_s=1, downscale_delay_s=3600),
    health_check_period_s=2, health_check_timeout_s=10, grace_s=5, log_format="text")
DEADLINE = 120.0  # every call's; nothing here may hang


@dataclasses.dataclass
class RayCluster:
    cluster: Any
    worker: Any  # the worker node (ray._private.node.Node)
    grpc_port: int  # the head node's Serve gRPC proxy
    worker_grpc_port: int  # the worker node's
    health_before_deploy: int | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


@pytest.fixture(scope="module")
def ray_cluster():
    ports = dict(grpc=free_port(), worker_grpc=free_port(), http=free_port(), worker_http=free_port())
    env = dict(
        # Two proxies on one machine: the worker node's binds its own ports.
        RAY_SERVE_WORKER_PROXY_GRPC_PORT=str(ports["worker_grpc"]),
        RAY_SERVE_WORKER_PROXY_HTTP_PORT=str(ports["worker_http"]),
        # Each proxy would otherwise send everything to its own node's replica.
        RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING="0",
        **jax_cache_env())
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the nodes' processes inherit it
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=2, object_store_memory=150 * MB, include_dashboard=False))
    try:
        worker = cluster.add_node(num_cpus=1, object_store_memory=100 * MB)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        serve.start(proxy_location="EveryNode", http_options=HTTPOptions(host="127.0.0.1", port=ports["http"]),
                    grpc_options=gRPCOptions(port=ports["grpc"], grpc_servicer_functions=list(SERVICER_FUNCTIONS)))
        yield RayCluster(cluster, worker, ports["grpc"], ports["worker_grpc"])
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


@pytest.fixture(scope="module")
def app(ray_cluster):
    ray_cluster.health_before_deploy = health_status(ray_cluster.address)
    serve.run(build_app(ARGS), name=APP_NAME, route_prefix=ROUTE_PREFIX, logging_config=LOGGING)
    return ray_cluster


@pytest.fixture(scope="module")
def plain():
    """The plain `palette serve` server, in this process, with the replicas' settings."""
    with running_server(warmup=False, max_queued_requests=64) as server:
        with PaletteClient(server.address, timeout=DEADLINE) as client:
            yield client


# -- helpers ----------------------------------------------------------------------------------------

def stub(address: str) -> pb_grpc.PaletteStub:
    return pb_grpc.PaletteStub(grpc.insecure_channel(address))


def replica_states() -> dict[str, int]:
    deployment = serve.status().applications[APP_NAME].deployments[DEPLOYMENT_NAME]
    return {str(getattr(state, "value", state)): n for state, n in deployment.replica_states.items()}


def replica_stats(count: int = 2, timeout: float = 60) -> dict[str, dict]:
    """Each running replica's `stats()` by replica id (Serve routes each call to some replica)."""
    handle = serve.get_deployment_handle(DEPLOYMENT_NAME, APP_NAME)
    found: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(found) < count and time.monotonic() < deadline:
        stats = handle.stats.remote().result(timeout_s=30)
        found[stats["replica"]] = stats
    assert len(found) >= count, f"saw replicas {sorted(found)}, wanted {count}"
    return found


def generate(address: str, request: pb.GenerateRequest, **kwargs) -> tuple[dict, list, grpc.Call]:
    """(initial metadata, messages, call) of one Generate through `address`."""
    call = stub(address).Generate(request, timeout=kwargs.pop("timeout", DEADLINE), **kwargs)
    messages = list(call)
    return dict(call.initial_metadata()), messages, call


def images_of(messages) -> list[bytes]:
    return [m.image.data for m in sorted((m for m in messages if m.WhichOneof("event") == "image"),
                                         key=lambda m: m.image.index)]


def drive_until_two_replicas(address: str, timeout: float = 300) -> list[tuple[float, dict]]:
    """Keep 4 Generate streams going until Serve runs 2 replicas; the states seen, with times."""
    stop = threading.Event()
    seen: list[tuple[float, dict]] = []

    def load(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            try:
                list(stub(address).Generate(pb.GenerateRequest(prompt=f"load {i}", num_images=4, seed=100 * i + n),
                                            timeout=DEADLINE))
            except grpc.RpcError:
                pass

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for i in range(4):
            pool.submit(load, i)
        try:
            while time.monotonic() - started < timeout:
                states = replica_states()
                if not seen or seen[-1][1] != states:
                    seen.append((round(time.monotonic() - started, 1), states))
                if states.get("RUNNING") == 2:
                    break
                time.sleep(0.25)
        finally:
            stop.set()
    return seen


def proxy_processes(cluster) -> list:
    """The Serve proxy processes of `cluster`'s nodes (children of their raylets)."""
    import psutil

    found = []
    for node in [cluster.head_node, *cluster.worker_nodes]:
        raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
        found += [p for p in raylet.children(recursive=True) if "ProxyActor" in " ".join(p.cmdline())]
    return found


@pytest.fixture(scope="module")
def two_replicas(app):
    if replica_states().get("RUNNING") != 2:
        drive_until_two_replicas(app.address)
    assert replica_states().get("RUNNING") == 2
    return app


# -- scaling ------------------------------------------------------------------------------------------

def test_autoscales_from_one_to_two_replicas_under_load(app):
    assert replica_states() == {"RUNNING": 1}
    seen = drive_until_two_replicas(app.address)
    assert seen[-1][1].get("RUNNING") == 2, f"never scaled to 2 replicas: {seen}"
    assert any(states.get("STARTING") for _, states in seen), seen
    # The new replica answers too.
    info = stub(app.address).GetModelInfo
    answered = {dict(info.with_call(pb.GetModelInfoRequest(), timeout=30)[1].initial_metadata())["x-palette-replica"]
                for _ in range(24)}
    assert len(answered) == 2, answered
    print(f"scaling 1 -> 2 under load: {seen}")


def test_calls_spread_over_replicas_on_two_nodes(two_replicas):
    replicas = replica_stats(2)
    assert len({s["node"] for s in replicas.values()}) == 2, replicas
    worker_node = two_replicas.worker.node_id
    assert worker_node in {s["node"] for s in replicas.values()}

    def one(i: int) -> str:
        initial, messages, _ = generate(two_replicas.address, pb.GenerateRequest(prompt=f"spread {i}", seed=i))
        assert messages[-1].WhichOneof("event") == "done"
        return initial["x-palette-replica"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answered = list(pool.map(one, range(1, 17)))
    assert set(answered) == set(replicas), answered
    # Every node runs a proxy: the worker node's answers too, with either replica behind it.
    reply, call = stub(f"127.0.0.1:{two_replicas.worker_grpc_port}").GetModelInfo.with_call(
        pb.GetModelInfoRequest(), timeout=30)
    assert reply.limits.num_slots == NUM_SLOTS
    assert dict(call.initial_metadata())["x-palette-replica"] in replicas


# -- the same contract ------------------------------------------------------------------------------

def test_images_are_byte_identical_to_the_plain_server_whichever_replica_answers(two_replicas, plain):
    requests = [dict(prompt="a red circle in the top left corner on a blue background", num_images=3, seed=7),
                dict(prompt="a green triangle", num_images=2, seed=2**32 - 1, top_k=20, temperature=0.9),
                dict(prompt="a yellow star", num_images=2, seed=11, rank=True, format="jpeg", quality=80)]
    for options in requests:
        options = dict(options)
        prompt, n = options.pop("prompt"), options.pop("num_images")
        expected = plain.generate_images(prompt, n, **options)
        want = [im.data for im in expected.images]
        with PaletteClient(two_replicas.address, timeout=DEADLINE) as client:
            by_replica: dict[str, list[bytes]] = {}
            for _ in range(12):  # until both replicas have answered it
                call = client.generate(prompt, n, **options)
                result = call.collect()
                replica = dict(call._call.initial_metadata())["x-palette-replica"]
                by_replica[replica] = [im.data for im in result.images]
                assert [im.seed for im in result.images] == [im.seed for im in expected.images]
                assert result.done.ranked_indices == expected.done.ranked_indices
                if len(by_replica) == 2:
                    break
        assert len(by_replica) == 2, f"only {list(by_replica)} answered"
        for replica, got in by_replica.items():
            assert got == want, f"replica {replica} sent other bytes for {prompt!r}"


def test_metadata_and_request_id(two_replicas):
    initial, messages, call = generate(two_replicas.address, pb.GenerateRequest(prompt="a tree", seed=1),
                                       metadata=[("x-request-id", "ray-req-42")])
    assert initial["x-request-id"] == "ray-req-42" and initial["x-palette-replica"]
    assert messages[0].WhichOneof("event") == "progress"  # the replica's empty first message stays in the proxy
    assert messages[-1].done.request_id == "ray-req-42"
    # A bad x-request-id is replaced, as the plain server does; unary calls carry the metadata too.
    reply, call = stub(two_replicas.address).GetModelInfo.with_call(
        pb.GetModelInfoRequest(), timeout=30, metadata=[("x-request-id", "not ok")])
    initial = dict(call.initial_metadata())
    assert initial["x-request-id"] != "not ok" and len(initial["x-request-id"]) == 16
    assert initial["x-palette-replica"] and reply.limits.num_slots == NUM_SLOTS


def test_rank_through_ray_streams_scores_while_the_client_sends(two_replicas, plain):
    images = [png_bytes(300 + i) for i in range(12)]
    want, order = plain.rank_scores("a colourful pattern", images)
    sent_prompt = threading.Event()
    got_metadata = threading.Event()
    first_score = threading.Event()

    def requests():
        yield pb.RankRequest(prompt="a colourful pattern")
        sent_prompt.set()
        # The initial metadata (from the replica, through the hook) comes before any image is sent ...
        assert got_metadata.wait(30), "no initial metadata before the first image"
        for image in images[:8]:  # ... and one full batch (rank_batch 8) is scored while the client still sends.
            yield pb.RankRequest(image=image)
        assert first_score.wait(30), "no score streamed back while the client was still sending"
        for image in images[8:]:
            yield pb.RankRequest(image=image)

    call = stub(two_replicas.address).Rank(requests(), timeout=DEADLINE)
    assert sent_prompt.wait(30)
    initial = dict(call.initial_metadata())
    got_metadata.set()
    assert initial["x-palette-replica"] and initial["x-request-id"]
    scores = {}
    for message in call:
        if message.WhichOneof("event") == "score":
            scores[message.score.index] = message.score.score
            first_score.set()
        else:
            done = message.done
    assert [scores[i] for i in range(len(images))] == pytest.approx(want, rel=1e-4, abs=1e-5)
    assert list(done.ranked_indices) == order
    unary = stub(two_replicas.address).RankImages(pb.RankImagesRequest(prompt="a colourful pattern", images=images),
                                                 timeout=DEADLINE)
    assert [s.score for s in unary.scores] == pytest.approx(want, rel=1e-4, abs=1e-5)


def expect_error(call_fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call_fn()
        if not hasattr(result, "ListFields"):
            list(result)
    return err.value


def test_error_codes_and_messages_match_the_plain_server(two_replicas, plain):
    bad = [pb.GenerateRequest(prompt=""), pb.GenerateRequest(prompt="x", num_images=99),
           pb.GenerateRequest(prompt="x", top_p=2.0), pb.GenerateRequest(prompt="x" * 600)]
    for request in bad:
        ray_error = expect_error(lambda: stub(two_replicas.address).Generate(request, timeout=30))
        plain_error = expect_error(lambda: stub(plain.target).Generate(request, timeout=30))
        assert (ray_error.code(), ray_error.details()) == (plain_error.code(), plain_error.details())
        assert ray_error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert dict(ray_error.initial_metadata())["x-request-id"]
        trailers = dict(ray_error.trailing_metadata())
        assert trailers["x-palette-replica"] and trailers["x-request-id"]
    ranks = [[pb.RankRequest(image=png_bytes(1))], [pb.RankRequest(prompt="p"), pb.RankRequest(prompt="q")],
             [pb.RankRequest(prompt="p")], [pb.RankRequest(prompt="p"), pb.RankRequest(image=b"not an image")]]
    for messages in ranks:
        ray_error = expect_error(lambda: stub(two_replicas.address).Rank(iter(messages), timeout=30))
        plain_error = expect_error(lambda: stub(plain.target).Rank(iter(messages), timeout=30))
        assert (ray_error.code(), ray_error.details()) == (plain_error.code(), plain_error.details())
    # A client's error is its answer, not a fault: no tracebacks for it in Serve's logs.
    serve_logs = Path(two_replicas.cluster.head_node.get_session_dir_path()) / "logs" / "serve"
    assert not [p.name for p in serve_logs.glob("*.log") if "ReplicaStatus" in p.read_text(errors="replace")]
    # Bytes that are no message are the client's fault (INVALID_ARGUMENT), as on the plain server.
    for target in (two_replicas.address, plain.target):
        with grpc.insecure_channel(target) as channel:
            raw = channel.unary_stream("/palette.v1.Palette/Generate")
            error = expect_error(lambda: raw(b"\xff\xff\xff", timeout=30))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert "GenerateRequest message could not be decoded" in error.details()


def test_full_queue_is_resource_exhausted_with_retry_after(two_replicas):
    """More requests than both replicas let wait: the rest get RESOURCE_EXHAUSTED and when to retry."""
    def one(i: int) -> tuple[grpc.StatusCode, dict, str]:
        try:
            generate(two_replicas.address, pb.GenerateRequest(prompt=f"flood {i}", num_images=4, seed=i))
            return grpc.StatusCode.OK, {}, ""
        except grpc.RpcError as err:
            return err.code(), dict(err.trailing_metadata() or ()), err.details()

    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        results = list(pool.map(one, range(1, 41)))
    codes = [code for code, _, _ in results]
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}, results
    refused = [(trailers, details) for code, trailers, details in results if code == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert refused and codes.count(grpc.StatusCode.OK) >= 2 * QUEUE, codes
    for trailers, details in refused:
        assert int(trailers["retry-after-ms"]) > 0 and trailers["x-palette-replica"], trailers
        assert "requests are waiting for sampler rows" in details


def test_deadline_reaches_the_replica_and_frees_its_rows(two_replicas):
    call = stub(two_replicas.address).Generate(pb.GenerateRequest(prompt="too slow for this deadline", num_images=16,
                                                                  seed=3), timeout=1.5)
    replica = dict(call.initial_metadata())["x-palette-replica"]
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    def settled() -> bool:
        stats = replica_stats(2)[replica]
        return stats["occupied_slots"] == 0 and stats["inflight"] == 0 and stats["requests"].get(
            "Generate:DEADLINE_EXCEEDED", 0) >= 1

    # DEADLINE_EXCEEDED, not CANCELLED, in the replica's own record: it knew the client's deadline.
    assert wait_until(settled, timeout=30, interval=0.5), replica_stats(2)[replica]

    # A client's cancel reaches the replica and frees the rows, whenever it comes.
    before = {r: s["requests"].get("Generate:CANCELLED", 0) for r, s in replica_stats(2).items()}
    cancelled = dict.fromkeys(before, 0)
    for after in (1, 2, 3, 5, 8):
        call = stub(two_replicas.address).Generate(pb.GenerateRequest(prompt="a very long job", num_images=16,
                                                                      seed=after), timeout=DEADLINE)
        cancelled[dict(call.initial_metadata())["x-palette-replica"]] += 1
        for _ in range(after):
            next(call)
        call.cancel()

    def all_cancelled() -> bool:
        stats = replica_stats(2)
        return all(s["occupied_slots"] == 0 and s["requests"].get("Generate:CANCELLED", 0) - before[r] == cancelled[r]
                   for r, s in stats.items())

    # A job not cancelled would run on for seconds and end OK.
    assert wait_until(all_cancelled, timeout=30, interval=0.5), (cancelled, before, replica_stats(2))


def test_health_reflection_and_the_proxy(two_replicas):
    from grpc_health.v1 import health_pb2
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    serving = health_pb2.HealthCheckResponse.SERVING
    assert two_replicas.health_before_deploy == health_pb2.HealthCheckResponse.NOT_SERVING
    for address in (two_replicas.address, f"127.0.0.1:{two_replicas.worker_grpc_port}"):
        assert health_status(address) == serving
        assert health_status(address, "palette.v1.Palette") == serving
    with pytest.raises(grpc.RpcError) as err:
        health_status(two_replicas.address, "no.such.Service")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # The proxy answers health itself: at once, even while every replica is busy.
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        busy = [pool.submit(generate, two_replicas.address, pb.GenerateRequest(prompt=f"busy {i}", num_images=8,
                                                                                seed=i)) for i in range(6)]
        time.sleep(1.0)
        started = time.monotonic()
        assert health_status(two_replicas.address) == serving
        assert time.monotonic() - started < 1.0
        for future in busy:
            future.result(timeout=DEADLINE)
    # The hook keeps the proxies light: they never load jax (nor the rest of the server).
    proxies = proxy_processes(two_replicas.cluster)
    assert len(proxies) == 2, proxies
    for proxy in proxies:
        assert not [m.path for m in proxy.memory_maps() if "jaxlib" in m.path], proxy.cmdline()
    # Reflection is Serve's own (open, without authentication) and lists the service.
    with grpc.insecure_channel(two_replicas.address) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "palette.v1.Palette" in services and "grpc.health.v1.Health" in services


# -- losing a node ----------------------------------------------------------------------------------

def test_losing_a_node_ends_its_calls_unavailable_and_the_resubmitting_client_gets_every_image(two_replicas, plain):
    replicas = replica_stats(2)
    doomed = [r for r, s in replicas.items() if s["node"] == two_replicas.worker.node_id]
    assert len(doomed) == 1, replicas
    doomed = doomed[0]
    requests = [(f"in flight {i}", 4, 50 + 10 * i) for i in range(4)]
    expected = {prompt: [im.data for im in plain.generate_images(prompt, n, seed=seed).images]
                for prompt, n, seed in requests}

    # Raw calls (no resubmission) show how each in-flight call ends; client calls show what a caller gets.
    # Every call waits, once accepted, until the node is gone.
    raw: dict[str, dict] = {}
    resubmitted: dict[str, Any] = {}
    placed: queue.Queue[str | None] = queue.Queue()  # each raw call's replica, as it learns it
    accepted = threading.Semaphore(0)
    node_removed = threading.Event()

    def raw_call(prompt: str, n: int, seed: int) -> None:
        outcome = raw[prompt] = {"replica": None, "images": 0}
        call = stub(two_replicas.address).Generate(pb.GenerateRequest(prompt=prompt, num_images=n, seed=seed),
                                                   timeout=DEADLINE)
        try:
            outcome["replica"] = dict(call.initial_metadata())["x-palette-replica"]
            placed.put(outcome["replica"])
            messages = iter(call)
            next(messages)  # accepted: its progress
            accepted.release()
            node_removed.wait(DEADLINE)
            for message in messages:
                outcome["images"] += message.WhichOneof("event") == "image"
            outcome["code"] = grpc.StatusCode.OK
        except grpc.RpcError as err:
            outcome.update(code=err.code(), details=err.details())
            if outcome["replica"] is None:  # refused before it learnt its replica: the placing loop still waits
                placed.put(None)
        outcome["ended"] = time.monotonic()

    def client_call(prompt: str, n: int, seed: int) -> None:
        with PaletteClient(two_replicas.address, timeout=DEADLINE, resubmit_unavailable=5) as client:
            call = client.generate(prompt, n, seed=seed)
            events = iter(call)
            try:
                next(events)
                accepted.release()
                node_removed.wait(DEADLINE)
                images = [event for event in events if isinstance(event, GeneratedImage)]
                resubmitted[prompt] = [im.data for im in sorted(images, key=lambda im: im.index)]
            except PaletteError as err:
                resubmitted[prompt] = err

    with concurrent.futures.ThreadPoolExecutor(len(requests) + 8) as pool:
        # Started one at a time, each call finds the replicas' queues as the last one left them, so Serve's
        # routing by queue length spreads them; calls that arrive together may all land on one replica.
        futures, replicas_hit = [], []
        for i in range(8):
            futures.append(pool.submit(raw_call, f"raw {i}", 4, 500 + 10 * i))
            replicas_hit.append(placed.get(timeout=60))
            if len(replicas_hit) >= len(requests) and len(set(replicas_hit)) == 2 and replicas_hit[-1] == doomed:
                break  # the lost replica's last call waits behind the others: in flight when the node goes
        futures += [pool.submit(client_call, *r) for r in requests]
        for _ in futures:
            assert accepted.acquire(timeout=60), f"a call was never accepted: {raw}"
        removed_at = time.monotonic()  # every call is in flight, none has read an image yet
        two_replicas.cluster.remove_node(two_replicas.worker)
        node_removed.set()
        for future in futures:
            future.result(timeout=DEADLINE + 30)

    complete = {p for p, o in raw.items() if o["code"] == grpc.StatusCode.OK and o["images"] == 4}
    cut = [p for p, o in raw.items() if o["replica"] == doomed and p not in complete]
    # The lost replica serves its calls one after another: the first may have finished before the node went.
    assert cut, f"no call was still in flight on the lost node's replica: {raw}"
    for prompt in cut:
        outcome = raw[prompt]
        assert outcome["code"] == grpc.StatusCode.UNAVAILABLE, outcome
        assert "replica serving this call was lost" in outcome["details"]
        assert outcome["ended"] - removed_at < 10, outcome  # Serve notices the dead actor at once
    assert all(p in complete for p, o in raw.items() if o["replica"] != doomed), raw
    print("in-flight calls on the lost replica ended after", sorted(
        round(raw[p]["ended"] - removed_at, 3) for p in cut), "s")
    for prompt, got in resubmitted.items():
        assert not isinstance(got, Exception), f"{prompt}: {got}"
        assert got == expected[prompt], f"{prompt}: other images after resubmission"
    # New calls go to the survivor.
    survivor = next(r for r in replicas if r != doomed)
    for i in range(4):
        initial, messages, _ = generate(two_replicas.address, pb.GenerateRequest(prompt="after the loss", seed=i + 1))
        assert initial["x-palette-replica"] == survivor and messages[-1].WhichOneof("event") == "done"
