"""The clients the interop suite drives: plain HTTP (aiohttp), the OpenAI Python SDK and the
OpenAI Node SDK (a small .mjs script run with node, written next to its node_modules).

Each takes a batch of calls and answers, per call, either the raw reply (status, headers and
the body's bytes as they came off the wire, the SDK's own way of reading them) or, in
"parsed" mode, what the SDK made of it (a JSON-able object; a list of chunks for a stream).
The same client makes the direct call and the call through the gateway, so the two replies
can be compared byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import openai
from openai import AsyncOpenAI

__all__ = ["CLIENTS", "Call", "Reply", "run_calls"]

CLIENTS = ["http", "openai-python", "openai-node"]
Kind = Literal["chat", "completions"]
PATHS = {"chat": "/chat/completions", "completions": "/completions"}
TIMEOUT = 60.0


@dataclass
class Call:
    base: str  # ends in /v1
    key: str
    kind: Kind
    body: dict[str, Any]
    mode: Literal["raw", "parsed"] = "raw"
    # Only the plain HTTP client sends exactly these (None: no Content-Type at all).
    content_type: str | None = "application/json"


@dataclass
class Reply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    body: bytes = b""
    parsed: Any = None

    def json(self) -> Any:
        return json.loads(self.body)


async def _http(calls: list[Call]) -> list[Reply]:
    out = []
    timeout = aiohttp.ClientTimeout(total=TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for call in calls:
            headers = {"Authorization": f"Bearer {call.key}"}
            skip = []
            if call.content_type is None:
                skip.append("Content-Type")
            else:
                headers["Content-Type"] = call.content_type
            data = json.dumps(call.body).encode()
            async with session.post(
                call.base + PATHS[call.kind], data=data, headers=headers, skip_auto_headers=skip
            ) as resp:
                raw = await resp.read()
                reply = Reply(resp.status, {k.lower(): v for k, v in resp.headers.items()}, raw)
            if call.mode == "parsed":
                reply.parsed = _parse_raw(raw, call.body.get("stream") is True)
            out.append(reply)
    return out


def _parse_raw(raw: bytes, stream: bool) -> Any:
    if not stream:
        return json.loads(raw)
    events = [e for e in raw.replace(b"\r\n", b"\n").split(b"\n\n") if e.strip()]
    return [json.loads(e[len(b"data: ") :]) for e in events if e != b"data: [DONE]"]


async def _python(calls: list[Call]) -> list[Reply]:
    out = []
    for call in calls:
        sdk = AsyncOpenAI(base_url=call.base, api_key=call.key, max_retries=0, timeout=TIMEOUT)
        resource: Any = sdk.chat.completions if call.kind == "chat" else sdk.completions
        try:
            if call.mode == "raw":
                async with resource.with_streaming_response.create(**call.body) as resp:
                    raw = await resp.read()
                    headers = {k.lower(): v for k, v in resp.headers.items()}
                    out.append(Reply(resp.status_code, headers, raw))
            else:
                result = await resource.create(**call.body)
                if call.body.get("stream") is True:
                    parsed: Any = [chunk.to_dict() async for chunk in result]
                else:
                    parsed = result.to_dict()
                out.append(Reply(200, parsed=parsed))
        except openai.APIStatusError as exc:
            headers = {k.lower(): v for k, v in exc.response.headers.items()}
            out.append(Reply(exc.status_code, headers, exc.response.content, parsed=exc.body))
        finally:
            await sdk.close()
    return out


NODE_SCRIPT = r"""
import OpenAI from "openai";

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const calls = JSON.parse(Buffer.concat(chunks).toString("utf8"));
const out = [];
for (const call of calls) {
  const options = { baseURL: call.base, apiKey: call.key, maxRetries: 0, timeout: 60000 };
  const client = new OpenAI(options);
  const resource = call.kind === "chat" ? client.chat.completions : client.completions;
  try {
    if (call.mode === "raw") {
      const resp = await resource.create(call.body).asResponse();
      const body = Buffer.from(await resp.arrayBuffer()).toString("base64");
      out.push({ status: resp.status, headers: Object.fromEntries(resp.headers), body });
    } else {
      const result = await resource.create(call.body);
      let parsed = result;
      if (call.body.stream === true) {
        parsed = [];
        for await (const chunk of result) parsed.push(chunk);
      }
      out.push({ status: 200, parsed });
    }
  } catch (err) {
    if (err instanceof OpenAI.APIError && err.status !== undefined) {
      const headers = err.headers ? Object.fromEntries(err.headers) : {};
      out.push({ status: err.status, headers, parsed: err.error ?? null, error: String(err) });
    } else {
      out.push({ status: 0, exception: String(err && err.stack || err) });
    }
  }
}
process.stdout.write(JSON.stringify(out));
"""


async def _node(calls: list[Call], node: str, folder: Path) -> list[Reply]:
    # The script sits beside node_modules/ so that `import "openai"` resolves there.
    script = folder / f"interop-client-{os.getpid()}-{uuid.uuid4().hex[:8]}.mjs"
    script.write_text(NODE_SCRIPT)
    try:
        payload = [
            {"base": c.base, "key": c.key, "kind": c.kind, "body": c.body, "mode": c.mode}
            for c in calls
        ]
        proc = await asyncio.create_subprocess_exec(
            node,
            str(script),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=folder,
        )
        try:
            stdout, stderr = await asyncio.wait_for(
                proc.communicate(json.dumps(payload).encode()), TIMEOUT * len(calls) + 30
            )
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    finally:
        script.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"node exited {proc.returncode}: {stderr.decode(errors='replace')}")
    replies = []
    for item in json.loads(stdout):
        if "exception" in item:
            raise RuntimeError(f"the Node SDK failed: {item['exception']}")
        body = item.get("body")
        replies.append(
            Reply(
                item["status"],
                {k.lower(): v for k, v in item.get("headers", {}).items()},
                base64.b64decode(body) if body is not None else b"",
                item.get("parsed"),
            )
        )
    return replies


async def run_calls(
    client: str, calls: list[Call], node: tuple[str, Path] | None = None
) -> list[Reply]:
    """Make `calls` in order with `client`; `node` is (node binary, folder with node_modules)."""
    if client == "http":
        return await _http(calls)
    if client == "openai-python":
        return await _python(calls)
    if client == "openai-node":
        assert node is not None
        return await _node(calls, *node)
    raise ValueError(client)
