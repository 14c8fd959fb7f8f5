"""Sender (fastscp.process.sender): what the workers' clients of the indexer, the post-store stage and the
forwarder share, with messages of its own making: in order, whatever the receiver's lag; held or dropped
where no file can take them. Real sockets, real files (the clients' own tests: tests/unit/poststore,
tests/unit/index)."""

from __future__ import annotations

import logging
import re
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from fastscp.process import sender as sender_module
from fastscp.process.kept import kept_files, read_kept
from fastscp.process.sender import FILE_RETRY, Sender
from tests.conftest import receive_messages

#: Longer than any datagram a Unix socket takes by default (net.core.wmem_default: 208 KiB here).
TOO_LONG = b"x" * (4 << 20)


def _sender(address: str, folder: str = "", *, hold: bool = True, ordered: bool = False,
            backlog_bytes: int = 1 << 20, max_items: int = 1, retry_interval: float = 0.05,
            wait: bool = False) -> Sender[bytes]:
    """By default each item a message of its own, sent as it is added (a batch of ``max_items`` items is
    one message, joined by "|"); no batch waits for its interval (a minute); retries every 50 ms."""
    return Sender(address, lambda items: [(b"|".join(items), len(items))], name="receiver",
                  log=logging.getLogger("fastscp.test-sender"), interval=60, max_items=max_items,
                  retry_interval=retry_interval, backlog_bytes=backlog_bytes, kept_folder=folder, ordered=ordered,
                  wait=wait, hold=hold, if_dropped="what that means")


def _fill_socket(sender: Sender[bytes], item: bytes) -> None:
    """Send ``item`` until the receiver's socket is full (it never reads): then one is kept."""
    for _ in range(10_000):
        sender.send(item)
        if sender.pending:
            break
    assert sender.pending == 1, "the socket never filled: nothing tested"


def _listener() -> tuple[socket.socket, str]:
    return _listener_at(f"\0fastscp-test-sender-{uuid.uuid4().hex}")


def _listener_at(address: str) -> tuple[socket.socket, str]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(address)
    listener.listen(1)
    return listener, address


@pytest.mark.parametrize("ordered", [True, False])
def test_a_message_longer_than_the_socket_takes_goes_to_a_file(tmp_path: Path, ordered: bool) -> None:
    """The socket refuses it (EMSGSIZE) now and at every retry: before, a client took that for a receiver
    that is down and tried again forever, the messages after it held up behind it. The next go by the
    socket, at once, or (``ordered``) once the receiver has taken the file."""
    listener, address = _listener()
    folder = tmp_path / "kept"
    sender = _sender(address, str(folder), ordered=ordered)
    try:
        for item in (b"first", TOO_LONG, b"after"):
            sender.send(item)
        conn, _ = listener.accept()
        with conn:
            assert receive_messages(conn, 0.5, 3) == ([b"first"] if ordered else [b"first", b"after"])
            (name,) = kept_files(str(folder))
            assert list(read_kept(str(folder / name))) == [TOO_LONG]
            (folder / name).unlink()  # the receiver takes the file
            assert receive_messages(conn, 10 if ordered else 0.2, 1) == ([b"after"] if ordered else [])
        assert sender.dropped == 0 and sender.pending == 0
    finally:
        sender.close()
        listener.close()


def test_without_a_folder_a_message_longer_than_the_socket_takes_is_dropped_and_counted(
        caplog: pytest.LogCaptureFixture) -> None:
    """Held, it would never go and would hold up the others."""
    listener, address = _listener()
    sender = _sender(address)
    try:
        for item in (b"first", TOO_LONG, b"after"):
            sender.send(item)
        conn, _ = listener.accept()
        with conn:
            assert receive_messages(conn, 5, 2) == [b"first", b"after"]
    finally:
        sender.close()
        listener.close()
    assert sender.dropped == 1
    assert "a message longer than the socket takes; no folder to keep them in" in caplog.text
    assert "what that means" in caplog.text


@pytest.mark.parametrize("hold", [True, False])
def test_where_no_file_can_take_them_messages_past_the_bound_are_held_or_dropped(hold: bool) -> None:
    """The receiver is down and there is no folder: a sender that holds (the indexer's clients) keeps
    every message past its bound and delivers them, in order, once the receiver listens; one that does
    not (the post-store stage's) keeps the first bound's worth and counts the rest dropped."""
    address = f"\0fastscp-test-sender-{uuid.uuid4().hex}"
    sender = _sender(address, hold=hold, backlog_bytes=100)
    items = [b"%010d" % n for n in range(50)]  # 10 bytes each: 500 bytes, five times the bound
    for item in items:
        sender.send(item)
    assert sender.pending == (50 if hold else 10)
    assert sender.dropped == (0 if hold else 40)
    listener, _ = _listener_at(address)
    try:
        listener.settimeout(10)
        conn, _ = listener.accept()  # the sender's retry connects
        with conn:
            received = receive_messages(conn, 10, 50 if hold else 10)
            received += receive_messages(conn, 0.2)  # and nothing more
    finally:
        sender.close()
        listener.close()
    assert received == (items if hold else items[:10])  # the oldest kept


def test_an_item_sent_after_close_goes_and_its_connection_is_closed_after_it() -> None:
    """An association may outlive its worker's stop: its record goes at once, and the connection opened
    for it is closed after it, not left open until the process exits."""
    listener, address = _listener()
    sender = _sender(address)
    sender.close()
    try:
        sender.send(b"late")
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(5)
            assert conn.recv(100) == b"late"
            assert conn.recv(100) == b"", "the sender's end is still open"
    finally:
        listener.close()


def test_items_wait_for_their_batch_unless_urgent() -> None:
    """A batch goes when full (or at its interval, a minute here), an urgent item at once with the batch
    before it: one message per item was a system call per store, and a wake-up of the receiver."""
    listener, address = _listener()
    sender = _sender(address, max_items=3)
    try:
        for item in (b"a", b"b"):
            sender.send(item)
        assert sender.pending == 2
        sender.send(b"c")  # full
        sender.send(b"d")
        sender.send(b"e", urgent=True)
        conn, _ = listener.accept()
        with conn:
            assert receive_messages(conn, 1, 2) == [b"a|b|c", b"d|e"]
            assert receive_messages(conn, 0.2) == []  # and nothing more
        assert sender.pending == 0
    finally:
        sender.close()
        listener.close()


def test_dropped_records_are_logged_at_the_1st_10th_100th_and_each_1000th(caplog: pytest.LogCaptureFixture) -> None:
    """The receiver is down, no folder: one warning per order of magnitude, not one per record."""
    sender = _sender(f"\0fastscp-test-sender-{uuid.uuid4().hex}", hold=False, backlog_bytes=10)
    with caplog.at_level(logging.WARNING, logger="fastscp.test-sender"):
        for n in range(2_001):  # the first is kept, 2,000 dropped
            sender.send(b"%010d" % n)
    sender.close()
    assert sender.dropped == 2_001  # and the one kept, at close
    logged = [int(m.group(1)) for r in caplog.records if (m := re.search(r"(\d+) records dropped", r.getMessage()))]
    assert logged == [1, 10, 100, 1000, 2000]  # not the 2,001st


def test_a_folder_that_cannot_be_written_is_said_once_while_records_are_held(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The indexer's clients hold what no file can take: the reason is logged once, not at each message."""
    (tmp_path / "file").write_text("in the way")
    sender = _sender(f"\0fastscp-test-sender-{uuid.uuid4().hex}", str(tmp_path / "file" / "kept"), backlog_bytes=10)
    with caplog.at_level(logging.WARNING, logger="fastscp.test-sender"):
        for n in range(20):
            sender.send(b"%010d" % n)
        assert sender.pending == 20 and sender.dropped == 0
        assert sum("cannot keep them in" in r.getMessage() for r in caplog.records) == 1
        sender.close()
    assert sender.dropped == 0


def test_a_receiver_that_restarts_gets_what_came_after_its_old_connection_broke() -> None:
    """The broken connection is closed and a new one made at the next try (not the dead one tried forever)."""
    listener, address = _listener()
    sender = _sender(address)
    try:
        sender.send(b"one")
        conn, _ = listener.accept()
        with conn:
            assert receive_messages(conn, 5, 1) == [b"one"]
        listener.close()  # the receiver dies
        sender.send(b"two")
        assert sender.pending == 1
        listener, _ = _listener_at(address)  # and starts again
        listener.settimeout(10)
        conn, _ = listener.accept()  # the sender's retry
        with conn:
            assert receive_messages(conn, 10, 1) == [b"two"]
    finally:
        sender.close()
        listener.close()


def test_a_message_over_the_bound_goes_by_the_socket_if_the_receiver_reads_again(tmp_path: Path) -> None:
    """The socket is tried once more before what is kept goes to a file: the receiver may have read since
    the last try (a retry comes only every minute here)."""
    listener, address = _listener()
    folder = tmp_path / "kept"
    sender = _sender(address, str(folder), backlog_bytes=64 * 1024, retry_interval=60)
    item = b"x" * 1024
    try:
        _fill_socket(sender, item)
        for _ in range(63):  # 64 KiB kept: the bound
            sender.send(item)
        assert sender.pending == 64 and not folder.exists()
        conn, _ = listener.accept()
        with conn:
            assert len(receive_messages(conn, 0.5)) > 0  # the receiver reads (room for one is enough)
            sender.send(item)  # past the bound, but the socket has room again
            assert sender.pending == 0
        assert not folder.exists()
    finally:
        sender.close()
        listener.close()


def test_close_waits_for_a_receiver_that_comes_back_in_time(tmp_path: Path) -> None:
    """A worker's stop gives the indexer some seconds to take its last records by the socket: a receiver
    that listens again within them gets every one, in order, and no file is written."""
    address = f"\0fastscp-test-sender-{uuid.uuid4().hex}"
    folder = tmp_path / "kept"
    sender = _sender(address, str(folder), retry_interval=60)  # no retry but close's own
    items = [b"%03d" % n for n in range(20)]
    for item in items:
        sender.send(item)
    assert sender.pending == 20  # the receiver is down
    received: list[bytes] = []

    def receiver() -> None:
        time.sleep(0.3)
        listener, _ = _listener_at(address)
        with listener:
            listener.settimeout(10)
            conn, _ = listener.accept()
            with conn:
                received.extend(receive_messages(conn, 10))  # until the sender closes

    thread = threading.Thread(target=receiver)
    thread.start()
    try:
        sender.close(wait=30)
    finally:
        thread.join(20)
    assert received == items and sender.pending == 0
    assert not folder.exists()


def test_close_does_not_wait_for_a_receiver_to_take_the_senders_file(tmp_path: Path) -> None:
    """``ordered``: while the receiver has the sender's file still to take, nothing goes by the socket, and
    the receiver takes files at its own pace (seconds apart at idle priority): close puts what it keeps
    in a file after the first at once, instead of waiting out its time for nothing (a stop took 5 s longer)."""
    listener, address = _listener()
    folder = tmp_path / "kept"
    sender = _sender(address, str(folder), ordered=True, backlog_bytes=64 * 1024, retry_interval=60)
    item = b"x" * 1024
    try:
        _fill_socket(sender, item)
        for _ in range(64):  # past the bound: 64 KiB go to a file, the last item stays
            sender.send(item)
        (first,) = kept_files(str(folder))
        sender.send(b"behind the file")
        assert sender.pending == 2
        started = time.monotonic()
        sender.close(wait=30)
        assert time.monotonic() - started < 10, "close waited for the receiver to take the file"
        assert kept_files(str(folder))[0] == first
        assert list(read_kept(str(folder / kept_files(str(folder))[1]))) == [item, b"behind the file"]
    finally:
        listener.close()


def test_a_folder_that_cannot_be_written_is_tried_again_after_a_while_not_at_each_message(
        tmp_path: Path) -> None:
    """Each try joins every record kept (tens of MB) in the association's thread: once a try has failed,
    the messages past the bound are held without one, until FILE_RETRY has passed; then what is kept
    goes to a file as soon as the folder can take it."""
    in_the_way = tmp_path / "file"
    in_the_way.write_text("in the way")
    folder = in_the_way / "kept"
    tries: list[str] = []
    counting = [True]

    def count(event: str, args: tuple[object, ...]) -> None:
        if counting[0] and event == "open" and str(args[0]).startswith(str(in_the_way)):
            tries.append(str(args[0]))

    sys.addaudithook(count)  # never removed: it counts only while this test runs
    try:
        sender = _sender(f"\0fastscp-test-sender-{uuid.uuid4().hex}", str(folder), backlog_bytes=10)
        for n in range(20):
            sender.send(b"%010d" % n)
        assert sender.pending == 20 and sender.dropped == 0
        assert len(tries) == 1, tries
        in_the_way.unlink()  # the folder can be made now
        sender.send(b"%010d" % 20)
        assert not kept_files(str(folder)), "tried again before FILE_RETRY"
        time.sleep(FILE_RETRY)
        sender.send(b"%010d" % 21)
        (name,) = kept_files(str(folder))
        assert list(read_kept(str(folder / name))) == [b"%010d" % n for n in range(21)]
        sender.close()
    finally:
        counting[0] = False


def test_past_the_bound_a_sender_that_does_not_hold_drops_while_the_folder_waits_for_its_retry(
        tmp_path: Path) -> None:
    """The post-store stage's client: while a failed folder waits for FILE_RETRY, what passes the bound
    is dropped and counted as when the try fails, not kept past the bound."""
    (tmp_path / "file").write_text("in the way")
    sender = _sender(f"\0fastscp-test-sender-{uuid.uuid4().hex}", str(tmp_path / "file" / "kept"), hold=False,
                     backlog_bytes=10)
    for n in range(20):
        sender.send(b"%010d" % n)
    assert (sender.pending, sender.dropped) == (1, 19)
    sender.close()


def test_at_exit_a_file_is_tried_at_once_even_just_after_a_try_failed(tmp_path: Path) -> None:
    """What is kept at close goes to the folder if it can be written now, whatever FILE_RETRY says."""
    in_the_way = tmp_path / "file"
    in_the_way.write_text("in the way")
    folder = in_the_way / "kept"
    sender = _sender(f"\0fastscp-test-sender-{uuid.uuid4().hex}", str(folder), backlog_bytes=10)
    for n in range(3):
        sender.send(b"%010d" % n)
    assert sender.pending == 3 and not folder.exists()
    in_the_way.unlink()
    sender.close()
    (name,) = kept_files(str(folder))
    assert list(read_kept(str(folder / name))) == [b"%010d" % n for n in range(3)]


def test_a_message_longer_than_the_socket_takes_tries_a_file_at_once_even_just_after_a_try_failed(
        tmp_path: Path) -> None:
    """It can never go by the socket: it goes to the folder if it can be written now, whatever FILE_RETRY
    says (else it is dropped)."""
    listener, address = _listener()
    in_the_way = tmp_path / "file"
    in_the_way.write_text("in the way")
    folder = in_the_way / "kept"
    sender = _sender(address, str(folder))
    try:
        sender.send(TOO_LONG)
        assert sender.dropped == 1, "no folder could take it"
        in_the_way.unlink()
        sender.send(TOO_LONG)
        (name,) = kept_files(str(folder))
        assert list(read_kept(str(folder / name))) == [TOO_LONG]
        assert sender.dropped == 1
    finally:
        sender.close()
        listener.close()


def test_a_sender_that_does_not_hold_says_an_unwritable_folder_only_in_its_drop_log(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Its drops are logged with the reason (at the 1st and the 10th of 19 here); no other line repeats it."""
    (tmp_path / "file").write_text("in the way")
    sender = _sender(f"\0fastscp-test-sender-{uuid.uuid4().hex}", str(tmp_path / "file" / "kept"), hold=False,
                     backlog_bytes=10)
    with caplog.at_level(logging.WARNING, logger="fastscp.test-sender"):
        for n in range(20):
            sender.send(b"%010d" % n)
    said = [r.getMessage() for r in caplog.records if "cannot keep them in" in r.getMessage()]
    assert len(said) == 2 and all("records dropped" in line for line in said), said
    sender.close()


#: Items of a sender that waits (no folder: the post-store stage's client of the indexer): 6 of 64 KiB, more
#: than a Unix socket holds unread (net.core.wmem_default: 208 KiB here).
WAITING_ITEMS = [bytes([n]) * (64 * 1024) for n in range(6)]


def test_a_sender_that_waits_lets_go_at_close_of_a_receiver_that_stopped_reading(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """``wait``: a full socket holds the sender up, a send at a time (SEND_TIMEOUT), not for good. Before,
    its send blocked until the receiver read: the post-store stage's stop hung on an indexer that had
    stopped reading (until the supervisor killed it, its records lost without a word). Now close returns,
    and says what it could not deliver."""
    monkeypatch.setattr(sender_module, "SEND_TIMEOUT", 0.2)
    listener, address = _listener()
    sender = _sender(address, wait=True, retry_interval=60)
    conn: socket.socket | None = None

    def send_then_close() -> None:
        for item in WAITING_ITEMS:
            sender.send(item)
        sender.close()

    thread = threading.Thread(target=send_then_close, daemon=True)
    try:
        with caplog.at_level(logging.WARNING, "fastscp.test-sender"):
            thread.start()
            conn, _ = listener.accept()  # and never reads
            thread.join(20)
            stuck = thread.is_alive()
    finally:
        if conn is not None:
            conn.close()  # a send still blocked fails now: the thread ends
        thread.join(5)
        listener.close()
    assert not stuck, "close waited for a receiver that does not read"
    undelivered = sender.pending
    assert 0 < undelivered < len(WAITING_ITEMS), "the socket took all or none: nothing tested"
    assert any(f"{undelivered} records not delivered at exit" in r.getMessage() for r in caplog.records)


def test_a_sender_that_waits_delivers_everything_in_order_once_its_receiver_reads_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """What a send could not place within SEND_TIMEOUT is kept, not lost: a receiver that reads again
    gets every message, in order."""
    monkeypatch.setattr(sender_module, "SEND_TIMEOUT", 0.2)
    listener, address = _listener()
    sender = _sender(address, wait=True, retry_interval=0.05)
    try:
        for item in WAITING_ITEMS[:2]:
            sender.send(item)
        conn, _ = listener.accept()
        with conn:
            sent = threading.Thread(target=lambda: [sender.send(item) for item in WAITING_ITEMS[2:]], daemon=True)
            sent.start()
            sent.join(20)
            assert not sent.is_alive()
            assert sender.pending > 0, "the socket took everything unread: nothing tested"
            assert receive_messages(conn, 10, len(WAITING_ITEMS)) == WAITING_ITEMS
        assert sender.pending == 0
    finally:
        sender.close()
        listener.close()


def test_a_sender_that_waits_keeps_trying_within_its_close_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """A send gives up after SEND_TIMEOUT, close does not: within its ``wait`` it tries again, so a
    receiver that reads again after a few timeouts (an indexer busy with its last batches at a stop)
    still gets every message, in order."""
    monkeypatch.setattr(sender_module, "SEND_TIMEOUT", 0.2)
    listener, address = _listener()
    sender = _sender(address, wait=True, retry_interval=60)  # no retry but close's own
    received: list[bytes] = []
    try:
        sent = threading.Thread(target=lambda: [sender.send(item) for item in WAITING_ITEMS], daemon=True)
        sent.start()
        conn, _ = listener.accept()
        with conn:  # closed on every way out: a socket left to the collector warns in a later test
            sent.join(20)
            assert not sent.is_alive() and sender.pending > 0, "the socket took everything unread: nothing tested"

            def read_later() -> None:
                time.sleep(1.0)  # five SEND_TIMEOUTs
                received.extend(receive_messages(conn, 10, len(WAITING_ITEMS)))

            reader = threading.Thread(target=read_later)
            reader.start()
            sender.close(wait=10)
            reader.join(20)
    finally:
        listener.close()
    assert received == WAITING_ITEMS and sender.pending == 0
