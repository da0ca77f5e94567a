"""An nginx front for `conceptlens serve` that sheds overload outside Python (docs/design.md §9.2).

Why: every call the grpc.aio server refuses still costs its one event loop a gRPC call's worth of CPU, ~0.4–0.5 ms
(`bench/grpc_floor.py`; gRPC's synchronous server refuses at ~0.17 ms), while a 1-image Predict of the default
model costs ~2.2 ms. At 4 × capacity three calls in four must be refused, which alone takes most of a core, so the
server's own admission rule (server/batching.py) cannot keep cheap calls' goodput. nginx refuses a call over a
per-method in-flight limit in C, before the backend sees it, with what the server itself would answer: status
RESOURCE_EXHAUSTED, a message naming the method and the limit, and the retry pushback trailer gRPC's retry policy
obeys (gRFC A6). Calls under the limit pass through untouched, trailers included; the server's admission still
applies to them. nginx counts a limit per HTTP/2 stream, i.e. per call.

Refused calls never reach the server, so its metrics do not count them: nginx writes one line per refusal to
`refusals.log` in its directory (time, method), which server/front_metrics.py counts for Prometheus (and the
overload benchmark adds to the server's counts when it compares them with its clients').

nginx is a system binary (e.g. Debian's nginx-light), not a Python dependency: the front is optional, for
deployments that face bursts of cheap calls; `conceptlens serve` alone keeps working without it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from conceptlens.handlers.errors import InvalidInput

SERVICE = "conceptlens.v1.ConceptLens"
METHODS = ("Predict", "Explain", "Probe", "ListModels", "GetModel")
# calls in flight per method. A 1-image Predict is mostly per-call work that batching cannot share (the default
# model's forward pass is ~1.5 ms per image at any batch size, beside ~1 ms of gRPC), so N admitted calls take
# ~N x the unloaded latency. Paired rounds (bench/front_paired.py, bench/README.md): 4 gives 0.03-0.05 more of
# the bare server's capacity under 4x overload than 3, at an admitted p99 ~0.8x unloaded higher (3-4.4x in all).
# Where calls are cheap beside the hop through nginx (1 image on a 3x faster machine) 4 keeps only 0.77 and 5 is
# needed, while 5 breaks the p99 target for heavier calls: deployments calibrate with bench/front_paired.py
DEFAULT_LIMITS = {"Predict": 4, "Explain": 4, "Probe": 8}
RESOURCE_EXHAUSTED = 8  # google.rpc.Code


@dataclass(frozen=True)
class FrontConfig:
    listen: str  # host:port the front listens on (what clients dial)
    backend: str  # host:port of `conceptlens serve`
    directory: Path  # nginx's prefix: its config, pid, temp files and refusals.log
    limits: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    retry_ms: int = 20  # the pushback a refused client waits before its retry
    max_message_mb: int = 64  # nginx's own request-body cap; the backend enforces its limits after it


def parse_limits(items: list[str]) -> dict[str, int]:
    """['Predict=16', 'probe=4'] -> {'Predict': 16, 'Probe': 4}; method names are case-insensitive."""
    limits = dict(DEFAULT_LIMITS)
    for item in items:
        name, sep, value = item.partition("=")
        method = next((m for m in METHODS if m.lower() == name.strip().lower()), None)
        if not sep or method is None:
            raise InvalidInput("--limit", f"expected METHOD=N with METHOD one of {', '.join(METHODS)}, got {item!r}")
        try:
            limits[method] = int(value)
        except ValueError:
            raise InvalidInput("--limit", f"N must be an integer, got {item!r}") from None
        if limits[method] < 1:
            raise InvalidInput("--limit", f"N must be >= 1, got {item!r}")
    return limits


def split_address(text: str, field_name: str) -> tuple[str, int]:
    """'HOST:PORT' -> (host, port), or InvalidInput naming `field_name`."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInput(field_name, f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def render(cfg: FrontConfig) -> str:
    """The nginx.conf of the front."""
    split_address(cfg.listen, "--listen")  # validated here, so nginx never sees a malformed address
    split_address(cfg.backend, "--backend")
    listen, backend = cfg.listen, cfg.backend
    d = Path(cfg.directory).resolve()
    zones, locations = [], []
    for method, limit in cfg.limits.items():
        zone = method.lower()
        zones.append(f"  limit_conn_zone $server_port zone={zone}:1m;")
        locations.append(f"""    location = /{SERVICE}/{method} {{
      limit_conn {zone} {limit};
      error_page 429 = @refused_{zone};
      grpc_pass grpc://backend;
    }}
    location @refused_{zone} {{
      default_type application/grpc;
      add_header grpc-status {RESOURCE_EXHAUSTED} always;
      add_header grpc-message "{method}: the front's limit of {limit} calls in flight is reached; retry later" always;
      add_header grpc-retry-pushback-ms {cfg.retry_ms} always;
      access_log {d / 'refusals.log'} refusal;
      return 204;
    }}""")
    return f"""# ConceptLens front: written by `conceptlens front` (server/front.py); regenerate rather than edit
worker_processes 1;
pid {d / 'nginx.pid'};
error_log {d / "error.log"} warn;
events {{ worker_connections 16384; }}
http {{
  access_log off;
  log_format refusal '$msec $uri';
  client_max_body_size {cfg.max_message_mb}m;
  client_body_buffer_size 1m;
  client_body_temp_path {d / 'tmp' / 'body'};
  proxy_temp_path {d / 'tmp' / 'proxy'};
  fastcgi_temp_path {d / 'tmp' / 'fastcgi'};
  uwsgi_temp_path {d / 'tmp' / 'uwsgi'};
  scgi_temp_path {d / 'tmp' / 'scgi'};
  grpc_read_timeout 1h;
  grpc_send_timeout 1h;
  # nginx closes a connection after 1000 requests by default (GOAWAY), which fails large uploads in flight on it:
  # a burst of refusals reaches that in a fraction of a second
  keepalive_requests 100000000;
  keepalive_timeout 1h;
  limit_conn_status 429;
  limit_conn_log_level info;
{chr(10).join(zones)}
  upstream backend {{
    server {backend};
    keepalive 256;
    keepalive_requests 100000000;
    keepalive_timeout 1h;
  }}
  server {{
    listen {listen} http2;
    http2_max_concurrent_streams 4096;
    # no request-body window before a call is admitted: a refused call's client never sends its images (nginx
    # would discard them, and closes a connection whose received bytes are mostly discarded as an HTTP/2 flood,
    # failing the admitted calls on it); an admitted call gets its window when nginx starts reading its body
    http2_body_preread_size 0;
{chr(10).join(locations)}
    location / {{
      grpc_pass grpc://backend;
    }}
  }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
                                          if os.access(p, os.X_OK)), None)


def write(cfg: FrontConfig) -> Path:
    """Write nginx.conf (and nginx's temp folders) into `cfg.directory`; return the config's path."""
    d = Path(cfg.directory)
    (d / "tmp").mkdir(parents=True, exist_ok=True)
    path = d / "nginx.conf"
    path.write_text(render(cfg))
    return path


def command(cfg: FrontConfig, binary: str) -> list[str]:
    """nginx in the foreground on the written config (its error log also goes to stderr)."""
    return [binary, "-p", str(Path(cfg.directory).resolve()), "-c", str(write(cfg).resolve()), "-e", "stderr",
            "-g", "daemon off;"]


def start(cfg: FrontConfig, binary: str | None = None, **popen) -> subprocess.Popen:
    """Start nginx in the foreground as a child process."""
    binary = binary or nginx_binary()
    if binary is None:
        raise InvalidInput("nginx", "no nginx binary on PATH (Debian: apt-get install nginx-light)")
    return subprocess.Popen(command(cfg, binary), **popen)
