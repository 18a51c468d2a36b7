"""Retention rules ([[retention]]): off until enabled, `pacsd retention plan` shows first what a
rule would take (by age, modality, source AE); enabled, housekeeping moves those studies to the
recycle bin (restorable), never deletes them; bad rules are refused with the rule named."""

from __future__ import annotations

import json
import sqlite3
import subprocess

import pytest
from pydicom import dcmread

from conftest import c_find, pacsd_cmd, store_files, write_config
from data import write_series
from pacsd import config as config_mod
from pacsd.errors import ConfigError

RULES = [{"name": "old-cr", "older_than_days": 365, "modality": "CR"},
         {"name": "old-from-ward", "older_than_days": 30, "calling_aet": "WARDCT"},
         {"name": "old-when-full", "older_than_days": 30, "free_below_percent": 0.001}]


def age(data, study: str, days: int) -> None:
    """Make a study look received `days` days ago."""
    db = sqlite3.connect(data / "index.sqlite3", timeout=10)
    with db:
        db.execute("UPDATE study SET created = datetime('now', 'localtime', ?) "
                   "WHERE study_instance_uid = ?", (f"-{days} days", study))
    db.close()


def plan(server, *args: str) -> dict[str, list[str]]:
    out = subprocess.run(pacsd_cmd("retention", "plan", "--json", "--config",
                                   str(server.cfg.source), *args),
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    return {p["rule"]: [s["study_instance_uid"] for s in p["studies"]]
            for p in json.loads(out.stdout)}


def test_a_rule_is_planned_first_and_enabled_moves_studies_to_the_bin(make_server, tmp_path):
    cr = write_series(tmp_path / "cr", seed=71, studies=2, images=1, size=16)
    ct = write_series(tmp_path / "ct", seed=72, studies=1, images=2, size=16)
    for f in cr:
        ds = dcmread(f)
        ds.Modality = "CR"
        ds.save_as(f)
    server = make_server(retention=RULES)
    assert store_files(server.dicom_port, cr) == [0, 0]
    assert store_files(server.dicom_port, ct, aet="WARDCT") == [0, 0]
    old_cr, new_cr = (str(dcmread(f).StudyInstanceUID) for f in cr)
    ward = str(dcmread(ct[0]).StudyInstanceUID)
    data = server.cfg.data
    age(data, old_cr, 400)
    age(data, new_cr, 100)
    age(data, ward, 40)

    planned = plan(server)
    assert planned == {"old-cr": [old_cr], "old-from-ward": [ward],
                       "old-when-full": [old_cr, new_cr, ward]}
    assert plan(server, "--rule", "old-cr") == {"old-cr": [old_cr]}
    # Not enabled: housekeeping takes nothing.
    assert server.housekeeping is not None
    assert "retention" not in server.housekeeping.run_once()
    assert server.index.counts()["studies"] == 3
    server.stop()

    enabled = [{**r, "enabled": True} for r in RULES]
    server = make_server(data=data, retention=enabled)
    assert "retention" in server.housekeeping.run_once()
    # Moved to the bin by the first two rules; the third's condition (free space below
    # 0.001%) does not hold, so it took nothing.
    left = c_find(server.dicom_port, "STUDY", StudyInstanceUID="")[1]
    assert [str(s.StudyInstanceUID) for s in left] == [new_cr]
    assert {e.uid: e.who for e in server.index.bin_entries()} == {
        old_cr: "retention rule old-cr", ward: "retention rule old-from-ward"}
    # Restorable like any deletion.
    assert server.runtime.archive.bin.restore(old_cr, "test").restored == 1
    assert server.index.counts()["studies"] == 2


@pytest.mark.parametrize("rule, words", [
    ({"name": "x"}, "older_than_days"),
    ({"name": "x", "older_than_days": 0}, "older_than_days"),
    ({"older_than_days": 3}, "a name"),
    ({"name": "x", "older_than_days": 3, "free_below_percent": 150}, "free_below_percent"),
    ({"name": "x", "older_than_days": 3, "calling_aet": "A" * 17}, "calling_aet"),
    ({"name": "x", "older_than_days": 3, "delete": True}, "unknown key"),
    ({"name": "x", "older_than_days": 3, "enabled": "yes"}, "enabled"),
])
def test_bad_rules_are_refused_naming_the_rule(tmp_path, rule, words):
    cfg = write_config(tmp_path / "pacsd.toml", tmp_path / "data", retention=[rule])
    with pytest.raises(ConfigError, match=words) as e:
        config_mod.load(cfg, env={})
    assert "[[retention]] #1" in str(e.value)
