"""DICOMweb (PS3.18) under /dicom-web: QIDO-RS search (qido.py), WADO-RS retrieve (wado_rs.py;
metadata and bulk data: wado_metadata.py) and STOW-RS store (stow.py), composed into one app.

STOW-RS reads the body part by part and stores each instance with Archive.put, the one durable
path, so an instance is acknowledged only once its file and its index row are on disk.
"""

from __future__ import annotations

import bottle

from pacsd.web import qido, stow, wado_batch, wado_metadata, wado_rs
from pacsd.web.app import new_app
from pacsd.web.dicomweb_common import url
from pacsd.web.runtime import Runtime

MOUNT = "/dicom-web"


def make_app(rt: Runtime) -> bottle.Bottle:
    app = new_app()
    qido.add_routes(app, rt)
    wado_rs.add_routes(app, rt)
    wado_metadata.add_routes(app, rt)
    wado_batch.add_routes(app, rt)   # the viewer's pixel batches (a pacsd extension)
    # STOW-RS (PS3.18 10.5)
    app.post("/studies", callback=lambda: stow.stow(rt, None, url))
    app.post("/studies/<study>", callback=lambda study: stow.stow(rt, study, url))
    return app
