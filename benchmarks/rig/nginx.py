"""The native upstream: Debian's nginx serving the mock's answers from memory.

Why: with the python mock as the upstream, the direct rows measure the mock, and on two
cores the mock (beside the load generator) caps what any target behind it can show. nginx
answering canned bytes sustains many times the gateway's ceiling, so the throughput rows
measure the gateway and its peers, not the upstream.

One URL has to serve every target: a peer is given one upstream base URL and sends every
call there, with the same body as everyone else but for `stream`. nginx cannot branch on a
body before reading it, so the config has two hops inside one nginx process:

1. the public server proxies every POST /v1/chat/completions to an inner server (one
   keep-alive pool), and adds the header `X-Canned`, computed by a `map` over
   `$request_body` (which the proxy module has read by the time it builds the request):
   `paced` when the body carries the paced marker, `sse` when it says `"stream": true`,
   else `plain`;
2. the inner server answers `plain` with `return 200 <chat.completion JSON>` and `sse` with
   `return 200 <SSE body>` (the body is longer than one config token may be, so it is a
   concatenation of `set` variables), and proxies `paced` to the python mock that paces its
   tokens (`X-Accel-Buffering: no`, so neither hop buffers the stream).

The canned bytes are what the project's mock answers to the benchmark's 1 KB request
(fetched from it at start, with `x-mock-token-delay: 0`): a chat.completion with 64 tokens of
content and `usage`, and a stream of a role event, 64 token events, a finish event, a usage
event and `data: [DONE]`. The gateway's metering reads them as it reads the mock's.
"""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
from pathlib import Path

from rig.client import HOST, PACED_MARKER, PATH, body_bytes
from rig.procs import Proc, free_port, spawn

PACKAGE = "nginx-light"
SET_CHUNK = 3000  # characters per `set` value: one config token must fit nginx's 4 KB buffer


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/sbin/nginx") if Path(p).exists()), None
    )


def nginx_version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    match = re.search(r"nginx/(\S+)", done.stdout + done.stderr)
    return f"nginx {match.group(1)}" if match else "nginx"


def canned_answers(mock_port: int) -> tuple[bytes, bytes]:
    """(chat.completion JSON, SSE body) as the mock answers the benchmark's 1 KB request."""
    answers = []
    for stream in (False, True):
        body = json.loads(body_bytes("mock-model", stream))
        if stream:
            body["stream_options"] = {"include_usage": True}
        conn = http.client.HTTPConnection(HOST, mock_port, timeout=10.0)
        try:
            headers = {"Content-Type": "application/json", "x-mock-token-delay": "0"}
            conn.request("POST", PATH, json.dumps(body), headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        if response.status != 200:
            raise RuntimeError(f"the mock refused the canned request: {response.status} {raw!r}")
        answers.append(raw)
    return answers[0], answers[1]


def _quoted(text: str) -> str:
    """An nginx single-quoted string of `text` (no variables: `$` is refused)."""
    if "$" in text:
        raise ValueError("a canned answer must not contain '$' (nginx would expand it)")
    escaped = text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")
    return "'" + escaped.replace("\r", "\\r") + "'"


def nginx_config(
    root: Path, port: int, inner_port: int, paced_port: int, plain: bytes, sse: bytes
) -> str:
    """The whole nginx.conf: foreground, one process, everything under ROOT, logs off."""
    sse_text = sse.decode()
    parts = [sse_text[i : i + SET_CHUNK] for i in range(0, len(sse_text), SET_CHUNK)]
    sets = "\n".join(f"      set $sse{i} {_quoted(p)};" for i, p in enumerate(parts))
    joined = "".join(f"$sse{i}" for i in range(len(parts)))
    temp = " ".join(
        f"{kind}_temp_path {root / kind};" for kind in ("client_body", "proxy", "fastcgi")
    )
    temp += f" uwsgi_temp_path {root / 'uwsgi'}; scgi_temp_path {root / 'scgi'};"
    keep = 'proxy_http_version 1.1; proxy_set_header Connection "";'
    return f"""\
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 16384;
pcre_jit on;
pid {root / "nginx.pid"};
error_log {root / "error.log"} warn;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  server_tokens off;
  {temp}
  client_body_buffer_size 1m;  # bodies stay in memory, so $request_body is set
  client_max_body_size 16m;
  keepalive_requests 100000000;
  keepalive_timeout 300s;
  proxy_buffers 16 16k;
  proxy_buffer_size 16k;
  map $request_body $canned {{
    "~{PACED_MARKER}" paced;
    "~\\"stream\\"\\s*:\\s*true" sse;
    default plain;
  }}
  upstream inner {{ server {HOST}:{inner_port}; keepalive 256; }}
  upstream paced {{ server {HOST}:{paced_port}; keepalive 64; }}
  server {{
    listen {HOST}:{port} backlog=4096;
    location = /healthz {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
    location = {PATH} {{
      {keep}
      proxy_set_header X-Canned $canned;
      proxy_pass http://inner;
    }}
  }}
  server {{
    listen {HOST}:{inner_port} backlog=4096;
    location = {PATH} {{
      if ($http_x_canned = paced) {{ rewrite ^ /_paced last; }}
      if ($http_x_canned = sse) {{ rewrite ^ /_sse last; }}
      default_type application/json;
      return 200 {_quoted(plain.decode())};
    }}
    location = /_sse {{
      internal;
      default_type text/event-stream;
{sets}
      return 200 "{joined}";
    }}
    location = /_paced {{
      internal;
      add_header X-Accel-Buffering no;
      proxy_buffering off;
      {keep}
      proxy_set_header X-Canned "";
      proxy_pass http://paced{PATH};
    }}
  }}
}}
"""


def start_nginx(
    binary: str, workdir: Path, pin: list[str], paced_port: int, plain: bytes, sse: bytes
) -> Proc:
    """nginx in the foreground with WORKDIR/nginx/nginx.conf; its port is the public one."""
    root = workdir / "nginx"
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (root / kind).mkdir(parents=True, exist_ok=True)
    port, inner = free_port(), free_port()
    conf = root / "nginx.conf"
    conf.write_text(nginx_config(root, port, inner, paced_port, plain, sse))
    argv = [*pin, binary, "-p", str(root), "-e", str(root / "error.log"), "-c", str(conf)]
    return spawn("nginx", argv, port, workdir, {})
