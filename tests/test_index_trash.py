"""The recycle bin, the corrections and the integrity records on each index backend (SQLite and
PostgreSQL): an Archive over a real store, no server."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from data import write_series
from pacsd.index import Index
from pacsd.storage.archive import Archive
from pacsd.storage.corrections import Corrections
from pacsd.storage.integrity import check_all
from pacsd.storage.store import Store


def open_archive(index_url: str, folder: Path) -> Archive:
    store = Store(folder)
    store.open()
    return Archive(store, Index(index_url).open(), overlap=False)


def test_bin_corrections_and_damage_on_each_backend(index_url, tmp_path):
    files = write_series(tmp_path / "in", seed=77, patients=2, studies=1, series=2, images=2,
                         size=16)
    archive = open_archive(index_url, tmp_path / "storage")
    index, store = archive.index, archive.store
    try:
        for f in files:
            archive.put_file(f)
        a, b = dcmread(files[0]), dcmread(files[-1])
        assert a.PatientID != b.PatientID
        assert index.counts()["instances"] == 8

        # Delete a study, restore it.
        assert archive.delete("STUDY", [str(a.StudyInstanceUID)], who="t") == 4
        assert index.counts()["instances"] == 4 and index.bin_totals()[0] == 4
        [entry] = index.bin_entries()
        assert (entry.action, entry.uid, entry.patient_id) == \
            ("delete", str(a.StudyInstanceUID), str(a.PatientID))
        assert archive.bin.restore(str(a.StudyInstanceUID), "t").restored == 4
        assert index.counts()["instances"] == 8 and index.bin_totals() == (0, 0)

        # Merge A into B, then undo.
        c = Corrections(archive)
        done = c.merge_patients(str(a.PatientID), str(b.PatientID), "t")
        assert done.instances == 4 and index.counts()["patients"] == 1
        assert index.bin_totals()[0] == 4
        undone = c.undo(str(a.PatientID), "t")
        assert undone.instances == 4 and index.counts()["patients"] == 2
        assert [h.action for h in index.history(str(a.PatientID))][:2] == ["undo",
                                                                        "patient merge"]

        # A damaged file recorded, then healed.
        [item] = index.checkable([str(a.SOPInstanceUID)])
        original = store.path(item.path).read_bytes()
        store.path(item.path).write_bytes(original[:-4] + b"XXXX")
        found = check_all(store, index, [item])
        assert [(d[0].sop_instance_uid, d[1]) for d in found.damaged] == \
            [(str(a.SOPInstanceUID), "changed")]
        assert [d.sop_instance_uid for d in index.damage()] == [str(a.SOPInstanceUID)]
        store.path(item.path).write_bytes(original)
        assert check_all(store, index, [item]).healed == [str(a.SOPInstanceUID)]
        assert index.damage_count() == 0

        # Emptying the bin forgets the previous versions, and their files.
        deletions, instances, _ = archive.bin.empty(None, "t", "test")
        assert (deletions, instances) == (1, 4)
        assert not list((tmp_path / "storage" / ".trash").rglob("*.dcm"))
    finally:
        index.close()
