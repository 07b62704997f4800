"""The `palette` command: serve, generate, rank, info; train and eval hand over to palette.training."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from .events import Done, GeneratedImage, PaletteError, Preview, Progress, RankDone, Score
from .sync import DEFAULT_TARGET, PaletteClient

SERVER_EXTRA_HINT = (
    "`palette serve` needs the server dependencies, which the client install leaves out.\n"
    "Install them with:  pip install 'palette[server]'   (from a checkout: pip install -e '.[server]')")
SERVER_MODULES = {"jax", "jaxlib", "flax", "numpy", "msgpack", "transformers", "tokenizers", "ftfy", "emoji",
                  "unidecode", "prometheus_client", "grpc_health", "grpc_reflection", "optax", "huggingface_hub"}


def _server_arg(parser: argparse.ArgumentParser, top_level: bool = False) -> None:
    """How to reach the server, accepted before the command (`palette --server H:P info`) and after it;
    the command's copies default to SUPPRESS so that they do not overwrite the top-level values."""
    def default(value):
        return value if top_level else argparse.SUPPRESS

    parser.add_argument("--server", default=default(os.environ.get("PALETTE_SERVER", DEFAULT_TARGET)),
                        help=f"server address host:port (default: $PALETTE_SERVER or {DEFAULT_TARGET})")
    parser.add_argument("--timeout", type=float, default=default(None), help="give up after this many seconds")
    parser.add_argument("--tls", action="store_true", default=default(False),
                        help="connect with TLS, trusting the system's CA certificates")
    parser.add_argument("--tls-ca", metavar="FILE", default=default(None),
                        help="connect with TLS, trusting the CA certificate(s) in this PEM file")
    parser.add_argument("--tls-cert", metavar="FILE", default=default(None),
                        help="client certificate (PEM) for a server that requires one (mTLS); with --tls-key")
    parser.add_argument("--tls-key", metavar="FILE", default=default(None), help="the client certificate's key")
    parser.add_argument("--token", default=default(None),
                        help="bearer token for a server started with --auth-tokens (default: $PALETTE_TOKEN)")


def connect(args: argparse.Namespace) -> PaletteClient:
    return PaletteClient(args.server, timeout=args.timeout, tls=args.tls, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
                         tls_key=args.tls_key, token=args.token)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="palette", description="Text-to-image generation server and client.",
        epilog="Also: `palette train default|vqgan|dallebart|clip ...` and `palette eval ...` (the training side; "
               "see `palette train --help`).")
    _server_arg(parser, top_level=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the model server (needs the server extra)")
    p.add_argument("--config", help="pipeline config TOML (default: the embedded default model set)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="gRPC port (default %(default)s; 0 = any free port)")
    p.add_argument("--metrics-port", type=int, default=9464,
                   help="Prometheus /metrics HTTP port (default %(default)s; 0 = any free port)")
    p.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    p.add_argument("--http-port", type=int, metavar="PORT",
                   help="also serve the web page at / and the API over Connect, gRPC-Web and JSON on this port "
                        "(off unless given; same --host, TLS and tokens as the gRPC port; 0 = any free port)")
    p.add_argument("--num-slots", type=int, help="sampler rows decoded together (overrides the config)")
    p.add_argument("--chunk-steps", type=int, help="tokens per sampler step (overrides the config)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="Generate requests that may wait for rows before RESOURCE_EXHAUSTED (default %(default)s)")
    p.add_argument("--max-wait-ms", type=float, default=10.0,
                   help="how long an idle sampler waits to batch arrivals together (default %(default)s)")
    p.add_argument("--grace-s", type=float, default=30.0,
                   help="on SIGTERM, how long in-flight requests may take to finish (default %(default)s)")
    p.add_argument("--no-warmup", action="store_true", help="skip compiling the common shapes before listening")
    p.add_argument("--log-format", choices=("json", "text"), default="json", help="log line format")
    g = p.add_argument_group("security (see README: Deploying)")
    g.add_argument("--tls-cert", metavar="FILE", help="serve TLS only, with this certificate chain (PEM)")
    g.add_argument("--tls-key", metavar="FILE", help="the certificate's private key (PEM)")
    g.add_argument("--tls-client-ca", metavar="FILE",
                   help="also require client certificates signed by this CA (mTLS); the subject is the caller")
    g.add_argument("--auth-tokens", metavar="FILE",
                   help="require 'authorization: Bearer <token>'; one name:token[:weight] per line, # comments")
    g.add_argument("--insecure", action="store_true",
                   help="allow plaintext on a non-loopback --host (only behind a proxy or mesh that does TLS)")
    g = p.add_argument_group("scaling out on Ray Serve (see README: Scaling out; needs palette[ray])")
    g.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve's gRPC ingress on --port, on replicas Ray places and restarts "
                        "(plaintext on every interface: needs --insecure)")
    g.add_argument("--ray-address", metavar="ADDR",
                   help="join this Ray cluster (its GCS host:port, or 'auto') instead of starting a local Ray")
    g.add_argument("--replicas", type=int, default=1, help="replicas, each a whole pipeline (default %(default)s)")
    g.add_argument("--min-replicas", type=int, help="autoscale between --min-replicas and --max-replicas")
    g.add_argument("--max-replicas", type=int, help="autoscale between --min-replicas and --max-replicas")
    g.add_argument("--ray-http-port", type=int, default=8000,
                   help="Serve's HTTP proxy, which Ray always runs (default %(default)s)")
    g = p.add_argument_group("limits")
    g.add_argument("--max-queue-per-caller", type=int,
                   help="Generate requests one caller may have waiting (default: half of --max-queue when callers "
                        "are authenticated, else no separate limit)")
    g.add_argument("--max-message-bytes", type=int, default=33 * 1024 * 1024,
                   help="largest message a client may send (default %(default)s)")
    g.add_argument("--max-streams-per-connection", type=int, default=64,
                   help="concurrent calls on one client connection (default %(default)s)")
    g.add_argument("--max-rank-image-bytes", type=int, default=16 * 1024 * 1024,
                   help="largest image a Rank call may upload (default %(default)s)")
    g.add_argument("--max-rank-call-bytes", type=int, default=32 * 1024 * 1024,
                   help="all images of one Rank call together (default %(default)s)")

    p = sub.add_parser("generate", help="generate images for a prompt")
    p.add_argument("prompt")
    p.add_argument("-n", "--num-images", type=int, default=4, help="how many images (default %(default)s)")
    p.add_argument("--out", default="out", help="folder for the images and the grid (default %(default)s)")
    p.add_argument("--rank", action="store_true", help="CLIP-rank the images (the grid shows them best first)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image (default: random)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (default: the model's, see `info`)")
    p.add_argument("--top-p", type=float, help="nucleus sampling, in (0, 1]")
    p.add_argument("--temperature", type=float, help="sampling temperature, > 0 (default: the server's, see `info`)")
    p.add_argument("--condition-scale", type=float, help="super-conditioning scale (default: the server's, see `info`)")
    p.add_argument("--format", choices=("png", "jpeg", "webp"), default="png", help="image format")
    p.add_argument("--quality", type=int, default=0, help="JPEG/WebP quality 1..100 (default 90)")
    p.add_argument("--preview-every", type=int, default=0,
                   help="save a partial image every K tokens into OUT/previews (default: off)")
    p.add_argument("--no-grid", action="store_true", help="do not write grid.png")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _server_arg(p)

    p = sub.add_parser("rank", help="CLIP-score images against a prompt, best first")
    p.add_argument("prompt")
    p.add_argument("images", nargs="+", metavar="IMG", help="image files")
    p.add_argument("--json", action="store_true", help="print JSON")
    _server_arg(p)

    p = sub.add_parser("info", help="show the server's stages, devices and limits")
    p.add_argument("--json", action="store_true", help="print JSON")
    _server_arg(p)
    return parser


TRAINING_COMMANDS = ("train", "eval")


def _report_missing_server_extra(err: ModuleNotFoundError) -> bool:
    """True, after saying how to install it, when `err` is a server-extra module a client install lacks."""
    if (err.name or "").split(".")[0] not in SERVER_MODULES:
        return False
    print(f"palette: error: missing module {err.name!r}.\n{SERVER_EXTRA_HINT}", file=sys.stderr)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINING_COMMANDS:
        # Training has its own parser and needs the server extra (jax, optax); imported only here.
        try:
            from palette.training.cli import main as training_main
        except ModuleNotFoundError as err:
            if _report_missing_server_extra(err):
                return 2
            raise
        return training_main(argv)
    args = build_parser().parse_args(argv)
    try:
        return {"serve": cmd_serve, "generate": cmd_generate, "rank": cmd_rank, "info": cmd_info}[args.command](args)
    except PaletteError as err:
        print(f"palette: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("palette: interrupted", file=sys.stderr)
        return 130


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from palette.server.main import run
        from palette.server.service import ServerConfig  # noqa: F401 - a client install fails here, with the hint
    except ModuleNotFoundError as err:
        if _report_missing_server_extra(err):
            return 2
        raise
    from palette.server.main import StartupError

    config = server_config(args)
    try:
        if args.ray or args.ray_address:
            from palette.server.ray_main import run_ray

            return run_ray(args.config, config, ray_options(args), log_format=args.log_format,
                           num_slots=args.num_slots, chunk_steps=args.chunk_steps)
        return run(args.config, config, log_format=args.log_format, num_slots=args.num_slots,
                   chunk_steps=args.chunk_steps)
    except StartupError as err:
        print(f"palette: error: {err}", file=sys.stderr)
        return 1


def server_config(args: argparse.Namespace) -> "ServerConfig":  # noqa: F821
    """`palette serve`'s settings (with or without --ray) from its flags."""
    from palette.server.service import ServerConfig

    per_caller = args.max_queue_per_caller
    if per_caller is None:
        per_caller = max(1, args.max_queue // 2) if (args.auth_tokens or args.tls_client_ca) else 0
    return ServerConfig(host=args.host, port=args.port, metrics_port=None if args.no_metrics else args.metrics_port,
                        http_port=args.http_port, max_queued_requests=args.max_queue, max_queued_per_caller=per_caller,
                        max_wait_ms=args.max_wait_ms, grace_s=args.grace_s, warmup=not args.no_warmup,
                        tls_cert=args.tls_cert, tls_key=args.tls_key, tls_client_ca=args.tls_client_ca,
                        auth_tokens=args.auth_tokens, insecure=args.insecure,
                        max_message_bytes=args.max_message_bytes,
                        max_streams_per_connection=args.max_streams_per_connection,
                        max_rank_image_bytes=args.max_rank_image_bytes, max_rank_call_bytes=args.max_rank_call_bytes)


def ray_options(args: argparse.Namespace) -> "RayOptions":  # noqa: F821
    from palette.server.ray_main import RayOptions

    return RayOptions(address=args.ray_address, replicas=args.replicas, min_replicas=args.min_replicas,
                      max_replicas=args.max_replicas, http_port=args.ray_http_port)


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.preview_every:
        (out / "previews").mkdir(exist_ok=True)
    images: list[GeneratedImage] = []
    done: Done | None = None
    bar = None
    with connect(args) as client:
        call = client.generate(args.prompt, args.num_images, seed=args.seed, top_k=args.top_k, top_p=args.top_p,
                               temperature=args.temperature, condition_scale=args.condition_scale, rank=args.rank,
                               format=args.format, quality=args.quality, preview_every=args.preview_every)
        try:
            for event in call:
                if isinstance(event, Progress):
                    if bar is None:
                        bar = tqdm(total=event.tokens_total, unit="tok", desc="sampling", disable=args.quiet,
                                   file=sys.stderr)
                    bar.update(event.tokens_done - bar.n)
                    bar.set_postfix(images=f"{len(images)}/{args.num_images}", queued=event.images_queued)
                elif isinstance(event, Preview):
                    event.save(out / "previews" / f"{event.index:02d}-{event.tokens_done:04d}{event.extension}")
                elif isinstance(event, GeneratedImage):
                    path = out / f"{event.index:02d}-seed{event.seed}{event.extension}"
                    event.save(path)
                    images.append(event)
                    if bar is not None:
                        bar.set_postfix(images=f"{len(images)}/{args.num_images}")
                    message = f"wrote {path}" + (f"  score {event.score:.4f}" if event.score is not None else "")
                    (bar.write if bar is not None else print)(message, file=sys.stderr)
                elif isinstance(event, Done):
                    done = event
        finally:
            if bar is not None:
                bar.close()
    if done is None:
        print("palette: error: the server ended the stream without finishing", file=sys.stderr)
        return 1
    by_index = {im.index: im for im in images}
    order = [by_index[i] for i in done.ranked_indices] if done.ranked_indices else sorted(images, key=lambda m: m.index)
    if not args.no_grid:
        from .sheet import contact_sheet

        grid = out / "grid.png"
        contact_sheet(order, title=args.prompt).save(grid)
        print(f"wrote {grid}", file=sys.stderr)
    if done.ranked_indices:
        print("best first:")
        for rank, im in enumerate(order, 1):
            print(f"  {rank:2d}. #{im.index:<2d} seed {im.seed:<10d} score {im.score:.4f}")
    print(f"{len(images)} images in {done.total_ms / 1000:.2f} s (first after {done.time_to_first_image_ms / 1000:.2f} s,"
          f" queued {done.queue_ms / 1000:.2f} s); request {done.request_id}")
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    for path in args.images:
        if not os.path.isfile(path):
            print(f"palette: error: {path}: no such file", file=sys.stderr)
            return 2
    scores: dict[int, float] = {}
    order: list[int] = []
    with connect(args) as client:
        for event in client.rank(args.prompt, args.images):
            if isinstance(event, Score):
                scores[event.index] = event.score
            elif isinstance(event, RankDone):
                order = list(event.ranked_indices)
    if args.json:
        print(json.dumps([{"rank": r, "index": i, "path": args.images[i], "score": scores[i]}
                          for r, i in enumerate(order, 1)], indent=2))
    else:
        for r, i in enumerate(order, 1):
            print(f"{r:3d}. {scores[i]:9.4f}  {args.images[i]}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with connect(args) as client:
        info = client.info()
    if args.json:
        from google.protobuf import json_format

        print(json_format.MessageToJson(info, preserving_proto_field_name=True))
        return 0
    lim = info.limits
    print(f"palette server {info.server_version} at {args.server}")
    print(f"config:  {info.config_path}")
    print(f"devices: {', '.join(info.devices)}")
    print("stages:")
    for s in info.stages:
        detail = ", ".join(x for x in (s.dtype, s.checkpoint) if x)
        print(f"  {s.name:<10} {s.kind:<14} {s.type:<22} {detail}")
    print("limits:")
    print(f"  images {lim.image_width}x{lim.image_height}, {lim.image_length} tokens; "
          f"1..{lim.max_images_per_request} per request")
    print(f"  prompt: {lim.max_prompt_chars} characters, {lim.max_prompt_tokens} tokens")
    print(f"  batching: {lim.num_slots} sampler rows, {lim.chunk_steps} tokens per step, "
          f"queue of {lim.max_queued_requests} requests")
    print(f"  sampling defaults: condition scale {lim.default_condition_scale:g}, "
          f"temperature {lim.default_temperature:g}, top-k {lim.default_top_k} (up to {lim.max_top_k})")
    print(f"  rank: {'available' if info.has_ranker else 'not available'}; up to {lim.max_rank_images} images "
          f"of {lim.max_rank_image_bytes} bytes and {lim.max_rank_image_pixels} pixels each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
