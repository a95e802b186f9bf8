"""Test helper: the headers of an ingested site's first accepted series, as the site database holds them."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from m3fm.data.dicom_series import InstanceHeader
from m3fm.data.store import Series, SourceFile, open_store


def first_accepted_headers(site) -> list[InstanceHeader]:
    engine = open_store(site.database_url)
    with Session(engine) as s:
        uid = s.scalars(select(Series.series_uid).where(Series.status == "accepted").order_by(Series.series_uid)).first()
        headers = [InstanceHeader.from_dict(f.header) for f in
                   s.scalars(select(SourceFile).where(SourceFile.series_uid == uid, SourceFile.status == "ok"))]
    engine.dispose()
    return headers
