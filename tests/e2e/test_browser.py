"""The study browser of a real running server: search, study page, thumbnails, scan sheet, zip,
access control, hostile input, and the pages in headless Chromium.

Studies are synthetic series sent with dcmtk's storescu; every page is
fetched over HTTP from the server's monitor; the zip is compared byte for
byte with the stored files.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import os
import re
import shutil
import socket
import zipfile
from pathlib import Path

import pydicom
import pytest

from fastscp.config import ConfigError, load_config
from fastscp.dicom.synthetic import write_series
from fastscp.monitor.browser import MAX_DOWNLOADS, ZIP_AHEAD, ZIP_CHUNK, Browser, is_loopback
from fastscp.monitor.http import Request
from tests.conftest import dcmtk, wait_until
from tests.unit.monitor.test_monitor_page import CHROMIUM, _Page, chromium

pytestmark = pytest.mark.dcmtk

ARTIFACTS = Path(__file__).parent / "artifacts"
#: A patient name that is markup: every page must show it as text.
HOSTILE_NAME = '<script>alert("pwned")</script>^Evil'
USER, PASSWORD, TOKEN = "radiology", "correct horse battery", "0123456789abcdef0123456789abcdef"


# -- helpers ---------------------------------------------------------------------------


def fetch(url: str, path: str, headers: dict[str, str] | None = None, method: str = "GET") -> tuple[int, dict, bytes]:  # type: ignore[type-arg]
    """One request with ``path`` sent exactly as given (no normalisation), through 127.0.0.1."""
    port = int(url.rpartition(":")[2])
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(method, path, headers={"Host": f"127.0.0.1:{port}", **(headers or {})})
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def make_study(folder: Path, count: int, *, modality: str = "CT", patient_id: str, name: str, accession: str,
               date: str, seed: int, size: int = 64) -> tuple[str, list[str]]:
    """A synthetic series with these patient and study values; (Study Instance UID, paths)."""
    paths = write_series(str(folder), count, rows=size, columns=size, modality=modality, patient_id=patient_id,
                         seed=seed)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.AccessionNumber, ds.StudyDate = name, accession, date
        ds.save_as(path, enforce_file_format=True)
    return str(pydicom.dcmread(paths[0]).StudyInstanceUID), paths


def send(server, paths: list[str]) -> None:  # type: ignore[no-untyped-def]
    dcmtk("storescu", "-aec", server.ae_title, "-xe", "127.0.0.1", str(server.port), *paths)


def wait_indexed(url: str, uid: str, count: int, headers: dict[str, str] | None = None) -> None:
    """Until the index has every one of the study's ``count`` instances (committed after the stores)."""
    wait_until(lambda: f"<dd>{count} in 1 series".encode() in fetch(url, f"/studies/{uid}", headers)[2], 60,
               f"{count} instances of study {uid} indexed")


def study_rows(html: str) -> list[str]:
    """The study links of a result page, in order."""
    table = html.split('id="study-list"')[1] if 'id="study-list"' in html else ""
    return re.findall(r'<tr><td><a href="/studies/([0-9.]+)">', table)


def stored_study(server, uid: str) -> dict[str, bytes]:  # type: ignore[no-untyped-def]
    """Relative path -> bytes of the stored files of a study (hierarchical layout: its folder)."""
    return {str(p.relative_to(server.storage)): p.read_bytes() for p in server.stored_files() if uid in str(p)}


def write_config(tmp_path: Path, **monitor: object) -> Path:
    lines = ["scansheet:", "  study_timeout: 1", "monitor:"] + [
        f"  {k}: {str(v).lower() if isinstance(v, bool) else repr(v)}" for k, v in monitor.items()]
    config = tmp_path / "fastscp.yaml"
    config.write_text("\n".join(lines) + "\n")
    return config


@pytest.fixture
def two_studies(start_server, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A server (monitor on 127.0.0.1) with a CT study and an MR study of a patient with a hostile name."""
    server = start_server(monitor="127.0.0.1:0", config=write_config(tmp_path))
    ct, ct_paths = make_study(tmp_path / "ct", 5, patient_id="PAT-CT-1", name="Doe^Jane", accession="ACC-CT-77",
                              date="20250314", seed=1)
    mr, mr_paths = make_study(tmp_path / "mr", 3, modality="MR", patient_id="PAT-MR-2", name=HOSTILE_NAME,
                              accession="ACC-MR-88", date="20261102", seed=2, size=32)
    send(server, ct_paths + mr_paths)
    url = server.monitor_url()
    wait_indexed(url, ct, 5)
    wait_indexed(url, mr, 3)
    return server, url, ct, mr


# -- tests --------------------------------------------------------------------------------


def test_search_study_page_thumbnails_scansheet_and_zip(two_studies) -> None:  # type: ignore[no-untyped-def]
    server, url, ct, mr = two_studies

    def found(query: str) -> list[str]:
        status, headers, body = fetch(url, "/studies" + query)
        assert status == 200, body[:500]
        assert "script-src" not in headers["content-security-policy"]  # no script may run on these pages
        return study_rows(body.decode())

    assert found("") == [mr, ct]  # newest study first
    assert found("?name=doe") == [ct]  # anywhere in the name, any case
    assert found("?name=D*") == [ct]  # the user's own wildcard
    assert found("?name=evil") == [mr]
    assert found("?id=PAT-MR-2") == [mr]
    assert found("?accession=CT-77") == [ct]
    assert found("?modality=mr") == [mr]
    assert found("?modality=CT&name=doe") == [ct]
    assert found("?from=2026-01-01") == [mr]
    assert found("?from=2025-03-14&to=2025-03-14") == [ct]
    assert found("?to=20250313") == []
    assert found("?name=nobody") == []

    status, _, body = fetch(url, "/patients?name=jane")
    page = body.decode()
    assert status == 200 and "PAT-CT-1" in page and "PAT-MR-2" not in page
    assert 'href="/studies?patient_id=PAT-CT-1"' in page
    assert found("?patient_id=PAT-CT-1") == [ct] and found("?patient_id=PAT-CT") == []  # exactly
    assert "Patient ID exactly: PAT-CT-1" in fetch(url, "/studies?patient_id=PAT-CT-1")[2].decode()

    # The study page: header, series with one thumbnail per instance (5 <= 8 per series).
    status, _, body = fetch(url, f"/studies/{ct}")
    page = body.decode()
    assert status == 200
    assert "Doe, Jane" in page and "PAT-CT-1" in page and "ACC-CT-77" in page and "2025-03-14" in page
    thumbs = re.findall(rf'src="(/studies/{ct}/thumbnails/[0-9.]+\.jpg)"', page)
    assert len(thumbs) == 5
    sop = thumbs[0].rsplit("/", 1)[1][:-4]
    (stored_thumb,) = (server.storage / "thumbnails").rglob(f"{sop}.jpg")
    wait_until(lambda: fetch(url, thumbs[0])[0] == 200, 20, "the thumbnail")
    status, headers, data = fetch(url, thumbs[0])
    assert headers["content-type"] == "image/jpeg" and data == stored_thumb.read_bytes()

    # The scan sheet, once the study has been quiet for scansheet.study_timeout (1 s).
    wait_until(lambda: 'id="scansheet" src=' in fetch(url, f"/studies/{ct}")[2].decode(), 30, "the scan sheet")
    status, headers, data = fetch(url, f"/studies/{ct}/scansheet.png")
    (sheet,) = (p for p in server.storage.rglob("scansheet.png") if ct in str(p))
    assert status == 200 and headers["content-type"] == "image/png" and data == sheet.read_bytes()

    # The zip: every stored file of the study, named by the layout, byte for byte; nothing else.
    status, headers, data = fetch(url, f"/studies/{ct}.zip")
    assert status == 200 and headers["content-type"] == "application/zip"
    assert headers["transfer-encoding"] == "chunked"
    assert headers["content-disposition"] == f'attachment; filename="study-{ct}.zip"'
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        inside = {name: archive.read(name) for name in archive.namelist()}
    expected = stored_study(server, ct)
    assert len(expected) == 5 and inside == expected
    # HTTP/1.0 has no chunked framing: the body ends with the connection.
    with socket.create_connection(("127.0.0.1", int(url.rpartition(":")[2])), timeout=30) as sock:
        sock.sendall(f"GET /studies/{ct}.zip HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        answer = b"".join(iter(lambda: sock.recv(65536), b""))
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding" not in head
    with zipfile.ZipFile(io.BytesIO(body)) as archive:
        assert {name: archive.read(name) for name in archive.namelist()} == expected

    # The monitor asked the indexer: it never opened the index itself (DuckDB allows one process).
    (pid,) = re.findall(r"monitor started \(pid (\d+)\)", server.log_text())
    opened = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir() if fd.is_symlink()]
    assert not [name for name in opened if "index.duckdb" in name], opened

    # Every view of patient data is logged: who, what, from where.
    log = server.wait_for_log(f"viewed study {ct}", f"downloaded study {ct}")
    assert re.search(rf"local user \(no authentication on loopback\) from 127\.0\.0\.1 viewed study {ct} "
                     r'\(patient ID "PAT-CT-1"\)', log)
    assert 'searched studies (name="doe")' in log
    assert "searched patients (name=\"jane\")" in log


def test_hostile_patient_name_is_text(two_studies) -> None:  # type: ignore[no-untyped-def]
    server, url, _ct, mr = two_studies
    escaped = "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;, Evil"
    for path in ("/studies", f"/studies/{mr}", "/patients", "/studies?name=%3Cscript%3E"):
        status, _, body = fetch(url, path)
        page = body.decode()
        assert status == 200, path
        assert escaped in page, path
        assert "<script" not in page, path
    # The search value comes back in the form, escaped, and is logged quoted.
    page = fetch(url, "/studies?name=%22%3E%3Cscript%3E")[2].decode()
    assert 'value="&quot;&gt;&lt;script&gt;"' in page and "<script" not in page
    server.wait_for_log('searched studies (name="\\">')


#: Paths that name nothing: traversal attempts (plain, encoded, double-encoded, absolute) and bad UIDs;
#: {uid} is an unknown UID, then a real study's.
BAD_PATHS = (
    "/studies/../../etc/passwd",
    "/studies/..%2F..%2Fetc%2Fpasswd",
    "/studies/%2e%2e/%2e%2e/etc/passwd",
    "/studies/%252e%252e%252fetc%252fpasswd",
    "/studies//etc/passwd",
    "/studies/%2Fetc%2Fpasswd",
    "/studies/{uid}/../../index.duckdb",
    "/studies/{uid}/..%2F..%2Findex.duckdb",
    "/studies/{uid}/thumbnails/..%2F..%2Findex.duckdb.jpg",
    "/studies/{uid}/thumbnails/../../index.duckdb",
    "/studies/{uid}/thumbnails/1.2.3.4.jpg",
    "/studies/{uid}/scansheet.html",
    "/studies/{uid}/",
    "/studies/{uid}.zip/x",
    "/studies/{uid}%00.zip",
    "/studies/1..2",
    "/studies/" + "1." * 40 + "1",  # longer than 64 characters
    "/patients/..",
)


def test_unknown_uids_and_traversal_get_404(two_studies) -> None:  # type: ignore[no-untyped-def]
    _server, url, ct, _mr = two_studies
    # Bad searches are refused with a reason, not a dropped connection.
    for query, reason in (("?" + "x=1&" * 40, b"too many search fields"), ("?name=" + "a" * 65, b"name: at most 64"),
                          ("?id=a%0Ab", b"id: no control characters"), ("?from=2026-13", b"from: a date"),
                          ("?modality=C%2AT", b"modality: letters and digits")):
        status, _, body = fetch(url, "/studies" + query)
        assert status == 400 and reason in body, (query, body[-500:])
    for path in ("/studies/1.2.3", "/studies/1.2.3.zip", "/studies/1.2.3/scansheet.png",
                 f"/studies/1.2.3/thumbnails/{ct}.jpg"):
        status, _, body = fetch(url, path)
        assert status == 404, (path, body[:300])
    for template in BAD_PATHS:
        for uid in ("1.2.3", ct):
            path = template.format(uid=uid)
            status, _, body = fetch(url, path)
            assert status == 404, (path, body[:300])


def test_files_outside_the_storage_root_are_never_served(two_studies, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server, url, ct, _mr = two_studies
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"outside the storage root")
    # A thumbnail and a stored file replaced by links out of the root (as a local intruder could).
    page = fetch(url, f"/studies/{ct}")[2].decode()
    thumb = re.findall(rf'src="(/studies/{ct}/thumbnails/[0-9.]+\.jpg)"', page)[0]
    sop = thumb.rsplit("/", 1)[1][:-4]
    wait_until(lambda: any((server.storage / "thumbnails").rglob(f"{sop}.jpg")), 20, "the thumbnail")
    (thumb_file,) = (server.storage / "thumbnails").rglob(f"{sop}.jpg")
    thumb_file.unlink()
    thumb_file.symlink_to(secret)
    assert fetch(url, thumb)[0] == 404

    files = sorted(p for p in server.stored_files() if ct in str(p))
    files[0].unlink()
    files[0].symlink_to(secret)
    files[1].unlink()  # gone since it was indexed
    status, _, data = fetch(url, f"/studies/{ct}.zip")
    assert status == 200
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        names = archive.namelist()
        missing = archive.read("fastscp-missing.txt").decode()
        contents = b"".join(archive.read(n) for n in names)
    assert b"outside the storage root" not in contents
    relative = [str(p.relative_to(server.storage)) for p in files]
    assert relative[0] not in names and relative[1] not in names and len(names) == 4
    assert f"{relative[0]}: not inside the storage root" in missing
    assert f"{relative[1]}: No such file or directory" in missing


def test_the_zip_streams_in_bounded_memory_and_cut_off_downloads_free_their_slot(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(monitor="127.0.0.1:0", config=write_config(tmp_path))
    url = server.monitor_url()
    # 24 images of 2 MiB: a 48 MiB study.
    uid, paths = make_study(tmp_path / "big", 24, patient_id="BIG", name="Big^Study", accession="B1",
                            date="20260101", seed=5, size=1024)
    send(server, paths)
    wait_indexed(url, uid, 24)
    (pid,) = re.findall(r"monitor started \(pid (\d+)\)", server.log_text())

    def peak_rss() -> int:
        status = Path(f"/proc/{pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]

    # Downloads cut off after 1 MiB, more of them than MAX_DOWNLOADS: each frees its slot.
    port = int(url.rpartition(":")[2])
    for _ in range(MAX_DOWNLOADS + 2):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(f"GET /studies/{uid}.zip HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
            received = 0
            while received < 1 << 20:
                chunk = sock.recv(65536)
                assert chunk, "the server closed the download early"
                received += len(chunk)
    server.wait_for_log("stopped: the client went away")
    for _ in range(MAX_DOWNLOADS + 1):  # a HEAD takes a slot too, and gives it back
        status, headers, _ = fetch(url, f"/studies/{uid}.zip", method="HEAD")
        assert status == 200 and headers["content-type"] == "application/zip"

    before = peak_rss()
    status, _, data = fetch(url, f"/studies/{uid}.zip")
    assert status == 200, data[:300]
    grown = peak_rss() - before
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        inside = {name: archive.read(name) for name in archive.namelist()}
    assert inside == stored_study(server, uid) and sum(map(len, inside.values())) > 48 * 1024 * 1024
    # A few chunks (queued, being sent, read, gathered) and allocator slack: 1.5-4.5 MiB measured
    # here; never the 48 MiB study.
    assert grown < (ZIP_AHEAD + 3) * ZIP_CHUNK + 8 * 1024 * 1024, grown


def _basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_beyond_loopback_credentials_are_required(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # 0.0.0.0: every address of this machine, so "elsewhere"; the test still talks to 127.0.0.1 only.
    config = write_config(tmp_path, username=USER, password=PASSWORD, token=TOKEN)
    server = start_server(monitor="0.0.0.0:0", config=config)
    url = server.monitor_url()
    uid, paths = make_study(tmp_path / "ct", 2, patient_id="AUTH-1", name="Auth^Test", accession="A1",
                            date="20260101", seed=3)
    send(server, paths)

    for path in ("/studies", "/patients", f"/studies/{uid}", f"/studies/{uid}.zip"):
        status, headers, body = fetch(url, path)
        assert status == 401, path
        assert headers["www-authenticate"].startswith('Basic realm="fastscp study browser"')
        assert b"Auth" not in body
    assert fetch(url, "/studies", _basic(USER, "wrong"))[0] == 401
    assert fetch(url, "/studies", _basic("other", PASSWORD))[0] == 401
    assert fetch(url, "/studies", {"Authorization": "Bearer " + TOKEN[:-1] + "x"})[0] == 401
    assert fetch(url, "/studies", {"Authorization": "Basic !!!"})[0] == 401
    server.wait_for_log('wrong credentials from 127.0.0.1 ("basic" user "other")',
                        'wrong credentials from 127.0.0.1 ("basic" user "(not base64 UTF-8)")',
                        'wrong credentials from 127.0.0.1 ("bearer")')
    # The scheme is case-insensitive (RFC 9110 11.1).
    assert fetch(url, "/patients", {"Authorization": "basic " + _basic(USER, PASSWORD)["Authorization"][6:]})[0] == 200

    wait_indexed(url, uid, 2, _basic(USER, PASSWORD))
    assert study_rows(fetch(url, "/studies", _basic(USER, PASSWORD))[2].decode()) == [uid]
    status, _, body = fetch(url, f"/studies/{uid}", {"Authorization": "Bearer " + TOKEN})
    assert status == 200 and b"Auth, Test" in body
    log = server.wait_for_log(f'user "{USER}" from 127.0.0.1 searched studies', f"bearer token holder from "
                              f"127.0.0.1 viewed study {uid}")
    assert PASSWORD not in log and TOKEN not in log

    # The status is not patient data: no credentials needed, and none shown.
    status, _, body = fetch(url, "/status.json")
    assert status == 200 and PASSWORD.encode() not in body and TOKEN.encode() not in body
    assert fetch(url, "/healthz")[0] == 200


def test_beyond_loopback_without_credentials_the_browser_is_off(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    server = start_server(monitor="0.0.0.0:0", config=write_config(tmp_path))
    url = server.monitor_url()
    uid, paths = make_study(tmp_path / "ct", 1, patient_id="OFF-1", name="Off^Test", accession="O1",
                            date="20260101", seed=4)
    send(server, paths)
    wait_until(lambda: fetch(url, "/status.json")[0] == 200, 15, "the status")
    for path in ("/studies", "/patients", f"/studies/{uid}", f"/studies/{uid}.zip"):
        status, _, body = fetch(url, path)
        assert status == 403 and b"monitor.username" in body and b"Off" not in body, path
    assert "study browser off: monitor.listen 0.0.0.0:0 is beyond loopback and no credentials" in server.log_text()


def test_on_loopback_only_loopback_host_names_are_served(two_studies) -> None:  # type: ignore[no-untyped-def]
    _server, url, _ct, _mr = two_studies
    # A page of another site that rebinds its name to 127.0.0.1 sends its own Host.
    assert fetch(url, "/studies", {"Host": "attacker.example:8080"})[0] == 403
    assert fetch(url, "/studies", {"Host": "localhost"})[0] == 200
    assert fetch(url, "/studies", {"Host": "127.0.0.1"})[0] == 200
    assert fetch(url, "/", {"Host": "attacker.example"})[0] == 200  # the status page: no patient data


def test_credentials_apply_on_loopback_too_and_the_browser_can_be_turned_off(tmp_path: Path) -> None:
    def status(browser: Browser) -> int:
        request = Request("GET", "/studies", "HTTP/1.1", {"host": "127.0.0.1"})
        try:
            return asyncio.run(browser.respond(request, "127.0.0.1")).status
        finally:
            browser.close()

    config = load_config(str(write_config(tmp_path, username=USER, password=PASSWORD)))
    assert status(Browser.from_config(config, "127.0.0.1")) == 401
    config = load_config(str(write_config(tmp_path, browser=False)))
    assert status(Browser.from_config(config, "127.0.0.1")) == 403


def test_what_counts_as_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert is_loopback("::ffff:127.0.0.1")
    for host in ("0.0.0.0", "::", "192.0.2.2", "10.0.0.1", "localhost", "::ffff:10.0.0.1"):
        assert not is_loopback(host), host


def test_credential_config_errors(tmp_path: Path) -> None:
    def error(**monitor: str) -> str:
        with pytest.raises(ConfigError) as info:
            load_config(str(write_config(tmp_path, **monitor)))
        return str(info.value)

    assert "monitor.password: empty, but monitor.username is set" in error(username="a")
    assert "monitor.username: empty, but monitor.password is set" in error(password="secret123")
    assert "monitor.username: no ':'" in error(username="a:b", password="secret123")
    assert "monitor.token: use at least 16" in error(token="short")
    assert "monitor.token: use at least 16" in error(token="with a space in it, long enough")
    assert load_config(str(write_config(tmp_path, token=TOKEN))).monitor.token == TOKEN


@pytest.fixture(scope="module")
def _chromium_present() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail("Chromium is missing: install Debian's chromium package (apt-get install chromium)")


@pytest.mark.usefixtures("_chromium_present")
def test_pages_in_headless_chromium(two_studies, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _server, url, ct, mr = two_studies
    dom = chromium(tmp_path, url + "/studies", "--dump-dom")
    page = _Page(dom)
    assert study_rows(dom) == [mr, ct]
    rows = page.text["study-list"]
    assert "Doe, Jane" in rows and "PAT-CT-1" in rows and "ACC-CT-77" in rows and "2025-03-14" in rows
    assert '<script>alert("pwned")</script>, Evil' in rows  # as text
    assert "script" not in page.tags
    assert "2 matches" in page.text["count"]

    dom = chromium(tmp_path, url + "/studies?modality=CT", "--dump-dom")
    assert study_rows(dom) == [ct]

    wait_until(lambda: 'id="scansheet" src=' in fetch(url, f"/studies/{ct}")[2].decode(), 30, "the scan sheet")
    dom = chromium(tmp_path, f"{url}/studies/{ct}", "--dump-dom")
    page = _Page(dom)
    assert "PAT-CT-1" in page.text["study"] and "5 in 1 series" in page.text["study"]
    assert page.tags.count("img") == 6  # 5 thumbnails and the scan sheet

    ARTIFACTS.mkdir(exist_ok=True)
    for name, path in (("browser-studies.png", "/studies"), ("browser-study.png", f"/studies/{ct}"),
                       ("browser-patients.png", "/patients"), ("browser-hostile-study.png", f"/studies/{mr}")):
        shot = tmp_path / name
        chromium(tmp_path, url + path, f"--screenshot={shot}")
        assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000
        shutil.copy(shot, ARTIFACTS / name)  # for people to look at
