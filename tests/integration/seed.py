"""Put labs, specimens, fields and cells straight into Postgres and object storage.

Tests of services downstream of the segmenter use this instead of uploading and
segmenting, so each test controls exactly which cells exist.
"""

from __future__ import annotations

import io
import uuid

import numpy as np
import psycopg
import torch
from PIL import Image

from bmcell import db as dbmod
from bmcell.db import Database
from bmcell.storage import ObjectStore
from bmcell.synth import lab_style, render_crop
from bmcell.taxonomy import DEFAULT_TAXONOMY
from bmcell.v1 import rounds_pb2, selector_pb2

SEEDED_FIELD_KEY = "fields/seeded-placeholder.png"


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def synth_crops(n: int, seed: int = 0, size: int = 96) -> tuple[list[bytes], list[str]]:
    """``n`` PNG crops cycling through the taxonomy, with their true classes."""
    rng = np.random.default_rng(seed)
    lab = lab_style(seed, "lab-a")
    codes = DEFAULT_TAXONOMY.codes
    images, truth = [], []
    for i in range(n):
        code = codes[i % len(codes)]
        image, _mask = render_crop(rng, lab, code, size=size)
        images.append(png(image))
        truth.append(code)
    return images, truth


def seed_cells(
    db: Database,
    store: ObjectStore,
    crops: list[bytes],
    *,
    lab: str | None = None,
    specimen: str | None = None,
    is_test: bool = False,
) -> list[int]:
    """One field holding one cell per crop; returns the cell ids."""
    lab = lab or f"lab-{uuid.uuid4().hex[:6]}"
    specimen = specimen or f"s-{uuid.uuid4().hex[:6]}"
    keys = [
        store.put_content_addressed("cells", c, suffix=".png", content_type="image/png")[0]
        for c in crops
    ]
    # The rows below point at this placeholder field: with it in storage, seeded cells
    # leave `bmcell storage check` nothing to report.
    if not store.exists(SEEDED_FIELD_KEY):
        store.put(SEEDED_FIELD_KEY, png(np.zeros((704, 704, 3), np.uint8)), "image/png")
    with db.transaction() as conn:
        lab_id = conn.execute(
            "INSERT INTO labs (code) VALUES (%s) ON CONFLICT (code) DO UPDATE SET code = EXCLUDED.code "
            "RETURNING id",
            (lab,),
        ).fetchone()["id"]
        spec_id = conn.execute(
            "INSERT INTO specimens (lab_id, code, role) VALUES (%s, %s, %s) RETURNING id",
            (lab_id, specimen, "test" if is_test else "training"),
        ).fetchone()["id"]
        field_id = conn.execute(
            "INSERT INTO field_images (specimen_id, sha256, object_key, format, width, height, size_bytes) "
            "VALUES (%s, %s, %s, 'PNG', 704, 704, 1) RETURNING id",
            (spec_id, uuid.uuid4().hex + uuid.uuid4().hex, SEEDED_FIELD_KEY),
        ).fetchone()["id"]
        ids = []
        for i, key in enumerate(keys):
            ids.append(
                conn.execute(
                    """INSERT INTO cells (field_id, specimen_id, lab_id, index_in_field, x0, y0, x1, y1,
                       crop_key, mask_key, cell_area, nucleus_area, nucleus_cell_ratio,
                       nucleus_axis_ratio, nucleus_width_ratio, touches_border)
                   VALUES (%s, %s, %s, %s, 0, 0, 10, 10, %s, %s, 100, 40, 0.4, 1.2, 0.8, false)
                   RETURNING id""",
                    (field_id, spec_id, lab_id, i, key, key),
                ).fetchone()["id"]
            )
    return ids


def retire_active_model(conn, model_name: str) -> None:
    """Start a study without a served model: earlier modules of the session activated
    versions of the same model name, which the trainer would transfer from and the
    promotion gate compare with."""
    conn.execute(
        "UPDATE model_versions SET state = 'retired' WHERE model_name = %s AND state = 'active'",
        (model_name,),
    )


def small_bootstrap(
    experiment: str, lab: str, *, test_reviews: int
) -> rounds_pb2.StartRoundRequest:
    """A bootstrap over a handful of seeded cells of ``lab``: 3 epochs, quotas of 3
    initial / 2 validation / 2 test per class."""
    return rounds_pb2.StartRoundRequest(
        experiment=experiment,
        strategy="bootstrap",
        epochs=3,
        initial_per_class=3,
        validation_per_class=2,
        test_per_class=2,
        initial_reviews=1,
        test_reviews=test_reviews,
        gate=0.01,  # a handful of labels: the gate's arithmetic, not the study's bar
        selection=selector_pb2.SelectionParameters(seed=5, labs=[lab]),
    )


def migrate_before(conn: psycopg.Connection, version: str) -> None:
    """Bring an empty database to the schema just before migration ``version``, as the
    runner would have left it, so a test can fill it and then apply the rest."""
    conn.execute(
        "CREATE TABLE schema_migrations (version text PRIMARY KEY, name text NOT NULL, "
        "checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
    )
    for m in (m for m in dbmod.migrations() if m.version < version):
        conn.execute(m.sql)
        conn.execute(
            "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
            (m.version, m.name, m.checksum),
        )


class MeanColour(torch.nn.Module):
    """Logits from a crop's mean colour through seeded random weights: a small model
    to register and serve."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = torch.nn.Linear(3, DEFAULT_TAXONOMY.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.mean((2, 3)))
