"""Post-receive hooks run by a real server: real scripts that record their input,
fail, hang; hostile tag values; the concurrency limit; the built-in JPEG and
copy actions; a reload that changes the hooks (fastscp.hooks)."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
import urllib.request
import uuid
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pydicom.uid import SecondaryCaptureImageStorage

from fastscp.dicom.synthetic import write_series
from tests.conftest import dcmtk, wait_until
from tests.e2e.test_server import fastscp
from tests.unit.monitor.test_monitor_page import chromium

pytestmark = pytest.mark.dcmtk

#: Writes what it was given (argv, its FASTSCP_* environment, stdin) to OUT/<event>-<pid>.json, atomically.
RECORDER = """#!{python} -IS
import json, os, sys
out = {out!r}
record = {{"argv": sys.argv, "stdin": sys.stdin.read(), "pid": os.getpid(),
          "env": {{k: v for k, v in os.environ.items() if k.startswith("FASTSCP_")}},
          "inherited": os.environ.get("HOOK_TEST_MARK", "")}}
name = os.path.join(out, record["env"]["FASTSCP_EVENT"] + "-" + str(os.getpid()) + ".json")
with open(name + ".tmp", "w") as f:
    json.dump(record, f)
os.rename(name + ".tmp", name)
print("patient:", record["env"].get("FASTSCP_PATIENT_NAME", ""))
"""


#: No thumbnails or scan sheets: only the hooks run in the post-store process.
QUIET = "thumbnails: {enabled: false}\nscansheet: {enabled: false}\n"


def script(path: Path, text: str) -> str:
    path.write_text(text)
    path.chmod(0o755)
    return str(path)


def recorder(tmp_path: Path, name: str = "record") -> tuple[str, Path]:
    out = tmp_path / f"{name}-out"
    out.mkdir()
    return script(tmp_path / f"{name}.py", RECORDER.format(python=sys.executable, out=str(out))), out


def records(out: Path, event: str) -> list[dict]:  # type: ignore[type-arg]
    return [json.loads(p.read_text()) for p in sorted(out.glob(f"{event}-*.json"))]


def serve(start_server, tmp_path: Path, yaml: str, **kwargs):  # type: ignore[no-untyped-def]
    config = tmp_path / "fastscp.yaml"
    config.write_text(yaml)
    server = start_server(config=config, **kwargs)
    # The post-store process takes events once it listens (it logs its hooks then).
    server.wait_for_log("hooks in force")
    return server, config


def send(server, *files: str, aet: str = "STORESCU") -> None:  # type: ignore[no-untyped-def]
    dcmtk("storescu", "-aec", server.ae_title, "-aet", aet, "-xe", "127.0.0.1", str(server.port), *files)


def wait(server, predicate, what: str, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    """wait_until, with the server's log in the failure."""
    try:
        wait_until(predicate, timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{server.log_text()}") from None


def status(server) -> dict:  # type: ignore[no-untyped-def,type-arg]
    url = server.monitor_url()
    with urllib.request.urlopen(url + "/status.json", timeout=10) as response:
        return json.loads(response.read())


def hook_state(server, name: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    (state,) = [h for h in status(server)["hooks"] if h["name"] == name]
    return state


def metrics(server) -> dict[tuple[str, str], float]:  # type: ignore[no-untyped-def]
    url = server.monitor_url()
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(s.name, s.labels.get("hook", "")): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def canaries() -> list[Path]:
    return [Path(f"/tmp/fastscp-canary-{uuid.uuid4().hex[:8]}-{n}") for n in range(4)]


def test_hooks_get_every_event_verbatim_and_no_value_is_run(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """instance-stored, association-ended and study-complete reach a recording script; hostile tag values
    (command substitution, backticks, ;, newline) arrive as they were sent, in env and JSON, and run nothing."""
    program, out = recorder(tmp_path)
    canary = canaries()
    hostile_name = f"$(touch {canary[0]})^`touch {canary[1]}`;touch {canary[2]}\nFORGED: line"
    hostile_id = f"P1;touch {canary[3]} |&' \"$HOME"
    series = write_series(str(tmp_path / "ct"), 4, rows=16, columns=16)
    for path in series:
        ds = pydicom.dcmread(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about the values' length and characters
            ds.PatientName = hostile_name
            ds.PatientID = hostile_id
            ds.save_as(path, enforce_file_format=True)
    argument = f"--study=$(touch {canary[0]}) `id` ;"
    server, _ = serve(start_server, tmp_path, f"""
scansheet: {{study_timeout: 1}}
thumbnails: {{enabled: false}}
hooks:
  - {{name: stored, event: instance-stored, program: [{program}, {json.dumps(argument)}]}}
  - {{name: ended, event: association-ended, program: [{program}], match: {{calling_aets: [MODALITY_1]}}}}
  - {{name: quiet, event: study-complete, program: [{program}], match: {{modalities: [ct]}}}}
  - {{name: never, event: instance-stored, program: [{program}], match: {{sop_classes: [MR]}}}}
""", env={"HOOK_TEST_MARK": "inherited", "FASTSCP_FROM_OUTSIDE": "not passed on"})
    send(server, *series[:3], aet="MODALITY_1")
    send(server, series[3], aet="OTHER_AE")  # a second association: no association-ended hook matches it
    stored_files = server.stored_files()
    assert len(stored_files) == 4
    wait(server, lambda: len(records(out, "instance-stored")) == 4 and records(out, "association-ended")
         and records(out, "study-complete"), "the hooks' records", 60)
    time.sleep(0.5)  # anything that should not have run has had its chance

    stored = records(out, "instance-stored")
    assert len(stored) == 4, "the MR-only hook ran for none"
    for record in stored:
        env, document = record["env"], json.loads(record["stdin"])
        assert record["argv"][1:] == [argument]
        assert env["FASTSCP_PATIENT_NAME"] == hostile_name and env["FASTSCP_PATIENT_ID"] == hostile_id
        assert document["instance"]["header"]["patient_name"] == hostile_name
        assert document["instance"]["header"]["patient_id"] == hostile_id
        assert env["FASTSCP_EVENT"] == document["event"] == "instance-stored"
        assert env["FASTSCP_HOOK"] == "stored" and env["FASTSCP_ATTEMPT"] == "1"
        path = Path(env["FASTSCP_PATH"])
        assert path in stored_files and document["instance"]["path"] == str(path)
        assert env["FASTSCP_RELATIVE_PATH"] == str(path.relative_to(server.storage))
        assert env["FASTSCP_SIZE"] == str(path.stat().st_size)
        header = pydicom.dcmread(path, stop_before_pixels=True)
        assert env["FASTSCP_SOP_INSTANCE_UID"] == header.SOPInstanceUID
        assert env["FASTSCP_STUDY_INSTANCE_UID"] == header.StudyInstanceUID
        assert env["FASTSCP_SOP_CLASS_UID"] == header.SOPClassUID and env["FASTSCP_MODALITY"] == "CT"
        assert "FASTSCP_FROM_OUTSIDE" not in env and record["inherited"] == "inherited"
    assert sorted(r["env"]["FASTSCP_CALLING_AE"] for r in stored) == ["MODALITY_1"] * 3 + ["OTHER_AE"]

    (ended,) = records(out, "association-ended")
    env, document = ended["env"], json.loads(ended["stdin"])["association"]
    assert env["FASTSCP_CALLING_AE"] == "MODALITY_1" and env["FASTSCP_INSTANCES"] == "3"
    assert env["FASTSCP_OUTCOME"] == "released" and document["outcome"] == "released"
    assert sorted(document["stored"]) == sorted(r["env"]["FASTSCP_PATH"] for r in stored
                                                 if r["env"]["FASTSCP_CALLING_AE"] == "MODALITY_1")
    assert document["stored_count"] == 3 and len(document["stored"]) == 3

    (quiet,) = records(out, "study-complete")
    env, document = quiet["env"], json.loads(quiet["stdin"])["study"]
    assert env["FASTSCP_STUDY_INSTANCE_UID"] == document["study_instance_uid"] == header.StudyInstanceUID
    assert env["FASTSCP_PATIENT_NAME"] == hostile_name and env["FASTSCP_INSTANCES"] == "4"
    assert env["FASTSCP_STUDY_DIR"] == str(stored_files[0].parent.parent)
    assert env["FASTSCP_CALLING_AES"] == "MODALITY_1\\OTHER_AE"

    assert not any(c.exists() for c in canary), "a tag value or an argument was run by a shell"
    # The hook's output (the name, with its newline) is logged escaped: no line of the peer's making.
    log = server.log_text()
    assert "patient: $(touch" in log and "\\x0aFORGED: line" in log
    assert not re.search(r"^FORGED", log, re.MULTILINE)


def test_failing_hook_is_retried_then_counted(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    attempts = tmp_path / "attempts"
    program = script(tmp_path / "fail.sh",
                     f'#!/bin/sh\necho "attempt $FASTSCP_ATTEMPT" >> {attempts}\necho "no PACS at $FASTSCP_PATH" >&2\n'
                     "exit 3\n")
    server, _ = serve(start_server, tmp_path, f"""
{QUIET}hooks:
  - {{name: fails, event: instance-stored, program: [{program}], retries: 2, retry_backoff: 0.3}}
""", monitor="127.0.0.1:0")
    send(server, *write_series(str(tmp_path / "ct"), 1, rows=16, columns=16))
    wait(server, lambda: "given up after 3 attempts" in server.log_text(), "the last attempt", 30)
    assert attempts.read_text().split("\n")[:3] == ["attempt 1", "attempt 2", "attempt 3"]
    log = server.log_text()
    assert "exit status 3; output: no PACS at" in log
    assert "retry 1 of 2 in 0.3 s" in log and "retry 2 of 2 in 0.6 s" in log
    wait(server, lambda: hook_state(server, "fails")["failed"] == 1, "the failure on the status page")
    state = hook_state(server, "fails")
    assert (state["runs"], state["succeeded"], state["retried"], state["failed"]) == (3, 0, 2, 1)
    assert state["last_error"].startswith("exit status 3; output: no PACS at")
    samples = metrics(server)
    assert samples[("fastscp_hook_failed_total", "fails")] == 1
    assert samples[("fastscp_hook_retried_total", "fails")] == 2
    # The status page shows the hook's row and an alert.
    url = server.monitor_url()
    dom = chromium(tmp_path, url + "/", "--dump-dom")
    assert '<section id="hooks-section">' in dom, "the hooks table is shown"
    assert "Hook fails gave up on 1 events" in dom and "exit status 3; output: no PACS at" in dom
    result = fastscp("status", "--url", url)
    assert result.returncode == 0, result.stderr
    line = (r"^Hook fails +instance-stored: 3 runs, 0 succeeded, 1 failed, 2 retried, 0 timed out; 0 running, "
            r"0 queued; last error at [0-9:]+: exit status 3; output: no PACS at ")
    assert re.search(line, result.stdout, re.MULTILINE), result.stdout


def test_hanging_hook_is_killed_and_the_server_keeps_storing(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The whole process group goes at the timeout (a child it started too); stores meanwhile are not held up."""
    pids = tmp_path / "pids"
    program = script(tmp_path / "hang.sh",
                     f"#!/bin/sh\ntrap '' TERM\nsleep 600 &\necho $$ $! >> {pids}\nwait\n")
    server, _ = serve(start_server, tmp_path, f"""
{QUIET}hooks:
  - {{name: hangs, event: instance-stored, program: [{program}], timeout: 3, max_concurrent: 1}}
""", monitor="127.0.0.1:0")
    series = write_series(str(tmp_path / "ct"), 6, rows=16, columns=16)
    send(server, series[0])
    wait(server, lambda: pids.exists() and pids.read_text().count("\n") == 1, "the hook to start")
    send(server, *series[1:])  # while it hangs (it ignores SIGTERM: SIGKILL ends it)
    assert len(server.stored_files()) == 6
    assert "timed out" not in server.log_text(), "the stores waited for the hook"
    shell, sleeper = map(int, pids.read_text().split())
    wait(server, lambda: "timed out after 3 s: killed" in server.log_text(), "the kill", 30)
    try:
        wait(server, lambda: not _alive(shell) and not _alive(sleeper), "the group to be gone", 10)
    finally:
        _kill([shell, sleeper])
    wait(server, lambda: hook_state(server, "hangs")["timed_out"] >= 1, "the count")
    state = hook_state(server, "hangs")
    assert state["failed"] >= 1 and state["runs"] + state["queued"] == 6
    # The queued ones run (and hang) one at a time; stopping kills what runs, drops what waits.
    assert server.stop() == 0
    shells = [int(line.split()[0]) for line in pids.read_text().splitlines()]
    assert not any(_alive(pid) for line in pids.read_text().splitlines() for pid in map(int, line.split()))
    assert len(shells) < 6


def test_running_hooks_die_with_a_killed_server(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """kill -9 of the supervisor: the post-store process kills its hooks' process groups, nothing is left behind."""
    pids = tmp_path / "pids"
    program = script(tmp_path / "hang.sh", f"#!/bin/sh\nsleep 600 &\necho $$ $! >> {pids}\nwait\n")
    server, _ = serve(start_server, tmp_path, f"""
{QUIET}hooks:
  - {{name: hangs, event: instance-stored, program: [{program}], timeout: 600}}
""")
    send(server, *write_series(str(tmp_path / "ct"), 2, rows=16, columns=16))
    wait(server, lambda: pids.exists() and pids.read_text().count("\n") == 2, "both runs to start")
    server.process.kill()
    server.process.wait(10)
    hooks = [int(pid) for line in pids.read_text().splitlines() for pid in line.split()]
    try:
        wait(server, lambda: not any(map(_alive, hooks)), "the hooks to be killed", 20)
    finally:
        _kill(hooks)


def _kill(pids: list[int]) -> None:
    """What a failed test left running, by PID."""
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_concurrency_limit(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    times = tmp_path / "times"
    times.mkdir()
    # Written beside, then moved in: the test counts whole files (a file the shell's ">" made may still be empty).
    program = script(tmp_path / "slow.sh",
                     f"#!/bin/sh\nt0=$(date +%s.%N)\nsleep 1\necho $t0 $(date +%s.%N) > {tmp_path}/$$.span\n"
                     f"mv {tmp_path}/$$.span {times}/$$\n")
    server, _ = serve(start_server, tmp_path, f"""
{QUIET}hooks:
  - {{name: slow, event: instance-stored, program: [{program}], max_concurrent: 2}}
""")
    send(server, *write_series(str(tmp_path / "ct"), 6, rows=16, columns=16))
    wait(server, lambda: len(list(times.iterdir())) == 6, "six runs", 60)
    spans = [tuple(map(float, p.read_text().split())) for p in times.iterdir()]
    most = max(sum(1 for s, e in spans if s <= t < e) for t, _ in spans)
    assert most == 2, f"{most} ran at once: {sorted(spans)}"


def test_builtin_jpeg_for_secondary_capture_and_byte_exact_copy(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    jpegs, copies = tmp_path / "jpeg", tmp_path / "copy"
    server, _ = serve(start_server, tmp_path, f"""
storage: {{file_mode: '0600', dir_mode: '0700'}}
{QUIET}hooks:
  - {{name: sc-jpeg, event: instance-stored, action: jpeg, directory: {jpegs}, match: {{sop_classes: [SC]}}}}
  - {{name: mirror, event: instance-stored, action: copy, directory: {copies}}}
""")
    ct = write_series(str(tmp_path / "ct"), 2, rows=24, columns=20)
    sc = write_series(str(tmp_path / "sc"), 1, rows=40, columns=30, modality="OT",
                      sop_class=SecondaryCaptureImageStorage, seed=3)
    send(server, *ct, *sc)
    stored = server.stored_files()
    assert len(stored) == 3
    wait(server, lambda: all((copies / p.relative_to(server.storage)).exists() for p in stored)
         and list(jpegs.rglob("*.jpg")), "the copies and the JPEG")
    for path in stored:
        copy = copies / path.relative_to(server.storage)
        assert copy.read_bytes() == path.read_bytes()
        assert copy.stat().st_mode & 0o777 == 0o600 and copy.parent.stat().st_mode & 0o777 == 0o700
    assert not [p for p in copies.rglob("*") if p.name.startswith(".tmp-")]
    (jpeg,) = jpegs.rglob("*.jpg")
    (sc_stored,) = [p for p in stored if pydicom.dcmread(p).SOPClassUID == SecondaryCaptureImageStorage]
    assert jpeg == (jpegs / sc_stored.relative_to(server.storage)).with_suffix(".jpg")
    with Image.open(jpeg) as image:
        assert image.format == "JPEG" and image.size == (30, 40)  # full size: columns x rows
        assert np.asarray(image).std() > 5
    assert jpeg.stat().st_mode & 0o777 == 0o600
    wait(server, lambda: server.log_text().count("hook mirror (instance-stored, attempt 1)") == 3, "log lines")


def test_sighup_picks_up_changed_hooks(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    program, out = recorder(tmp_path)
    server, config = serve(start_server, tmp_path, f"""
{QUIET}hooks:
  - {{name: first, event: instance-stored, program: [{program}, first]}}
""")
    series = write_series(str(tmp_path / "ct"), 2, rows=16, columns=16)
    send(server, series[0])
    wait(server, lambda: len(records(out, "instance-stored")) == 1, "the first hook", 30)
    config.write_text(f"""
{QUIET}hooks:
  - {{name: second, event: instance-stored, program: [{program}, second]}}
""")
    server.signal(signal.SIGHUP)
    server.wait_for_log("config reloaded (SIGHUP): hooks in force", "hooks in force: second")
    send(server, series[1])
    wait(server, lambda: len(records(out, "instance-stored")) == 2, "the second hook", 30)
    time.sleep(0.5)
    assert sorted(r["argv"][1] for r in records(out, "instance-stored")) == ["first", "second"]

    # A hook that can't run is refused on reload, naming the key and the file; the running hooks stay.
    config.write_text("hooks:\n  - {name: bad, event: instance-stored, program: [/no/such/program]}\n")
    server.signal(signal.SIGHUP)
    server.wait_for_log(f"{config}: hooks[0].program: '/no/such/program' is not an executable file")


def test_config_errors_name_the_hook_key_and_the_file(tmp_path: Path) -> None:
    from fastscp.config import ConfigError, load_config

    config = tmp_path / "site.yaml"
    config.write_text("hooks:\n  - {name: a, event: instance-stored, program: [no-such-program-here]}\n")
    result = fastscp("config", "--config", str(config))
    assert result.returncode == 2, result.stdout
    assert (f"{config}: hooks[0].program: 'no-such-program-here' is not an executable file on PATH; give its "
            "absolute path") in result.stderr
    for text, expected in [
        ("hooks:\n  - {name: a, event: stored, program: [/bin/true]}\n",
         "hooks[0].event: Invalid enum value 'stored'"),
        ("hooks:\n  - {name: a, event: instance-stored}\n",
         "hooks[0].program: give a hook either a program"),
        ("hooks:\n  - {name: a, event: study-complete, action: copy, directory: /tmp/x}\n",
         "hooks[0].event: the copy action runs on instance-stored only"),
        ("storage: {directory: /srv/dicom}\nhooks:\n  - {name: a, event: instance-stored, action: copy, "
         "directory: /srv/dicom/copy}\n", "hooks[0].directory: '/srv/dicom/copy' overlaps storage.directory"),
        ("hooks:\n  - {name: a, event: instance-stored, program: [/bin/true], match: {sop_classes: [XYZ]}}\n",
         "hooks[0].match.sop_classes: unknown SOP class or modality 'XYZ'"),
        ("hooks:\n  - {name: a, event: instance-stored, action: nifti}\n",
         "hooks[0].event: the nifti action runs on study-complete only (got 'instance-stored')"),
        ("storage: {directory: /srv/dicom}\nhooks:\n  - {name: a, event: study-complete, action: nifti, "
         "directory: /srv/dicom/volumes}\n", "hooks[0].directory: '/srv/dicom/volumes' overlaps storage.directory "
         "'/srv/dicom'; leave directory empty for its reserved folder there (nifti/)"),
        ("hooks:\n  - {name: a, event: study-complete, action: nifti, program: [/bin/true]}\n",
         "hooks[0].program: give a hook either a program (an argv list) or a built-in action (jpeg, copy, nifti)"),
    ]:
        config.write_text(text)
        with pytest.raises(ConfigError) as error:
            load_config(str(config))
        assert str(error.value).startswith(f"{config}: {expected}")


def test_nifti_action_writes_a_volume_per_series_of_a_quiet_study(start_server, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """study-complete -> one .nii.gz per image series beside the study (storage/nifti/<study folder>/), atomically;
    a series dcm2niix can't make one volume of fails the run (logged, counted) and the others are written; the
    post-store process goes on with the next study."""
    from tests.e2e.test_media import _check_volume, _series

    server, _ = serve(start_server, tmp_path, """
thumbnails: {enabled: false}
scansheet: {enabled: false, study_timeout: 1}
hooks:
  - {name: volumes, event: study-complete, action: nifti}
""", monitor="127.0.0.1:0")
    # An axial CT, slices sent head to feet, non-square pixels (test_media checks the same with the CLI) ...
    ct = _series(tmp_path, "ct", modality="CT", sop_class="1.2.840.10008.5.1.4.1.1.2",
                 orientation=(1, 0, 0, 0, 1, 0), spacing=(0.8, 0.6), step=(0, 0, 2.5), count=7,
                 order=[6, 5, 4, 3, 2, 1, 0])
    # ... and in the same study an MR series of two echoes: two volumes, which the action refuses.
    echoes = write_series(str(tmp_path / "echoes"), 4, rows=8, columns=8, modality="MR",
                          sop_class="1.2.840.10008.5.1.4.1.1.4", image_positions=[(0.0, 0.0, 2.0 * (k % 2))
                                                                                 for k in range(4)],
                          image_orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(1.0, 1.0), slice_thickness=2.0)
    study = pydicom.dcmread(ct[0], stop_before_pixels=True)
    for k, path in enumerate(echoes):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.PatientID = study.StudyInstanceUID, study.PatientID
        ds.EchoNumbers, ds.EchoTime = 1 + k // 2, 10.0 * (1 + k // 2)
        ds.save_as(path, enforce_file_format=True)
    send(server, *ct, *echoes)
    (ct_stored,) = {p.parent.parent for p in server.stored_files()}  # the hierarchical layout's study folder
    volume = server.storage / "nifti" / ct_stored.relative_to(server.storage) / f"{study.SeriesInstanceUID}.nii.gz"
    wait(server, lambda: "hook volumes (study-complete, attempt 1)" in server.log_text(), "the nifti run", 60)
    log = server.log_text()
    assert "failed after" in log and "1 of 2 series not converted (1 written): series " in log, log
    assert "makes 2 volumes" in log
    assert volume.exists() and volume.read_bytes()[:2] == b"\x1f\x8b"
    assert sorted(p.name for p in volume.parent.iterdir()) == [volume.name], "no partial file or temp folder"
    image = nib.load(volume)
    assert image.shape == (10, 12, 7)
    assert np.allclose(image.affine, [[-0.6, 0, 0, 30.0], [0, 0.8, 0, 20.0 - 11 * 0.8], [0, 0, 2.5, 20.0],
                                      [0, 0, 0, 1]], atol=1e-4), image.affine
    _check_volume(volume, ct)
    assert volume.stat().st_mode & 0o777 == 0o640
    # The post-store process goes on: the next quiet study gets its volume, and the counts show both runs.
    single = write_series(str(tmp_path / "next"), 3, rows=8, columns=8, patient_id="NEXT", seed=5,
                          image_positions=[(0.0, 0.0, 3.0 * k) for k in range(3)],
                          image_orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(1.0, 1.0), slice_thickness=3.0)
    send(server, *single)
    series_uid = pydicom.dcmread(single[0], stop_before_pixels=True).SeriesInstanceUID
    wait(server, lambda: list((server.storage / "nifti").rglob(f"{series_uid}.nii.gz")), "the next volume", 60)
    wait(server, lambda: hook_state(server, "volumes")["succeeded"] == 1, "the counts", 30)
    state = hook_state(server, "volumes")
    assert (state["runs"], state["failed"], state["succeeded"]) == (2, 1, 1), state
    assert "series not converted" in state["last_error"]
    (next_volume,) = (server.storage / "nifti").rglob(f"{series_uid}.nii.gz")
    assert nib.load(next_volume).shape == (8, 8, 3)


def test_nifti_action_converts_nothing_when_a_listed_file_is_not_readable_here(tmp_path: Path) -> None:
    """A study-complete event without a study folder (a flat layout; in a shared index, a study of several nodes)
    names its files: all readable, a volume per series in nifti/<StudyInstanceUID>/; one that can't be read
    here (another node's own disk), nothing at all, rather than a volume of part of a series. In process."""
    from fastscp.config import HookConfig
    from fastscp.hooks.actions import run_action
    from fastscp.hooks.events import Event
    from fastscp.media.nifti import NiftiError
    from fastscp.storage.files import FileModes

    root = tmp_path / "storage"
    files = write_series(str(root), 4, rows=8, columns=8, image_positions=[(0.0, 0.0, 2.0 * k) for k in range(4)],
                         image_orientation=(1, 0, 0, 0, 1, 0), pixel_spacing=(1.0, 1.0), slice_thickness=2.0)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    hook = HookConfig(name="volumes", event="study-complete", action="nifti")

    def event(stored: list[str]) -> Event:
        return Event(kind="study-complete", env={"FASTSCP_STUDY_DIR": ""}, subject="a study",
                     document={"study_instance_uid": header.StudyInstanceUID, "stored": stored},
                     sop_classes=frozenset(), modalities=frozenset(), calling_aets=frozenset(),
                     storage_dir=str(root))

    elsewhere = "/srv/node-b/received/P1/other.dcm"
    with pytest.raises(NiftiError, match=f"1 of the study's files can't be read here.*{elsewhere}"):
        run_action(hook, event([*files, elsewhere]), FileModes())
    assert not (root / "nifti").exists()
    made = run_action(hook, event(files), FileModes())
    assert made == str(root / "nifti" / header.StudyInstanceUID / f"{header.SeriesInstanceUID}.nii.gz")
    assert nib.load(made).shape == (8, 8, 4)


def _drive(hooks, until, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
    """Run a Hooks object's loop (tick, then its ready pipes) as the post-store process does."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the hooks did not finish"
        due = hooks.tick()
        hooks.dispatch(min(0.05, due if due is not None else 0.05))


def test_a_large_document_reaches_a_slow_reader_and_a_program_that_never_reads_does_not_block(
        tmp_path: Path) -> None:
    """An association-ended document of 5,000 paths (~1 MB) is written as the program reads it (the pipe holds
    64 KiB): all of it arrives; a program that ignores its input ends normally. In process, with real programs."""
    from fastscp.config import HookConfig, layout_options, load_config
    from fastscp.dicom.header import HeaderFields
    from fastscp.hooks.actions import run_action
    from fastscp.hooks.runner import Hooks
    from fastscp.index.records import AssociationReport, InstanceRecord
    from fastscp.status import LATENCY_BUCKETS, SIZE_BUCKETS, AssociationState, Histogram
    from fastscp.storage.files import FileModes

    received = tmp_path / "received-bytes"
    reader = script(tmp_path / "slow-reader.py",
                    f"#!{sys.executable} -IS\nimport sys, time\ntime.sleep(0.5)\n"
                    f"open({str(received)!r}, 'w').write(str(len(sys.stdin.buffer.read())))\n")
    hooks = Hooks([HookConfig(name="reads", event="association-ended", program=[reader]),
                   HookConfig(name="ignores", event="association-ended", program=["/bin/true"])],
                  str(tmp_path), "", layout_options(load_config()), FileModes(), run_action)
    header = HeaderFields(sop_class_uid="1.2.840.10008.5.1.4.1.1.2", modality="CT", study_instance_uid="1.2.3")
    for n in range(5000):
        hooks.instance_stored(InstanceRecord(
            path=f"{'p' * 150}/{n}.dcm", size=1, transfer_syntax_uid="1.2.840.10008.1.2.1", calling_ae_title="A",
            called_ae_title="B", peer_address="127.0.0.1:1", received_at=0.0, header=header))
    hooks.association_ended(AssociationReport(
        state=AssociationState(connection_id=1, worker=0, calling_ae_title="A", called_ae_title="B",
                               peer_address="127.0.0.1:1", instances=5000, outcome="released"),
        by_modality={"CT": 5000}, store_latency_seconds=Histogram.empty(LATENCY_BUCKETS),
        object_size_bytes=Histogram.empty(SIZE_BUCKETS), ended=True))
    _drive(hooks, lambda: {s.name: s.succeeded for s in hooks.states()} == {"reads": 1, "ignores": 1})
    document_size = int(received.read_text())
    assert document_size > 5000 * 150, "the whole document arrived"
    assert hooks.running == 0 and not hooks.selector.get_map(), "every pipe and pidfd closed"
