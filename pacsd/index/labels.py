"""What the index keeps for who may see what (issue 22): the labels on studies (pacsd_label) and
the links that share one study (pacsd_share). Writes run on the writer thread
(pacsd.index.writer); reads are pacsd.query.scope's."""

from __future__ import annotations

import time
from collections.abc import Iterable

from pacsd.index.models import Label, Share
from pacsd.index.writer import Writer


def insert_labels(study_uid: str, labels: Iterable[str]) -> None:
    """Give a study these labels (those it has stay). Writer thread only: inside submitted
    work, e.g. in the transaction that indexes an instance ([[labels]] rules on ingest)."""
    rows = [{"study_uid": study_uid, "label": label} for label in dict.fromkeys(labels)]
    if rows:
        Label.insert_many(rows).on_conflict_ignore().execute()


class Labels(Writer):
    """Part of pacsd.index.Index."""

    def relabel(self, study_uid: str, add: Iterable[str] = (), remove: Iterable[str] = ()
                ) -> list[str]:
        """Add and remove labels of a study (checked by the caller: config.valid_label); its
        labels afterwards, sorted."""
        add, remove = list(add), list(remove)

        def work() -> list[str]:
            if remove:
                Label.delete().where((Label.study_uid == study_uid)
                                     & Label.label.in_(remove)).execute()
            insert_labels(study_uid, [a for a in add if a not in remove])
            return sorted(r.label for r in Label.select(Label.label)
                          .where(Label.study_uid == study_uid))
        out: list[str] = self.submit(work)
        return out

    # --- share links ----------------------------------------------------------------------

    def add_share(self, token_hash: str, study_uid: str, *, created_by: str, expires: float,
                  pin_hash: str | None, note: str = "") -> None:
        self.submit(lambda: Share.create(
            token_hash=token_hash, study_uid=study_uid, created_by=created_by,
            created=time.time(), expires=expires, pin_hash=pin_hash, note=note))

    def revoke_share(self, token_hash: str) -> bool:
        """Revoke a link; False when there is none by that hash or it was revoked already."""
        def work() -> bool:
            return bool(Share.update(revoked=time.time())
                        .where((Share.token_hash == token_hash) & Share.revoked.is_null())
                        .execute())
        done: bool = self.submit(work)
        return done

    def count_share_use(self, token_hash: str) -> None:
        self.submit(lambda: Share.update(uses=Share.uses + 1)
                    .where(Share.token_hash == token_hash).execute())

    def forget_shares(self, before: float) -> int:
        """Remove links expired or revoked before `before` (housekeeping keeps them a while,
        so that the admin page can say a link was revoked rather than unknown)."""
        def work() -> int:
            return int(Share.delete().where((Share.expires < before)
                                            | (Share.revoked < before)).execute())
        n: int = self.submit(work)
        return n
