"""A raw, step-by-step Storage SCU for tests that need to stop mid-message.

pynetdicom encodes the A-ASSOCIATE-RQ; the P-DATA-TF PDUs are written by hand
so a test can send half a data set, pause, send garbage, or vanish.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence

from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import build_context

from fastscp.net import dimse

_PDU = struct.Struct(">BxI")
_PDV = struct.Struct(">IBB")


def command_set(command_field: int, *, sop_class: str = "", message_id: int | None = None,
                responding_to: int | None = None, data_set: bool = False, sop_instance: str | bytes = "") -> bytes:
    """A DIMSE command set (Implicit VR Little Endian, elements in tag order); a ``sop_instance`` given as
    bytes goes in as it is (any bytes, as a hostile peer sends them), even empty."""
    body = dimse._text(0x0002, sop_class) if sop_class else b""
    body += dimse._us(0x0100, command_field)
    if message_id is not None:
        body += dimse._us(0x0110, message_id)
    if responding_to is not None:
        body += dimse._us(0x0120, responding_to)
    if command_field != dimse.C_CANCEL_RQ:
        body += dimse._us(0x0700, 0)  # Priority: medium
    body += dimse._us(0x0800, 0x0000 if data_set else dimse.NO_DATA_SET)
    if isinstance(sop_instance, bytes):
        value = sop_instance + b"\x00" * (len(sop_instance) % 2)
        body += struct.pack("<HHI", 0, 0x1000, len(value)) + value
    elif sop_instance:
        body += dimse._text(0x1000, sop_instance)
    return struct.pack("<HHI", 0, 0, 4) + len(body).to_bytes(4, "little") + body


def _command(sop_class: str, sop_instance: str, message_id: int) -> bytes:
    return command_set(dimse.C_STORE_RQ, sop_class=sop_class, message_id=message_id, data_set=True,
                       sop_instance=sop_instance)


def store_command(sop_class: str, sop_instance: bytes | None, message_id: int = 1) -> bytes:
    """A C-STORE-RQ command set; ``sop_instance`` as raw bytes (any bytes), or None to leave it out."""
    return command_set(dimse.C_STORE_RQ, sop_class=sop_class, message_id=message_id, data_set=True,
                       sop_instance="" if sop_instance is None else sop_instance)


def associate_rq(contexts: list[tuple[str, list[str]]], *, aet: str = "RAWSCU", aec: str = "FASTSCP",
                 max_length: int = 0, roles: dict[str, tuple[bool, bool]] | None = None,
                 user_information: list | None = None) -> bytes:  # type: ignore[type-arg]
    """An encoded A-ASSOCIATE-RQ proposing ``contexts`` (IDs 1, 3, 5...), with
    Maximum Length Received ``max_length`` and SCP/SCU role selections ``roles``,
    or exactly the ``user_information`` items given."""
    rq = A_ASSOCIATE()
    rq.application_context_name = UID("1.2.840.10008.3.1.1.1")
    rq.calling_ae_title = aet
    rq.called_ae_title = aec
    proposed = []
    for i, (abstract, syntaxes) in enumerate(contexts):
        context = build_context(abstract, syntaxes)
        context.context_id = 2 * i + 1
        proposed.append(context)
    rq.presentation_context_definition_list = proposed
    length = MaximumLengthNotification()
    length.maximum_length_received = max_length
    items: list = [length]
    for uid, (scu, scp) in (roles or {}).items():
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = uid, scu, scp
        items.append(role)
    rq.user_information = items if user_information is None else user_information
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(rq)
    return pdu.encode()


def _item(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(body)) + body


def raw_associate_rq(contexts: Sequence[tuple[int, str | None, Sequence[str]]],
                     user_items: Sequence[tuple[int, bytes]] = (), *, aet: str = "RAWSCU", aec: str = "FASTSCP",
                     other_items: int = 0) -> bytes:
    """An A-ASSOCIATE-RQ written item by item (PS3.8 9.3.2), as a hostile peer may: any number of
    presentation contexts (ID, abstract syntax or None for no such item, transfer syntaxes; IDs may
    repeat), a Maximum Length item and then ``user_items`` (type, body) in its User Information, and
    ``other_items`` more Application Context items."""
    variable = _item(0x10, b"1.2.840.10008.3.1.1.1") * (1 + other_items)
    for context_id, abstract, syntaxes in contexts:
        sub = b"" if abstract is None else _item(0x30, abstract.encode())
        sub += b"".join(_item(0x40, ts.encode()) for ts in syntaxes)
        variable += _item(0x20, bytes([context_id, 0, 0, 0]) + sub)
    user = _item(0x51, struct.pack(">I", 0)) + b"".join(_item(kind, body) for kind, body in user_items)
    variable += _item(0x50, user)
    body = struct.pack(">HH", 1, 0) + aec.encode().ljust(16) + aet.encode().ljust(16) + bytes(32) + variable
    return _PDU.pack(0x01, len(body)) + body


def p_data(context_id: int, data: bytes, *, command: bool, last: bool) -> bytes:
    control = (1 if command else 0) | (2 if last else 0)
    return _PDU.pack(0x04, len(data) + 6) + _PDV.pack(len(data) + 2, context_id, control) + data


class RawSCU:
    def __init__(self, port: int, sop_class: str, transfer_syntax: str, *, aec: str = "FASTSCP",
                 aet: str = "RAWSCU", timeout: float = 30, raw_calling_ae: bytes = b"",
                 sock: socket.socket | None = None, max_length: int = 0) -> None:
        """Associate over a new connection to ``port``, or over ``sock`` (one end of a socket pair; port ignored)."""
        if sock is not None:
            sock.settimeout(timeout)
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=timeout)
        encoded = bytearray(associate_rq([(sop_class, [transfer_syntax])], aet=aet, aec=aec, max_length=max_length))
        if raw_calling_ae:
            # Bytes pynetdicom refuses to encode (control characters): PS3.8 9.3.2 puts
            # the Calling AE Title at bytes 27-42 of the PDU.
            encoded[26:42] = raw_calling_ae.ljust(16)[:16]
        self.sock.sendall(encoded)
        self.response_type, self.response = self.read_pdu()
        self.sop_class = sop_class

    def read_pdu(self) -> tuple[int, bytes]:
        header = self._read(6)
        pdu_type, length = _PDU.unpack(header)
        return pdu_type, self._read(length)

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the server")
            data += chunk
        return data

    @property
    def accepted(self) -> bool:
        return self.response_type == 0x02

    @property
    def rejection(self) -> tuple[int, int, int] | None:
        """(result, source, reason) of an A-ASSOCIATE-RJ, else None.

        Read from the PDU itself: pynetdicom's requestor may report a
        rejection as an abort when the transport closes before its main
        thread looks (its DUL closes the socket on receiving the RJ).
        """
        if self.response_type != 0x03:
            return None
        self.sock.close()
        return self.response[1], self.response[2], self.response[3]

    def begin_store(self, sop_instance: str, message_id: int = 1) -> None:
        self.sock.sendall(p_data(1, _command(self.sop_class, sop_instance, message_id), command=True, last=True))

    def send_data(self, data: bytes, *, last: bool, fragment: int = 65536) -> None:
        for start in range(0, len(data), fragment):
            chunk = data[start : start + fragment]
            self.sock.sendall(p_data(1, chunk, command=False, last=last and start + fragment >= len(data)))

    def read_status(self) -> int:
        pdu_type, body = self.read_pdu()
        assert pdu_type == 0x04, f"expected P-DATA-TF, got 0x{pdu_type:02X}"
        return dimse.decode_command_set(body[6:])["Status"]  # type: ignore[return-value]

    def send_command(self, command: bytes) -> None:
        self.sock.sendall(p_data(1, command, command=True, last=True))

    def read_message(self) -> tuple[dict[str, int | str], bytes | None]:
        """The next DIMSE message from the server: its command set and data set (None if it has none)."""
        parts = {True: b"", False: b""}
        command: dict[str, int | str] | None = None
        while True:
            pdu_type, body = self.read_pdu()
            assert pdu_type == 0x04, f"expected P-DATA-TF, got 0x{pdu_type:02X}"
            pos = 0
            while pos < len(body):
                length, _context, control = _PDV.unpack_from(body, pos)
                is_command = bool(control & 1)
                parts[is_command] += body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if control & 2 and is_command:
                    command = dimse.decode_command_set(parts[True])
                    if command.get("CommandDataSetType", dimse.NO_DATA_SET) == dimse.NO_DATA_SET:
                        return command, None
                elif control & 2:
                    assert command is not None, "data set before its command"
                    return command, parts[False]

    def store(self, sop_instance: str, data: bytes) -> int:
        self.begin_store(sop_instance)
        self.send_data(data, last=True)
        return self.read_status()

    def release(self) -> None:
        self.sock.sendall(_PDU.pack(0x05, 4) + b"\x00" * 4)
        pdu_type, _ = self.read_pdu()
        assert pdu_type == 0x06
        self.sock.close()

    def close(self) -> None:
        self.sock.close()

    def ended_by_server(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` s for the server to end the association.

        Returns the PDU type it sent last (0x07 A-ABORT) or 0 for a bare
        close; None if the association is still open after ``timeout``.
        Whatever else arrives (a response) is read and skipped.
        """
        deadline = time.monotonic() + timeout
        last = 0
        try:
            while True:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
                last, _ = self.read_pdu()
                if last == 0x07:
                    return last
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, TimeoutError):
                return None
            return last

