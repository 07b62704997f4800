"""`palette serve --ray`: Palette on Ray Serve, on a local Ray or a cluster, until SIGTERM / SIGINT.

It starts (or joins) Ray, starts Serve with Palette's gRPC ingress on the given port (the proxy hook
first, see ray_proxy.py), deploys `ray_app.build_app` as the application `palette`, and on a signal
deletes it, which drains every replica (in-flight calls get `grace_s`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from . import logs
from .auth import Authenticator, TokenFileError
from .core import CoreConfig
from .main import StartupError, handle_stop_signals
from .service import ConfigError, ServerConfig

log = logging.getLogger("palette.server")

PLAINTEXT = ("Ray Serve's gRPC proxy serves plaintext on every interface of every node (it has no TLS: "
             "ray-project/ray#34103)")


@dataclasses.dataclass
class RayOptions:
    address: str | None = None  # None: start a local Ray for this process
    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    http_port: int = 8000  # Serve's HTTP proxy, which always runs (KubeRay probes its /-/healthz)


def check(config: ServerConfig) -> None:
    """StartupError when `palette serve --ray` cannot honour these settings."""
    if config.tls_cert or config.tls_key or config.tls_client_ca:
        raise StartupError(f"--tls-cert, --tls-key and --tls-client-ca do not apply with --ray: {PLAINTEXT}. "
                           f"Terminate TLS in front of it (a load balancer or mesh) and pass --insecure")
    if not config.insecure:
        raise StartupError(f"refusing to start on Ray without --insecure: {PLAINTEXT}. Terminate TLS in front of "
                           f"it (a load balancer or mesh) and pass --insecure to say that you did")
    if config.host != ServerConfig.host:
        raise StartupError(f"--host does not apply with --ray: {PLAINTEXT}")
    if not 0 < config.port < 65536:
        raise StartupError(f"--ray needs a fixed --port for Serve's gRPC ingress, got {config.port}")
    try:
        config.check()
        Authenticator(config.auth_tokens)
    except (ConfigError, TokenFileError) as err:
        raise StartupError(str(err)) from None


def app_args(config: ServerConfig, options: RayOptions, log_format: str,
             pipeline_overrides: dict[str, Any]) -> dict[str, Any]:
    """`build_app`'s args for these settings: what the Serve config file's `args` would say."""
    core = {f.name: getattr(config, f.name) for f in dataclasses.fields(CoreConfig)}
    return dict(pipeline={k: v for k, v in pipeline_overrides.items() if v is not None}, core=core,
                auth_tokens=os.path.abspath(config.auth_tokens) if config.auth_tokens else None,
                warmup=config.warmup, log_format=log_format, replicas=options.replicas,
                min_replicas=options.min_replicas, max_replicas=options.max_replicas, grace_s=config.grace_s)


def run_ray(config_path: str | None, config: ServerConfig, options: RayOptions, log_format: str = "json",
            **pipeline_overrides: Any) -> int:
    logs.configure(log_format)
    check(config)
    try:
        import ray
        from ray import serve
        from ray.serve.config import HTTPOptions, gRPCOptions

        from .ray_app import APP_NAME, LOGGING, PROXY_LOCATION, ROUTE_PREFIX, SERVICER_FUNCTIONS, build_app
    except ModuleNotFoundError as err:
        raise StartupError(f"--ray needs Ray Serve (missing module {err.name!r}): "
                           f"pip install 'palette[ray]'") from None
    args = app_args(config, options, log_format, pipeline_overrides)
    args["config"] = os.path.abspath(config_path) if config_path else None
    try:
        application = build_app(args)
    except ValueError as err:
        raise StartupError(str(err)) from None

    local = options.address is None
    if local:
        # The proxy's message limit is an environment variable read where the proxy starts.
        os.environ.setdefault("RAY_SERVE_GRPC_MAX_MESSAGE_SIZE", str(config.max_message_bytes))
    else:
        # Clusters of Ray 2.60 want a token (~/.ray/auth_token or $RAY_AUTH_TOKEN), but a driver that joins
        # one by its address sends none unless told to.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # Serve's progress lines; ours say the same
    try:
        ray.init(address="local" if local else options.address, include_dashboard=False if local else None,
                 log_to_driver=False, logging_level=logging.WARNING)
    except (ConnectionError, ValueError, RuntimeError) as err:
        hint = "" if local else (" (a cluster that wants a token needs ~/.ray/auth_token or $RAY_AUTH_TOKEN here; "
                                 "one started without authentication needs RAY_AUTH_MODE=disabled)")
        raise StartupError(f"cannot {'start' if local else 'join'} Ray: {err}{hint}") from None
    wait_for_signal = handle_stop_signals()
    try:
        serve.start(proxy_location=PROXY_LOCATION, http_options=HTTPOptions(host="0.0.0.0", port=options.http_port),
                    grpc_options=gRPCOptions(port=config.port, grpc_servicer_functions=list(SERVICER_FUNCTIONS)))
        _check_ingress(config.port, SERVICER_FUNCTIONS)
        log.info("deploying", extra={"application": APP_NAME, "replicas": options.replicas,
                                     "min_replicas": options.min_replicas, "max_replicas": options.max_replicas})
        serve.run(application, name=APP_NAME, route_prefix=ROUTE_PREFIX, logging_config=LOGGING)
        low, high = options.min_replicas or options.replicas, options.max_replicas or options.replicas
        scaling = f"{low}..{high} replicas" if low != high else f"{low} replica{'s' if low > 1 else ''}"
        log.info(f"palette: serving on 0.0.0.0:{config.port} through Ray Serve ({scaling}; plaintext on every "
                 f"interface of every node); Ctrl-C or SIGTERM to stop")
        log.info("received %s: draining for up to %.0f s", wait_for_signal(), config.grace_s)
        serve.delete(APP_NAME)
        if local:
            serve.shutdown()
        log.info("stopped")
        return 0
    finally:
        ray.shutdown()


def _check_ingress(port: int, servicers: tuple[str, ...]) -> None:
    """Serve keeps the gRPC options of the first `serve.start` on a cluster: say so if they are not ours."""
    from ray.serve.context import _get_global_client

    try:
        grpc = _get_global_client().get_serve_details().get("grpc_options", {})
    except Exception:  # noqa: BLE001 - a private API; the check is a courtesy
        return
    if grpc.get("port") != port or list(grpc.get("grpc_servicer_functions") or ()) != list(servicers):
        raise StartupError(f"Serve already runs on this cluster with other gRPC options ({grpc}); deploy with "
                           f"deploy/serve_config.yaml, or start Serve with port {port} and {list(servicers)}")
