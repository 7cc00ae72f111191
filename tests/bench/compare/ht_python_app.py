"""ASGI application of the original Python high-templar 3.1.0, for compare.sh.

high-templar 3.1.0 has no command-line entry point and no settings file of
its own: an application is built with ``high_templar.main.create_app(Settings)``
where ``Settings`` is a class whose attributes Quart copies into
``app.config``, and is served by an ASGI server (hypercorn, one of its
dependencies). The package's own ``high_templar/asgi.py`` is an example of
that, but it hard-codes RabbitMQ (user/password ``rabbitmq``, host
``rabbitmq``, exchange ``hightemplar``), logs at DEBUG into ``./backend.log``
and reads only the backend URL from the environment (``CY_BINDER_INTERNAL``,
``CY_BINDER_SOCKET``). This module is the same thing with every setting
taken from the environment and logging at WARNING (as the Rust gateway runs
with ``HT_LOG=warn`` in the benchmarks):

  CY_BINDER_INTERNAL   backend base URL (API_URL); ``bootstrap/`` is appended
  CY_BINDER_SOCKET     optional unix socket of the backend (API_SOCKET)
  HTC_AMQP_URL         amqp://user:pass@host:port/vhost (default guest@127.0.0.1)
  HTC_EXCHANGE         exchange name (RABBITMQ['exchange_name'], default hightemplar)
  HTC_LOG_LEVEL        log level of the app (default WARNING)
  HTC_ECHO_REQUEST_ID  "1": patch the subscribe action so its replies carry the
                       subscription's requestId (see below); default "0"

Served with:  hypercorn --workers 0 --bind 127.0.0.1:PORT ht_python_app:application

The requestId patch: 3.1.0 answers a subscribe with ``{"code": "success"}``
(or ``{"code": "error", "message": "room-not-found"}``) *without* the
``requestId``; 3.x clients match the replies by order (one connection's
messages are handled one after the other). high-templar-bench matches them
by ``requestId`` and therefore cannot run against the unpatched server at
all (every subscription times out). With HTC_ECHO_REQUEST_ID=1 the subscribe
action below -- a copy of ``high_templar.client_actions.subscribe.subscribe``
with ``requestId`` added to its two replies -- replaces the original in the
action table. Nothing else is changed: same hub, rooms, delivery, sockets.
"""

import logging
import os
import urllib.parse

from high_templar.main import create_app


def _rabbitmq_settings():
    url = urllib.parse.urlsplit(os.environ.get("HTC_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"))
    vhost = urllib.parse.unquote(url.path[1:]) if url.path else "/"
    # high_templar/rabbitmq.py connects to "amqp://{username}:{password}@{host}",
    # so "host" may carry the port, and the vhost as a path.
    host = "{}:{}".format(url.hostname or "127.0.0.1", url.port or 5672)
    if vhost not in ("", "/"):
        host += "/" + urllib.parse.quote(vhost, safe="")
    return {
        "enabled": True,  # not read by 3.1.0: the consumer always runs
        "exchange_name": os.environ.get("HTC_EXCHANGE", "hightemplar"),
        "username": urllib.parse.unquote(url.username or "guest"),
        "password": urllib.parse.unquote(url.password or "guest"),
        "host": host,
    }


class Settings:
    API_URL = os.environ.get("CY_BINDER_INTERNAL", "http://127.0.0.1:8001/")
    API_SOCKET = os.environ.get("CY_BINDER_SOCKET") or None
    USER_ID_PATH = ["user", "data", "id"]
    CONNECTION_HEADERS = {}
    RABBITMQ = _rabbitmq_settings()


def _install_request_id_echo():
    from high_templar import client_actions
    from high_templar.authentication import Permission
    from high_templar.subscription import Subscription

    async def subscribe(connection, message):
        # high_templar/client_actions/subscribe.py of 3.1.0, with requestId
        # added to the success and room-not-found replies.
        from high_templar.hub import NoPermissionException

        permission = Permission(message["room"])

        if "requestId" not in message:
            return await connection.send({"code": "error", "message": "no-request-id"})

        try:
            connection.app.hub.subscribe(
                Subscription(connection=connection, permission=permission, request_id=message["requestId"])
            )
        except NoPermissionException:
            return await connection.send(
                {"code": "error", "message": "room-not-found", "requestId": message["requestId"]}
            )

        await connection.send({"code": "success", "requestId": message["requestId"]})

    client_actions.ACTIONS["subscribe"] = subscribe


if os.environ.get("HTC_ECHO_REQUEST_ID", "0") == "1":
    _install_request_id_echo()

application = create_app(Settings)
_level = getattr(logging, os.environ.get("HTC_LOG_LEVEL", "WARNING").upper(), logging.WARNING)
application.logger.setLevel(_level)
logging.getLogger("high_templar").setLevel(_level)
logging.getLogger("aio_pika").setLevel(max(_level, logging.WARNING))
logging.getLogger("aiormq").setLevel(max(_level, logging.WARNING))
