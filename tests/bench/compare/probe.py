"""Protocol probe and readiness check for compare.sh (runs in the compare venv:
aiohttp and aio-pika come with high-templar 3.1.0).

  probe.py ready    --url WS --amqp-url U --exchange X [--timeout S]
      Waits until the gateway at WS accepts a websocket, a subscription to
      {"hot": "ready-probe"}, and delivers a trigger published to X: its
      AMQP consumer is bound. Reads replies in order (no requestId needed,
      so it works with the unpatched 3.1.0 too). Exit 0 when ready, 1 when not.

  probe.py protocol --url WS --backend-listen HOST:PORT --amqp-url U --exchange X
                    --label NAME --out FILE
      Serves a probe backend on HOST:PORT (the gateway must point its backend
      URL there) that records every request it gets and answers by token
      (?token=ok: 200 with allowed rooms; deny: 403; down: 500; redirect: 302),
      then plays a fixed list of client and publisher cases against the
      gateway and writes what came back (frames, close codes, the backend
      request, which subscriptions got which trigger) to FILE as JSON, for
      report.py to set side by side.
"""

import argparse
import asyncio
import json
import sys
import time

import aio_pika
import aiohttp
from aiohttp import web

ALLOWED = [{"customer": "*", "warehouse": "*"}, {"hot": "*"}]
READ_TIMEOUT = 1.0


# ---------------------------------------------------------------- helpers


def frame_value(msg):
    """A received websocket message as something JSON can hold."""
    if msg.type == aiohttp.WSMsgType.TEXT:
        try:
            return {"json": json.loads(msg.data), "raw": msg.data}
        except ValueError:
            return {"text": msg.data}
    if msg.type == aiohttp.WSMsgType.BINARY:
        return {"binary": msg.data.decode("utf-8", "replace")}
    if msg.type == aiohttp.WSMsgType.CLOSE:
        return {"close_frame": msg.data, "reason": msg.extra or ""}
    if msg.type in (aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
        return {"closed": "without a close frame"}
    return {"other": str(msg.type)}


async def read_frames(ws, first_timeout=READ_TIMEOUT, then=0.2, limit=50):
    """Frames until none came for a while (the first may take `first_timeout`)."""
    frames = []
    timeout = first_timeout
    while len(frames) < limit:
        try:
            msg = await asyncio.wait_for(ws.receive(), timeout)
        except asyncio.TimeoutError:
            break
        frames.append(frame_value(msg))
        if msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED,
                        aiohttp.WSMsgType.ERROR):
            break
        timeout = then
    return frames


async def connect(session, url, token=None, headers=None, path=None):
    """Opens a websocket; returns (ws or None, record)."""
    target = url if path is None else url.replace("/ws/", path)
    if token is not None:
        target += ("&" if "?" in target else "?") + "token=" + token
    try:
        ws = await session.ws_connect(target, headers=headers or {}, autoclose=True, autoping=True,
                                      timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2))
    except aiohttp.WSServerHandshakeError as e:
        return None, {"handshake_status": e.status}
    except Exception as e:  # noqa: BLE001
        # e.g. a redirect (aiohttp follows it and then gives up): show the
        # server's first answer to the upgrade request as it is.
        rec = {"handshake_error": type(e).__name__}
        try:
            upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                       "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
            http = target.replace("ws://", "http://", 1)
            async with session.get(http, headers={**(headers or {}), **upgrade}, allow_redirects=False,
                                   timeout=aiohttp.ClientTimeout(total=5)) as resp:
                rec["handshake_status"] = resp.status
                if "Location" in resp.headers:
                    rec["location"] = resp.headers["Location"]
        except Exception as e2:  # noqa: BLE001
            rec["plain_request_error"] = type(e2).__name__
        return None, rec
    return ws, {"handshake_status": 101}


async def send_and_read(ws, text):
    try:
        await ws.send_str(text)
    except Exception as e:  # noqa: BLE001
        return {"sent": text, "send_error": type(e).__name__}
    frames = await read_frames(ws)
    out = {"sent": text, "frames": frames}
    if ws.closed:
        out["close_code"] = ws.close_code
    return out


class Publisher:
    def __init__(self, amqp_url, exchange):
        self.amqp_url = amqp_url
        self.exchange_name = exchange
        self.connection = None
        self.exchange = None

    async def __aenter__(self):
        self.connection = await aio_pika.connect(self.amqp_url)
        channel = await self.connection.channel()
        self.exchange = await channel.get_exchange(self.exchange_name, ensure=True)
        return self

    async def __aexit__(self, *exc):
        await self.connection.close()

    async def publish(self, body):
        raw = body if isinstance(body, (bytes, str)) else json.dumps(body)
        if isinstance(raw, str):
            raw = raw.encode()
        await self.exchange.publish(aio_pika.Message(body=raw), routing_key="*")


# ---------------------------------------------------------------- ready


async def ready(args):
    deadline = time.monotonic() + args.timeout
    last = "not tried"
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            ws, rec = await connect(session, args.url, token="ready")
            if ws is None:
                last = "websocket: {}".format(rec)
                await asyncio.sleep(0.2)
                continue
            try:
                first = await read_frames(ws, first_timeout=5, then=0.05, limit=1)
                if not first or first[0].get("json", {}).get("is_authorized") is not True:
                    last = "not authorised: {}".format(first)
                    await asyncio.sleep(0.5)
                    continue
                await ws.send_str(json.dumps({"type": "subscribe", "room": {"hot": "ready-probe"}, "requestId": 1}))
                reply = await read_frames(ws, first_timeout=5, then=0.05, limit=1)
                if not reply or reply[0].get("json", {}).get("code") != "success":
                    last = "subscribe: {}".format(reply)
                    await asyncio.sleep(0.5)
                    continue
                while time.monotonic() < deadline:
                    try:
                        async with Publisher(args.amqp_url, args.exchange) as pub:
                            while time.monotonic() < deadline:
                                await pub.publish({"rooms": [{"hot": "ready-probe"}], "data": {"ready": True}})
                                for f in await read_frames(ws, first_timeout=0.3, then=0.05):
                                    if f.get("json", {}).get("type") == "publish":
                                        return 0
                                last = "no delivery yet"
                    except (aio_pika.exceptions.AMQPError, ConnectionError, OSError) as e:
                        last = "amqp: {}".format(e)
                        await asyncio.sleep(0.3)
            finally:
                await ws.close()
    print("probe ready: {} not ready after {}s: {}".format(args.url, args.timeout, last), file=sys.stderr)
    return 1


# ---------------------------------------------------------------- protocol


class ProbeBackend:
    def __init__(self):
        self.requests = []

    async def handle(self, request):
        rec = {
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "headers": {k.lower(): v for k, v in request.headers.items()
                        if k.lower() in ("authorization", "cookie", "user-agent", "x-real-ip", "x-csrftoken",
                                         "host", "x-forwarded-for")},
        }
        self.requests.append(rec)
        auth = request.headers.get("Authorization", "")
        if auth == "Token deny":
            return web.json_response({"detail": "denied"}, status=403)
        if auth == "Token down":
            return web.json_response({"detail": "down"}, status=500)
        if auth == "Token redirect":
            raise web.HTTPFound("/login/")
        return web.json_response({"allowed_rooms": ALLOWED, "user": {"data": {"id": 1}}})

    def take(self):
        out, self.requests = self.requests, []
        return out


async def protocol(args):
    host, port = args.backend_listen.rsplit(":", 1)
    backend = ProbeBackend()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", backend.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, int(port)).start()
    cases = {}
    try:
        async with aiohttp.ClientSession() as session:
            await protocol_cases(args, session, backend, cases)
    finally:
        await runner.cleanup()
    with open(args.out, "w") as f:
        json.dump({"label": args.label, "url": args.url, "cases": cases}, f, indent=1)
    return 0


async def auth_case(session, args, backend, token, headers=None, path=None, keep=False):
    ws, rec = await connect(session, args.url, token=token, headers=headers, path=path)
    if ws is not None:
        rec["frames"] = await read_frames(ws, first_timeout=3)
        if ws.closed:
            rec["close_code"] = ws.close_code
    await asyncio.sleep(0.05)
    rec["backend_requests"] = backend.take()
    if keep:
        return ws, rec
    if ws is not None:
        await ws.close()
    return None, rec


async def protocol_cases(args, session, backend, cases):
    browser = {"Cookie": "sessionid=s1; csrftoken=c1", "User-Agent": "htc-probe/1", "X-Real-IP": "10.1.2.3"}
    _, cases["auth: ok, cookie + user-agent + x-real-ip + token"] = await auth_case(
        session, args, backend, "ok", headers=browser)
    _, cases["auth: ok, nothing but the token (X-Real-IP fallback?)"] = await auth_case(session, args, backend, "ok")
    _, cases["auth: no token, no cookie"] = await auth_case(session, args, backend, None)
    _, cases["auth: backend 403"] = await auth_case(session, args, backend, "deny")
    _, cases["auth: backend 500"] = await auth_case(session, args, backend, "down")
    _, cases["auth: backend 302"] = await auth_case(session, args, backend, "redirect")
    _, cases["path: /ws (no slash)"] = await auth_case(session, args, backend, "ok", path="/ws")

    ws, rec = await auth_case(session, args, backend, "ok", keep=True)
    if ws is None:
        cases["session"] = {"error": "could not open", "open": rec}
        return

    def case(name, text):
        return name, text

    steps = [
        case("ping (raw text)", "ping"),
        case("subscribe allowed, numeric requestId", json.dumps(
            {"type": "subscribe", "room": {"customer": 1, "warehouse": 2}, "requestId": 10})),
        case("subscribe allowed wildcard room, string requestId", json.dumps(
            {"type": "subscribe", "room": {"customer": 1, "warehouse": "*"}, "requestId": "11"})),
        case("subscribe allowed, requestId 12", json.dumps(
            {"type": "subscribe", "room": {"hot": 0}, "requestId": 12})),
        case("subscribe allowed, requestId 15", json.dumps(
            {"type": "subscribe", "room": {"hot": 3}, "requestId": 15})),
        case("subscribe not allowed", json.dumps(
            {"type": "subscribe", "room": {"nope": 1}, "requestId": 13})),
        case("subscribe without requestId", json.dumps({"type": "subscribe", "room": {"hot": 1}})),
        case("subscribe with a requestId in use", json.dumps(
            {"type": "subscribe", "room": {"hot": 2}, "requestId": 12})),
        case("non-JSON text", "hello"),
        case("unknown type", json.dumps({"type": "nope", "requestId": 5})),
        case("missing type", json.dumps({"requestId": 6})),
        case("status", json.dumps({"type": "status", "requestId": 7})),
        case("unsubscribe unknown requestId", json.dumps({"type": "unsubscribe", "requestId": 999})),
        case("unsubscribe without requestId", json.dumps({"type": "unsubscribe"})),
    ]
    session_cases = {}
    for name, text in steps:
        session_cases[name] = await send_and_read(ws, text)
    # Remember the raw form of one reply, to show the serialisation.
    cases["session"] = session_cases

    # Deliveries: which subscription (requestId) gets which trigger.
    triggers = [
        ("T1 exact {customer:1,warehouse:2}", {"rooms": [{"customer": 1, "warehouse": 2}], "data": {"t": 1}}),
        ("T2 wildcard trigger {customer:1,warehouse:*}",
         {"rooms": [{"customer": 1, "warehouse": "*"}], "data": {"t": 2}}),
        ("T3 same room twice (keys reordered)",
         {"rooms": [{"customer": 1, "warehouse": 2}, {"warehouse": 2, "customer": 1}], "data": {"t": 3}}),
        ("T4 {customer:\"1\"} (string, not number)", {"rooms": [{"customer": "1", "warehouse": 2}], "data": {"t": 4}}),
        ("T5 other warehouse {customer:1,warehouse:3}", {"rooms": [{"customer": 1, "warehouse": 3}], "data": {"t": 5}}),
        ("T6 no data field {hot:0}", {"rooms": [{"hot": 0}]}),
        ("T7 not JSON, then {hot:0}", None),
        ("T8 {hot:0}", {"rooms": [{"hot": 0}], "data": {"t": 8}}),
    ]
    deliveries = {}
    raw_publish = None
    async with Publisher(args.amqp_url, args.exchange) as pub:
        for name, body in triggers:
            if body is None:
                await pub.publish(b"not json")
                body = {"rooms": [{"hot": 0}], "data": {"t": 7}}
            await pub.publish(body)
            frames = await read_frames(ws, first_timeout=0.7, then=0.2)
            got = []
            for f in frames:
                j = f.get("json")
                if isinstance(j, dict) and j.get("type") == "publish":
                    got.append({"requestId": j.get("requestId"), "data": j.get("data")})
                    raw_publish = raw_publish or f.get("raw")
                else:
                    got.append({"other": f})
            deliveries[name] = {"trigger": body, "received": got}
        cases["deliveries"] = deliveries
        cases["publish frame (raw)"] = raw_publish
        after = {}
        after["unsubscribe 15"] = await send_and_read(ws, json.dumps({"type": "unsubscribe", "requestId": 15}))
        await pub.publish({"rooms": [{"hot": 3}], "data": {"t": 10}})
        after["then trigger {hot:3} (15's room)"] = await read_frames(ws, first_timeout=0.7)
        # 3.1.0 accepted a second subscription with requestId 12 ({hot:2});
        # the gateway refused it (request-id-in-use).
        after["unsubscribe 12 (3.1.0: two subscriptions carry 12)"] = await send_and_read(
            ws, json.dumps({"type": "unsubscribe", "requestId": 12}))
        await pub.publish({"rooms": [{"hot": 0}], "data": {"t": 11}})
        await pub.publish({"rooms": [{"hot": 2}], "data": {"t": 12}})
        after["then triggers {hot:0} (t 11) and {hot:2} (t 12)"] = await read_frames(ws, first_timeout=0.7)
        cases["unsubscribe"] = after
    await ws.close()

    # Malformed input that 3.1.0 does not catch: each on its own connection.
    bad = {
        "subscribe with room a string": json.dumps({"type": "subscribe", "room": "x", "requestId": 1}),
        "subscribe without room": json.dumps({"type": "subscribe", "requestId": 1}),
        "JSON array": "[1, 2]",
        "JSON number": "42",
    }
    malformed = {}
    for name, text in bad.items():
        ws, rec = await auth_case(session, args, backend, "ok", keep=True)
        if ws is None:
            malformed[name] = rec
            continue
        out = await send_and_read(ws, text)
        if not ws.closed:
            out["then ping"] = await send_and_read(ws, "ping")
        out["close_code"] = ws.close_code if ws.closed else None
        malformed[name] = out
        await ws.close()
    cases["malformed"] = malformed


def main():
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("ready")
    r.add_argument("--url", required=True)
    r.add_argument("--amqp-url", required=True)
    r.add_argument("--exchange", required=True)
    r.add_argument("--timeout", type=float, default=30)
    p = sub.add_parser("protocol")
    p.add_argument("--url", required=True)
    p.add_argument("--backend-listen", required=True)
    p.add_argument("--amqp-url", required=True)
    p.add_argument("--exchange", required=True)
    p.add_argument("--label", required=True)
    p.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.cmd == "ready":
        return asyncio.run(ready(args))
    return asyncio.run(asyncio.wait_for(protocol(args), 120))


if __name__ == "__main__":
    sys.exit(main())
