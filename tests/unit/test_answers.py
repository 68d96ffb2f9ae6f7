"""A submit ack never reaches the client before its record is fsynced
(fsync = "submits"), even while the connection's output is backed up."""

import json
import selectors
import socket

import lbd


def _master(tmp_path):
    cfg = lbd.build_config({"journal": {"path": str(tmp_path / "j"),
                                        "fsync": "submits",
                                        "fsync_interval": 1000.0}})
    m = lbd.Master(cfg)
    m._recover()
    assert m._flush_journal()           # the header

    def keepalive(_arg=None):           # keeps every select() short
        m.call_at(m.clock() + 0.001, keepalive)
    keepalive()
    return m


def _drain(sock):
    data = b""
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_submit_ack_is_not_sent_before_its_fsync(tmp_path, monkeypatch):
    m = _master(tmp_path)
    synced_upto = []        # the newest task seq at each fsync
    real_fsync = lbd._fsync

    def fsync(fd):
        synced_upto.append(max((t.seq for t in m.tasks.values()),
                               default=None))
        return real_fsync(fd)
    monkeypatch.setattr(lbd, "_fsync", fsync)
    server, client = socket.socketpair()
    server.setblocking(False)
    client.setblocking(False)
    conn = lbd.Conn(server)
    m.conns[conn.fd] = conn
    m.selector.register(server, selectors.EVENT_READ, (m._on_conn, conn))
    try:
        # A client that reads slowly: its answers back up in conn.outbuf,
        # so the connection is registered for EVENT_WRITE.
        big = "x" * 300_000
        data = json.dumps({"op": "submit", "task": {
            "handler": "lbd:echo", "args": [big]}}).encode() + b"\n"
        while data:                 # the daemon reads as the client writes
            try:
                data = data[client.send(data):]
            except BlockingIOError:
                m._step()
        for _ in range(5):
            m._step()
        tid = next(iter(m.tasks)).encode()
        # Its answer carries the 300 kB argument: more than the socket holds.
        client.sendall(b'{"op":"get","id":"%s"}\n' % tid)
        for _ in range(20):
            m._step()
        assert conn.outbuf, "the test needs a backlog in conn.outbuf"
        # Now a submit: read and written to the journal, not yet fsynced.
        client.sendall(b'{"op":"submit","task":{"handler":"lbd:echo"},'
                       b'"req":"probe"}\n')
        received = b""
        for _ in range(400):
            m._step()
            received += _drain(client)
            if b'"probe"' in received:
                break
        probe = [json.loads(line) for line in received.splitlines()
                 if b'"probe"' in line]
        assert probe and probe[0]["ok"], received[-300:]
        seq = int(probe[0]["id"])
        # When the ack left, an fsync had already covered its record.
        assert any(s is not None and s >= seq for s in synced_upto)
    finally:
        m.selector.unregister(server)
        server.close()
        client.close()
        if m.journal is not None:
            m.journal.close()
        m.selector.close()
