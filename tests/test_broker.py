"""grader.broker: a real nats-server with JetStream, started and always stopped."""

from __future__ import annotations

import asyncio
import socket

import nats
import pytest

from grader.broker import BrokerUnavailable, NatsServer, server_binary


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
    except OSError:
        return True
    return False


def test_the_binary_comes_with_the_package():
    assert server_binary().is_file()


def test_a_server_starts_on_a_free_loopback_port_and_is_stopped_by_its_process():
    with NatsServer() as server:
        assert server.url.startswith("nats://127.0.0.1:") and server.port
        assert server.running
        process, store = server.process, server.store_dir
    assert process is not None and process.poll() is not None, "the server outlived its `with`"
    assert _refused(server.port)
    assert not store.exists(), "the temporary storage folder was left behind"


def test_two_servers_run_side_by_side():
    with NatsServer() as one, NatsServer() as two:
        assert one.port != two.port


def test_the_server_is_stopped_when_the_block_raises():
    server = NatsServer()
    with pytest.raises(ZeroDivisionError), server:
        1 / 0
    assert not server.running


@pytest.mark.asyncio
async def test_jetstream_keeps_messages_across_a_restart():
    async with NatsServer() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="T", subjects=["t.>"])
        await js.publish("t.one", b"kept", headers={"Nats-Msg-Id": "m-1"})
        again = await js.publish("t.one", b"kept", headers={"Nats-Msg-Id": "m-1"})
        assert again.duplicate, "JetStream's duplicate window is on by default"
        await nc.close()

        port = server.port
        server.restart()
        assert server.port == port

        nc = await nats.connect(server.url)
        js = nc.jetstream()
        sub = await js.pull_subscribe("t.>", durable="reader", stream="T")
        [message] = await sub.fetch(1, timeout=5)
        assert message.data == b"kept"
        await message.ack()
        await nc.close()


def test_the_fixture_gives_a_running_server(nats_server):
    assert nats_server.running

    async def roundtrip() -> bytes:
        nc = await nats.connect(nats_server.url)
        sub = await nc.subscribe("ping")
        await nc.publish("ping", b"pong")
        message = await sub.next_msg(timeout=5)
        await nc.close()
        return message.data

    assert asyncio.run(roundtrip()) == b"pong"


def test_a_server_that_cannot_start_says_why(tmp_path):
    with NatsServer() as first:
        taken = NatsServer(store_dir=tmp_path, port=first.port)
        with pytest.raises(BrokerUnavailable, match="exited|did not accept"):
            taken.start()
        assert not taken.running
