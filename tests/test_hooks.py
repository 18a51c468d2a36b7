"""Hooks (pacsd.plugins.hooks): plugins written by the tests into .py files, loaded by path through
[hooks] plugins, against a real pacsd with real associations. What is checked is isolation: a
plugin that fails to load, raises, or is slow never stops, slows or loses a C-STORE; filters
that answer in time do refuse or change what they are asked about."""

from __future__ import annotations

import io
import json
import logging
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import LOCAL, associate, c_find, c_get, store_files, wait_for
from data import ct_slice, dataset_bytes
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind as FIND,
)

NOT_AUTHORIZED = 0x0124
TIMEOUT = 0.3   # [hooks] timeout in these tests
SLOW = 1.0      # what a slow hook sleeps: well over TIMEOUT, under the 0.5 s test rule x 2


def plugin(folder: Path, name: str, code: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    return str(path)


def module(server, name: str) -> Any:
    return next(p.module for p in server.hooks.plugins if p.name == name)


def image(folder: Path, patient: int, number: int = 1, **kw) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"p{patient}i{number}.dcm"
    ct_slice(seed=5, patient=patient, study=1, series=1, number=number, size=32,
             **kw).save_as(path, enforce_file_format=True)
    return path


def stored_images(server, study_uid: str) -> int:
    status, matches = c_find(server.dicom_port, "IMAGE", StudyInstanceUID=study_uid,
                             SeriesInstanceUID="", SOPInstanceUID="")
    assert status == 0
    return len(matches)


def retrieved(server, path: Path) -> tuple[str, bytes]:
    """(transfer syntax, data set bytes) of `path`'s instance as pacsd gives it back."""
    ds = dcmread(path, stop_before_pixels=True)
    status, got = c_get(server.dicom_port, {"QueryRetrieveLevel": "IMAGE",
                                            "StudyInstanceUID": ds.StudyInstanceUID,
                                            "SeriesInstanceUID": ds.SeriesInstanceUID,
                                            "SOPInstanceUID": ds.SOPInstanceUID},
                        CTImageStorage, ExplicitVRLittleEndian)
    assert status == 0 and list(got) == [ds.SOPInstanceUID]
    return got[ds.SOPInstanceUID]


def find_as(port: int, aet: str, level: str, **keys: str) -> tuple[int, list[Dataset]]:
    q = Dataset()
    q.QueryRetrieveLevel = level
    for k, v in keys.items():
        setattr(q, k, v)
    with associate(port, [build_context(FIND)], aet=aet) as assoc:
        out = list(assoc.send_c_find(q, FIND))
    return int(out[-1][0].Status), [ds for st, ds in out if st and st.Status in (0xFF00, 0xFF01)]


def warned(caplog, *parts: str) -> bool:
    return any(all(p in r.getMessage() for p in parts) for r in caplog.records
               if r.levelno >= logging.WARNING)


# --- loading and notifications ----------------------------------------------------------------

def test_broken_plugins_and_raising_notifications_leave_the_server_working(
        make_server, tmp_path: Path, caplog) -> None:
    folder = tmp_path / "plugins"
    bad = plugin(folder, "bad", 'raise RuntimeError("broken on purpose")\n')
    raiser = plugin(folder, "raiser", """
        def on_instance_stored(event):
            raise KeyError("on purpose")
    """)
    good = plugin(folder, "good", """
        SEEN = []
        SETTINGS = {}
        def setup(settings, context):
            SETTINGS.update(settings, aet=context.aet)
        def on_instance_stored(event):
            SEEN.append(event)
    """)
    server = make_server(hooks={"plugins": [bad, raiser, good]},
                         **{"plugin.good": {"colour": "green"}})
    assert [p.name for p in server.hooks.plugins] == ["raiser", "good"]
    assert warned(caplog, f"plugin {bad} not loaded", "RuntimeError: broken on purpose")
    assert module(server, "good").SETTINGS == {"colour": "green", "aet": server.cfg.dicom_aet}

    paths = [image(tmp_path / "in", 1, n) for n in (1, 2)]
    assert store_files(server.dicom_port, paths) == [0, 0]
    seen = wait_for(lambda: len(module(server, "good").SEEN) == 2 and module(server, "good").SEEN,
                    10, "two on_instance_stored events")
    first = dcmread(paths[0], stop_before_pixels=True)
    assert {e["sop_instance_uid"] for e in seen} == {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    assert (seen[0]["study_uid"], seen[0]["patient_id"], seen[0]["modality"],
            seen[0]["calling_aet"]) == (first.StudyInstanceUID, "PID5-001", "CT", "PYNETDICOM")
    assert Path(seen[0]["path"]).is_file()
    wait_for(lambda: warned(caplog, "plugin raiser: on_instance_stored failed",
                            "KeyError"), 10, "the raiser's failure logged")
    assert stored_images(server, first.StudyInstanceUID) == 2
    assert [s["failures"] for s in server.hooks.status()] == [2, 0]


def test_a_slow_notification_does_not_slow_c_store(make_server, tmp_path: Path,
                                                   caplog) -> None:
    slow = plugin(tmp_path / "plugins", "slow", f"""
        import time
        DONE = []
        def on_instance_stored(event):
            time.sleep({SLOW})
            DONE.append(event["sop_instance_uid"])
    """)
    server = make_server(hooks={"plugins": [slow], "timeout": TIMEOUT})
    paths = [image(tmp_path / "in", 1, n) for n in (1, 2, 3)]
    latencies = []
    with associate(server.dicom_port, [build_context(CTImageStorage, ExplicitVRLittleEndian)]
                   ) as assoc:
        for p in paths:
            began = time.monotonic()
            assert assoc.send_c_store(dcmread(p)).Status == 0
            latencies.append(time.monotonic() - began)
    assert max(latencies) < SLOW / 2, latencies
    assert stored_images(server, str(dcmread(paths[0]).StudyInstanceUID)) == 3
    wait_for(lambda: len(module(server, "slow").DONE) == 3, 10, "the slow hook to finish")
    wait_for(lambda: warned(caplog, "plugin slow: on_instance_stored took",
                            f"[hooks] timeout = {TIMEOUT:g} s"), 5, "the late warning")


# --- filters: on_store ------------------------------------------------------------------------

def test_a_hung_filter_is_not_asked_again_until_it_returns(make_server, tmp_path: Path) -> None:
    """Two calls stuck past their time: the plugin is overruled at once (no work piles up
    behind it, no C-STORE waits); once they return, it is asked again."""
    hung = plugin(tmp_path / "plugins", "hung", """
        import threading
        RELEASE = threading.Event()
        def on_store(ds, event):
            if ds.PatientID.endswith("9"):
                return "patient 9 is refused"
            RELEASE.wait(30)
    """)
    server = make_server(hooks={"plugins": [hung], "timeout": TIMEOUT})
    paths = [image(tmp_path / "in", 1, n) for n in (1, 2, 3, 4)]
    refused = image(tmp_path / "in", 9)
    latencies = []
    with associate(server.dicom_port, [build_context(CTImageStorage, ExplicitVRLittleEndian)]
                   ) as assoc:
        for p in [*paths, refused]:
            began = time.monotonic()
            assert assoc.send_c_store(dcmread(p)).Status == 0   # 9 too: not asked
            latencies.append(time.monotonic() - began)
        # The first two waited for the timeout; then the plugin was not asked at all.
        assert min(latencies[:2]) >= TIMEOUT * 0.9, latencies
        assert max(latencies[2:]) < TIMEOUT / 2, latencies
        module(server, "hung").RELEASE.set()
        wait_for(lambda: server.hooks.plugins[0].stuck == 0, 10, "the stuck calls to return")
        again = image(tmp_path / "again", 9, 2)
        assert assoc.send_c_store(dcmread(again)).Status == NOT_AUTHORIZED   # asked again
    assert stored_images(server, str(dcmread(paths[0]).StudyInstanceUID)) == 4
    assert stored_images(server, str(dcmread(refused).StudyInstanceUID)) == 1


def test_on_store_refuses_rewrites_and_is_overruled_when_late_or_broken(
        make_server, tmp_path: Path, caplog) -> None:
    gate = plugin(tmp_path / "plugins", "gate", f"""
        import time
        def on_store(ds, event):
            if ds.Modality == "MR":
                return "no MR on this server"
            which = ds.PatientID[-1]
            if which == "1":                       # rewrite one attribute
                ds.InstitutionName = "Rewritten Hospital"
                return ds
            if which == "2":                       # too late: the answer is ignored
                time.sleep({SLOW})
                ds.InstitutionName = "LATE"
                return ds
            if which == "3":                       # broken after touching the data set
                ds.InstitutionName = "RAISED"
                raise RuntimeError("on purpose")
            return None                            # no opinion
    """)
    server = make_server(hooks={"plugins": [gate], "timeout": TIMEOUT})
    rewrite, late, broken, plain = (image(tmp_path / "in", n) for n in (1, 2, 3, 4))
    refused = image(tmp_path / "in", 5, modality="MR")
    began = time.monotonic()
    assert store_files(server.dicom_port, [rewrite, late, broken, plain, refused]) == [
        0, 0, 0, 0, NOT_AUTHORIZED]
    assert time.monotonic() - began < SLOW + 1   # the late hook cost at most its timeout
    assert warned(caplog, "refused by plugin gate: no MR on this server")
    assert warned(caplog, "plugin gate: on_store did not answer within", "overruled")
    assert warned(caplog, "plugin gate: on_store failed: RuntimeError: on purpose")

    # Refused: nothing of it stored.
    mr = dcmread(refused, stop_before_pixels=True)
    assert stored_images(server, mr.StudyInstanceUID) == 0
    # Overruled or no opinion: stored byte for byte as sent.
    for path in (late, broken, plain):
        assert retrieved(server, path) == dataset_bytes(path), path.name
    # Rewritten: the new value, and every other element (pixel data included) as sent.
    ts, got = retrieved(server, rewrite)
    assert ts == ExplicitVRLittleEndian
    new = read_dataset(io.BytesIO(got), False, True)
    old = dcmread(rewrite)
    assert new.InstitutionName == "Rewritten Hospital"
    assert new.PixelData == old.PixelData
    assert {e.tag for e in new} == {e.tag for e in old}
    assert all(new[e.tag] == e for e in old if e.keyword != "InstitutionName")


# --- filters: on_association, on_query --------------------------------------------------------

def test_on_association_refuses_a_calling_ae_title(make_server, tmp_path: Path,
                                                   caplog) -> None:
    door = plugin(tmp_path / "plugins", "door", """
        ASKED = []
        def on_association(event):
            ASKED.append(event)
            if event["calling_aet"] == "INTRUDER":
                return False
    """)
    server = make_server(hooks={"plugins": [door]})
    caplog.set_level(logging.INFO, logger="pynetdicom")
    rejected: list[bool] = []
    ae = AE(ae_title="INTRUDER")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage)
    try:
        assoc = ae.associate(LOCAL, server.dicom_port, ae_title=server.cfg.dicom_aet,
                             evt_handlers=[(evt.EVT_REJECTED, lambda e: rejected.append(True))])
        assert assoc.is_rejected and not assoc.is_established and rejected == [True]
    finally:
        ae.shutdown()
    assert "Calling AE title not recognised" in caplog.text
    assert warned(caplog, "association from INTRUDER", "refused by plugin door")
    # Anyone else is let in.
    assert store_files(server.dicom_port, [image(tmp_path / "in", 1)], aet="FRIEND") == [0]
    asked = module(server, "door").ASKED
    assert [a["calling_aet"] for a in asked] == ["INTRUDER", "FRIEND"]
    assert asked[0]["called_aet"] == server.cfg.dicom_aet and asked[0]["peer_address"] == LOCAL


def test_on_query_restricts_or_refuses_c_find_and_qido(make_server, tmp_path: Path) -> None:
    ward = plugin(tmp_path / "plugins", "ward", """
        def on_query(event):
            if event.get("calling_aet") == "NOBODY":
                return "not allowed to search"
            if event.get("calling_aet") == "WARD1":   # sees its own patient only
                if event["keys"].get("PatientID", "") not in ("", "*", "PID5-001"):
                    return "WARD1 searches its own patient only"
                return {**event, "keys": {**event["keys"], "PatientID": "PID5-001"}}
            if event["source"] == "QIDO-RS" and event["keys"].get("PatientID") == "PID5-002":
                return False
    """)
    # The callers are the site's nodes (only nodes may C-FIND); the plugin narrows them.
    server = make_server(hooks={"plugins": [ward]}, nodes=[
        {"name": aet, "aet": aet, "host": LOCAL, "port": 104}
        for aet in ("OTHER", "WARD1", "NOBODY")])
    assert store_files(server.dicom_port, [image(tmp_path / "in", n) for n in (1, 2, 3)]) \
        == [0, 0, 0]

    status, everyone = find_as(server.dicom_port, "OTHER", "STUDY", PatientID="")
    assert status == 0 and sorted(m.PatientID for m in everyone) == [
        "PID5-001", "PID5-002", "PID5-003"]
    status, mine = find_as(server.dicom_port, "WARD1", "STUDY", PatientID="")
    assert status == 0 and [m.PatientID for m in mine] == ["PID5-001"]
    status, other = find_as(server.dicom_port, "WARD1", "STUDY", PatientID="PID5-002")
    assert status == NOT_AUTHORIZED and other == []
    status, mine = find_as(server.dicom_port, "WARD1", "SERIES", StudyInstanceUID="",
                           SeriesInstanceUID="", PatientID="")
    assert status == 0 and [m.PatientID for m in mine] == ["PID5-001"]
    status, refused = find_as(server.dicom_port, "NOBODY", "STUDY", PatientID="")
    assert status == NOT_AUTHORIZED and refused == []

    def qido(patient: str) -> int:
        try:
            with urllib.request.urlopen(f"{server.http_url}/dicom-web/studies?PatientID="
                                        f"{patient}", timeout=10) as r:
                return len(json.loads(r.read() or b"[]"))
        except urllib.error.HTTPError as e:
            return -e.code
    assert qido("PID5-003") == 1
    assert qido("PID5-002") == -403


# --- HTTP routes and entry points -------------------------------------------------------------

def test_routes_are_served_under_plugins_name(make_server, tmp_path: Path, caplog) -> None:
    folder = tmp_path / "plugins"
    greeter = plugin(folder, "greeter_file", """
        NAME = "greeter"
        def routes(app):
            @app.get("/hello")
            def hello():
                return "hello from a plugin"
    """)
    broken = plugin(folder, "brokenroutes", """
        def routes(app):
            raise RuntimeError("no routes today")
    """)
    server = make_server(hooks={"plugins": [broken, greeter]})
    with urllib.request.urlopen(f"{server.http_url}/plugins/greeter/hello", timeout=10) as r:
        assert r.status == 200 and r.read() == b"hello from a plugin"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"{server.http_url}/plugins/brokenroutes/hello", timeout=10)
    assert e.value.code == 404
    assert "plugin brokenroutes: its HTTP routes failed to load" in caplog.text
    with urllib.request.urlopen(f"{server.http_url}/testdbalive", timeout=10) as r:
        assert r.status == 200


def test_installed_plugin_found_by_its_entry_point(make_server, tmp_path: Path,
                                                   monkeypatch) -> None:
    site = tmp_path / "site"
    (site / "pacsd_demo_plugin-1.0.dist-info").mkdir(parents=True)
    (site / "pacsd_demo_plugin.py").write_text(textwrap.dedent("""
        NAME = "demo"
        SETTINGS = {}
        def setup(settings, context):
            SETTINGS.update(settings)
    """))
    dist = site / "pacsd_demo_plugin-1.0.dist-info"
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: pacsd-demo-plugin\n"
                                   "Version: 1.0\n")
    (dist / "entry_points.txt").write_text("[pacsd.plugins]\ndemo = pacsd_demo_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(__import__("sys").modules, "pacsd_demo_plugin", raising=False)
    server = make_server(**{"plugin.demo": {"greeting": "hi"}})
    assert [p.name for p in server.hooks.plugins] == ["demo"]
    assert module(server, "demo").SETTINGS == {"greeting": "hi"}


# --- the contract: pacsd/plugins/specs.py and the hooks reference ------------------------------

def test_every_hook_has_a_payload_typeddict_and_a_section_in_the_reference() -> None:
    from typing import is_typeddict

    from test_docs import manual_generator

    from pacsd.plugins import hooks, specs
    page = manual_generator().hooks_page()
    assert set(specs.PAYLOADS) == {*hooks.NOTIFICATIONS, *hooks.FILTERS}
    for hook in (*hooks.NOTIFICATIONS, *hooks.FILTERS):
        kind, payload = specs.PAYLOADS[hook]
        assert kind == ("notification" if hook in hooks.NOTIFICATIONS else "filter"), hook
        assert is_typeddict(payload), hook
        assert f"\n## `{hook}`\n" in page and f"\n### {payload.__name__}\n" in page, hook
        assert all(f"| `{key}` |" in page for key in payload.__annotations__), hook
    # setup and routes are no payloads, but a plugin defines them too.
    assert [f.__name__ for f in specs.SIGNATURES] == ["setup", *hooks.NOTIFICATIONS,
                                                      *hooks.FILTERS, "routes"]
    assert "\n## `setup`\n" in page and "\n## `routes`\n" in page


def test_payloads_carry_exactly_the_keys_of_their_typeddicts(make_server, tmp_path: Path) -> None:
    """Every hook fired by a real server: the keys of each payload are those its TypedDict
    declares (NotRequired ones only where the docs say: C-FIND or QIDO-RS)."""
    from pacsd.plugins import specs
    recorder = plugin(tmp_path / "plugins", "recorder", """
        SEEN = []
        def on_instance_stored(event):
            SEEN.append(("on_instance_stored", event))
        def on_study_stable(event):
            SEEN.append(("on_study_stable", event))
        def on_association(event):
            SEEN.append(("on_association", dict(event)))
        def on_store(dataset, event):
            SEEN.append(("on_store", dict(event)))
        def on_query(event):
            SEEN.append(("on_query", dict(event)))
    """)
    server = make_server(hooks={"plugins": [recorder], "study_stable_after": 0.5},
                         nodes=[{"name": "ws", "aet": "WS", "host": LOCAL, "port": 104}])
    assert store_files(server.dicom_port, [image(tmp_path / "in", 7)]) == [0]
    status, _ = find_as(server.dicom_port, "WS", "STUDY", PatientID="")
    assert status == 0
    with urllib.request.urlopen(f"{server.http_url}/dicom-web/studies?PatientID=*",
                                timeout=10) as r:
        assert r.status == 200
    seen = module(server, "recorder").SEEN
    wait_for(lambda: {h for h, _ in seen} >= set(specs.PAYLOADS), 20, "every hook fired")
    for hook, event in list(seen):
        payload = specs.PAYLOADS[hook][1]
        keys = set(event)
        assert payload.__required_keys__ <= keys <= set(payload.__annotations__), (hook, keys)
        if hook == "on_query":
            extra = {"C-FIND": {"calling_aet", "called_aet"}, "QIDO-RS": {"user"}}
            assert keys - payload.__required_keys__ == extra[event["source"]], keys
