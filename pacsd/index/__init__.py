"""The index family: the tables (models), the databases they live in (backends), their schema
versions (migrations), the serialized group-commit writer (writer, counters), what it writes
(instances, leases, the recycle bin's rows and the history), the routing outbox, and the copy between databases.

`Index` is the one object callers use: the writer with the instances and the leases it serves.
`Index` and `Added` are re-exported: `from pacsd.index import Index`.
"""

from pacsd.index.instances import Added
from pacsd.index.integrity import Integrity
from pacsd.index.labels import Labels
from pacsd.index.leases import Leases
from pacsd.index.trash import Trash
from pacsd.index.worklist import Worklist


class Index(Trash, Integrity, Labels, Worklist, Leases):
    """The index of one data folder (or of several nodes sharing a PostgreSQL database): open
    it, write through its one writer thread, read inside `reading()`.

    pacsd.index.writer: open, close, submit, size_bytes, integrity_check;
    pacsd.index.instances: add, add_many, enqueue, set_hash, add_conflict, conflicted, clear,
    indexed_paths, counts, delete; pacsd.index.trash: bin, unbin, forget_binned, binned,
    bin_entries, bin_totals, history; pacsd.index.integrity: checkable_after, checkable_in,
    cursor, set_cursor, record_damage, clear_damage, damage; pacsd.index.labels: relabel, add_share, revoke_share,
    count_share_use, forget_shares; pacsd.index.worklist: add_step, update_step,
    update_step_patient, merge_step_patients, expire_steps, forget_steps, link_study, link_arrived,
    put_performed; pacsd.index.leases: lease, release, leases, lease_holder,
    shared_value, probe."""


__all__ = ["Added", "Index"]
