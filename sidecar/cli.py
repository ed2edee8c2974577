"""``sidecar run`` / ``sidecar validate`` (docs/operations.md, "Command line").

Exit codes: 0 clean shutdown, 2 bad config or usage, 1 anything else.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from .config import (
    DEFAULT_CONFIG_PATH,
    Config,
    ConfigError,
    HostPort,
    admin_exposure_warning,
    load_config,
    parse_host_port,
)

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"sidecar: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _address(value: str) -> HostPort:
    try:
        return parse_host_port(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}")
    return number


def _admin_address(value: str) -> HostPort | None:
    return None if value == "off" else _address(value)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sidecar", description="Outbound HTTP proxy with bounded per-upstream pools.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    config_help = f"config file (default: $SIDECAR_CONFIG, else {DEFAULT_CONFIG_PATH})"

    run = commands.add_parser("run", help="run the sidecar")
    run.add_argument("-c", "--config", help=config_help)
    run.add_argument("--listen", type=_address, metavar="HOST:PORT", help="proxy listen address")
    run.add_argument(
        "--admin", type=_admin_address, default=argparse.SUPPRESS, metavar="HOST:PORT|off", help="admin listen address"
    )
    run.add_argument(
        "--workers", type=_positive_int, metavar="N", help="processes sharing the listen port (default: config workers)"
    )
    run.add_argument("--log-format", choices=("json", "console"), help="default: console on a TTY, else json")
    run.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))

    validate = commands.add_parser("validate", help="check a config file and print a summary")
    validate.add_argument("-c", "--config", help=config_help)
    return parser


def config_path(given: str | None) -> str:
    return given or os.environ.get("SIDECAR_CONFIG") or DEFAULT_CONFIG_PATH


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    path = config_path(args.config)
    try:
        config = load_config(path)
    except ConfigError as error:
        print(f"sidecar: invalid config: {error}", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "validate":
        try:
            print(summary(config), flush=True)
        except BrokenPipeError:
            # `sidecar validate | head`: the reader had what it wanted. Point
            # stdout at /dev/null so the interpreter's final flush stays quiet.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    return run(config, args)


def summary(config: Config) -> str:
    lines = [f"{config.source}: OK", f"listen {config.listen}", f"admin {config.admin.listen or 'off'}"]
    for upstream in config.upstreams:
        limits = upstream.limits
        hosts = f" hosts={','.join(upstream.route.hosts)}" if upstream.route.hosts else ""
        lines.append(
            f"upstream {upstream.name}: {upstream.route.path_prefix}{hosts} -> {upstream.url} "
            f"http2={upstream.http2.value} max_connections={limits.max_connections} "
            f"max_concurrent_requests={limits.max_concurrent_requests} max_pending={limits.max_pending} "
            f"pool_timeout={upstream.timeouts.pool:g}s"
        )
    lines.extend(f"warning: {warning}" for warning in config.warnings)
    return "\n".join(lines)


def run(config: Config, args: argparse.Namespace) -> int:
    from .logs import configure_logging

    workers = args.workers or config.workers
    if workers > 1:
        from .workers import check_divisible

        try:
            check_divisible(config, workers)
        except ConfigError as error:
            print(f"sidecar: invalid config: {error}", file=sys.stderr)
            return EXIT_USAGE
    configure_logging(args.log_format, args.log_level)
    admin: HostPort | str | None = getattr(args, "admin", "config")
    if workers == 1:
        return _serve(config, args.listen, admin, None)
    return _run_workers(config, args.listen or config.listen, admin, workers)


def _serve(
    config: Config,
    listen: HostPort | None,
    admin: HostPort | str | None,
    shape: Callable[[Config], Config] | None,
    *,
    worker: int = 0,
    admin_socket: str | None = None,
) -> int:
    from .compat import IncompatibleLibrary
    from .runtime import run
    from .server import Sidecar

    sidecar = Sidecar(config, listen=listen, admin=admin, shape=shape, worker=worker, admin_socket=admin_socket)
    try:
        return run(sidecar, supervised=shape is not None)
    except ConfigError as error:  # valid YAML, but a pool cannot be opened (e.g. a bad CA file)
        print(f"sidecar: invalid config: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, IncompatibleLibrary) as exc:
        print(f"sidecar: cannot start: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_OK


def _run_workers(config: Config, listen: HostPort, admin: HostPort | str | None, workers: int) -> int:
    import shutil
    import tempfile

    from .hostadmin import HostAdmin
    from .logs import get_logger
    from .server import bind_listener
    from .workers import reserve_port, supervise, worker_admin, worker_config

    address = config.admin.listen if isinstance(admin, str) else admin
    host_admin: HostAdmin | None = None
    sockets: list[str] = []
    private = None
    try:
        reserved, listen = reserve_port(listen)
    except OSError as exc:
        print(f"sidecar: cannot start: {exc}", file=sys.stderr)
        return EXIT_ERROR
    try:
        if address is not None and not config.admin.per_worker:
            # Bound before any worker exists, so a taken admin port fails the start.
            listener = bind_listener(address)
            # The workers' admin sockets: in a directory only this user may enter.
            private = tempfile.mkdtemp(prefix="sidecar-admin-")
            sockets = [os.path.join(private, f"worker-{index}.sock") for index in range(workers)]
            bound = f"{address.host}:{listener.getsockname()[1]}"
            host_admin = HostAdmin(listener, sockets, bound)
    except OSError as exc:
        reserved.close()
        print(f"sidecar: cannot start: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if host_admin is not None and address is not None:
        log = get_logger("sidecar.workers")
        log.info("admin_listening", admin=host_admin.address, workers=workers, pid=os.getpid())
        if address != config.admin.listen:
            # --admin overrode the config file: judge the address actually bound.
            exposed = admin_exposure_warning(address, config.admin.token)
            if exposed is not None:
                log.warning("config_warning", message=exposed)

    def run_worker(index: int) -> int:
        import structlog

        reserved.close()
        if host_admin is not None:
            host_admin.close_listener()  # the supervisor's alone
        # Every event of this process says which worker wrote it.
        structlog.contextvars.bind_contextvars(worker=index)

        def shape(loaded: Config) -> Config:
            return worker_config(loaded, workers, index)

        if host_admin is not None:
            return _serve(shape(config), listen, None, shape, worker=index, admin_socket=sockets[index])
        # admin.per_worker: every worker has its own admin listener, base port + index.
        return _serve(shape(config), listen, worker_admin(config, admin, index), shape, worker=index)

    def shutdown_timeout() -> float:
        # Workers reload the file on their own: judge by the file as it is
        # now, never by less than the budget they started with.
        try:
            return max(config.shutdown_timeout, load_config(config.source).shutdown_timeout)
        except ConfigError:
            return config.shutdown_timeout

    try:
        with reserved:
            return supervise(workers, run_worker, shutdown_timeout, host_admin)
    finally:
        if host_admin is not None:
            host_admin.stop()
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)
