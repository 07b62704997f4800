"""Palette on Ray Serve without a cluster: the shipped Serve config and KubeRay manifest agree with each other
and with `palette serve --ray`, the proxy hook finds the Ray internals it needs (or steps aside), and
`palette serve --ray` refuses what Ray cannot do before it starts anything."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import subprocess
import sys
import unittest.mock
from pathlib import Path

import pytest

pytest.importorskip("ray.serve", reason="the ray extra (palette[ray]) is not installed")
import yaml  # noqa: E402  (a dependency of ray)
from ray.serve.schema import ServeDeploySchema  # noqa: E402

from palette.client.cli import build_parser, ray_options, server_config  # noqa: E402
from palette.server import ray_proxy  # noqa: E402
from palette.server.ray_app import (APP_NAME, LOGGING, PROXY_LOCATION, ROUTE_PREFIX, SERVICER_FUNCTIONS,  # noqa: E402
                                    AppArgs, build_app)
from palette.server.ray_main import app_args  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
PALETTE = str(Path(sys.executable).with_name("palette"))


def serve_config() -> dict:
    return yaml.safe_load((DEPLOY / "serve_config.yaml").read_text())


def gen_rayservice():
    spec = importlib.util.spec_from_file_location("gen_rayservice", DEPLOY / "gen_rayservice.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- one source: serve_config.yaml ------------------------------------------------------------------

def test_serve_config_is_valid_and_names_palettes_application():
    config = serve_config()
    ServeDeploySchema.model_validate(config)  # what `serve deploy` and KubeRay apply
    assert config["proxy_location"] == PROXY_LOCATION
    assert config["grpc_options"]["grpc_servicer_functions"] == list(SERVICER_FUNCTIONS)
    assert config["logging_config"] == LOGGING
    (app,) = config["applications"]
    assert (app["name"], app["route_prefix"]) == (APP_NAME, ROUTE_PREFIX)
    module, _, name = app["import_path"].partition(":")
    assert getattr(importlib.import_module(module), name) is build_app
    assert build_app(app["args"]) is not None
    for path in SERVICER_FUNCTIONS:  # what every proxy imports
        module, _, name = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name)), path


def test_serve_config_deploys_what_palette_serve_ray_deploys():
    args = build_parser().parse_args(["serve", "--ray", "--insecure", "--port", "50051", "--min-replicas", "1",
                                      "--max-replicas", "4"])
    config = server_config(args)
    from_cli = AppArgs.of(app_args(config, ray_options(args), "json",
                                   dict(num_slots=args.num_slots, chunk_steps=args.chunk_steps)))
    from_file = AppArgs.of(serve_config()["applications"][0]["args"])
    assert from_file.deployment_options() == from_cli.deployment_options()
    assert from_file.replica_settings() == from_cli.replica_settings()
    assert serve_config()["grpc_options"]["port"] == config.port
    assert serve_config()["http_options"]["port"] == args.ray_http_port


def test_rayservice_embeds_the_serve_config_verbatim():
    generator = gen_rayservice()
    assert generator.main(["--check"]) == 0, "deploy/rayservice.yaml is stale: run `make rayservice`"
    service = yaml.safe_load((DEPLOY / "rayservice.yaml").read_text())
    assert service["kind"] == "RayService"
    embedded = service["spec"]["serveConfigV2"]
    assert embedded == (DEPLOY / "serve_config.yaml").read_text()
    ServeDeploySchema.model_validate(yaml.safe_load(embedded))
    assert generator.port_problems(service, serve_config()) == []


def test_app_args_say_what_is_wrong():
    with pytest.raises(ValueError, match=r"unknown Palette application args \['num_slots'\]"):
        AppArgs.of({"num_slots": 4})
    with pytest.raises(TypeError, match="max_queue"):
        AppArgs.of({"core": {"max_queue": 4}})
    with pytest.raises(ValueError, match="min_replicas <= max_replicas"):
        AppArgs.of({"min_replicas": 3, "max_replicas": 2}).deployment_options()
    options = AppArgs.of({"pipeline": {"num_slots": 16}, "min_replicas": 1, "max_replicas": 3}).deployment_options()
    assert options["autoscaling_config"]["target_ongoing_requests"] == 16 and "num_replicas" not in options
    assert AppArgs.of({"replicas": 2}).deployment_options()["num_replicas"] == 2


# -- the proxy hook ---------------------------------------------------------------------------------

def test_the_proxy_hook_finds_the_ray_internals_it_needs():
    assert ray_proxy.missing_internals() == [], "upgrade the hook in server/ray_proxy.py for this Ray Serve"


def test_the_proxy_hook_steps_aside_without_them(caplog, monkeypatch):
    class NotServesServer:
        def __init__(self):
            self.added = []

        def add_generic_rpc_handlers(self, handlers):
            self.added.append(handlers)

        def add_registered_method_handlers(self, *args):
            pass

        def service_handler_factory(self, **kwargs):  # bound to this object, not to Serve's gRPCProxy
            raise AssertionError("not called")

    server = NotServesServer()
    factory = server.service_handler_factory
    servicer = unittest.mock.Mock()  # what Serve passes
    monkeypatch.setattr(ray_proxy, "_warned", False)
    with caplog.at_level(logging.WARNING, logger="ray.serve.palette"):
        ray_proxy.install(servicer, server)
        ray_proxy.add_health(servicer, server)
    assert server.service_handler_factory == factory and not hasattr(server, "_palette_hook")
    warnings = [r.getMessage() for r in caplog.records if "proxy hook is off" in r.getMessage()]
    assert len(warnings) == 1, warnings  # one per proxy process
    (handlers,) = server.added  # health is then registered to be routed to the replicas' Check
    assert handlers[0].service_name() == "grpc.health.v1.Health"


def test_status_details_carry_trailers_through_a_raise():
    packed = ray_proxy.pack_details("the server is busy", [("retry-after-ms", "1500"), ("x-request-id", "r1")])
    assert ray_proxy.unpack_details(packed) == ("the server is busy", [("retry-after-ms", "1500"),
                                                                     ("x-request-id", "r1")])
    assert ray_proxy.unpack_details(packed.encode()) == ray_proxy.unpack_details(packed)
    assert ray_proxy.unpack_details("plain message") == ("plain message", None)
    assert ray_proxy.unpack_details(packed[:-5]) == ("the server is busy", [])  # cut by Serve's 4 KiB limit


# -- refusals before anything starts ----------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    ([], "refusing to start on Ray without --insecure: Ray Serve's gRPC proxy serves plaintext on every interface"),
    (["--insecure", "--tls-cert", "c.pem", "--tls-key", "k.pem"], "do not apply with --ray"),
    (["--insecure", "--port", "0"], "--ray needs a fixed --port"),
    (["--insecure", "--host", "0.0.0.0"], "--host does not apply with --ray"),
    (["--insecure", "--auth-tokens", "no-such-file"], "token file no-such-file: cannot be read"),
])
def test_palette_serve_ray_refuses_what_it_cannot_honour(tmp_path, flags, message):
    result = subprocess.run([PALETTE, "serve", "--ray", *flags], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]
    assert len(errors) == 1 and errors[0].startswith("palette: error:") and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr


class FakeProxyContext:
    """The parts of grpc.aio's ServicerContext the hook reads and writes, after Serve's proxy set a status."""

    def __init__(self, code, details, trailers=(), metadata=(), remaining=None):
        self._code, self._details, self._trailers = code, details, tuple(trailers)
        self._metadata, self._remaining = tuple(metadata), remaining

    def code(self):
        return self._code

    def details(self):
        return self._details

    def set_code(self, code):
        self._code = code

    def set_details(self, details):
        self._details = details

    def trailing_metadata(self):
        return self._trailers

    def set_trailing_metadata(self, trailers):
        self._trailers = tuple(trailers)

    def invocation_metadata(self):
        return self._metadata

    def time_remaining(self):
        return self._remaining


def test_the_hook_forwards_ids_and_the_deadline_and_rewrites_statuses():
    import grpc

    context = FakeProxyContext(None, None, metadata=[("x-request-id", "req-1"), ("x-palette-deadline-ms", "1"),
                                                     ("x-palette-proxy", "1")], remaining=2.5)
    call = ray_proxy._Call(context)
    forwarded = dict(call.forwarded.invocation_metadata())
    # The client's own x-palette-* claims are dropped; the proxy's are authoritative.
    assert forwarded == {"x-request-id": "req-1", "x-palette-proxy": "1", "request_id": "req-1",
                         "x-palette-deadline-ms": "2500"}
    bad_id = ray_proxy._Call(FakeProxyContext(None, None, metadata=[("x-request-id", "no spaces please")]))
    assert bad_id.request_id != "no spaces please" and "x-palette-deadline-ms" not in dict(
        bad_id.forwarded.invocation_metadata())

    # The replica's own failure: message and trailers unpacked.
    context = FakeProxyContext(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               ray_proxy.pack_details("busy", [("retry-after-ms", "900"), ("x-request-id", "req-1")]),
                               trailers=[("request_id", "req-1"), ("x-request-id", "req-1")])
    ray_proxy._Call(context).finish()
    assert context.details() == "busy"
    assert dict(context.trailing_metadata()) == {"request_id": "req-1", "x-request-id": "req-1",
                                                 "retry-after-ms": "900"}
    # A replica that died under the call: retryable.
    context = FakeProxyContext(grpc.StatusCode.INTERNAL, "ray::ServeReplica... The actor died unexpectedly before "
                                                         "finishing this task.", metadata=[("x-request-id", "req-2")])
    ray_proxy._Call(context).finish()
    assert context.code() == grpc.StatusCode.UNAVAILABLE
    assert context.details() == "the replica serving this call was lost (request id req-2); retry: another replica takes it"
    # Any other failure of Ray's: INTERNAL with the request id, never Ray's traceback.
    context = FakeProxyContext(grpc.StatusCode.INTERNAL, "\x1b[36mray::ServeReplica:palette:Palette...Traceback",
                               metadata=[("x-request-id", "req-3")])
    ray_proxy._Call(context).finish()
    assert context.code() == grpc.StatusCode.INTERNAL
    assert context.details() == "internal error in Ray Serve (request id req-3); the Ray Serve logs have the details"
