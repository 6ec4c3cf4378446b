"""The segmenter service against the embedded stack: upload, dedupe, refusals, crops."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import httpx
import numpy as np
import psycopg
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image, PngImagePlugin

from bmcell import db as dbmod
from bmcell import paging, preprocess, thumbs, tls
from bmcell.errors import NotFound
from bmcell.grpc_client import bearer
from bmcell.network import DEFAULT_INPUT_SIZE
from bmcell.settings import Settings, load
from bmcell.stack import Stack
from bmcell.storage import ObjectStore
from bmcell.synth import lab_style, render_field, specimen_mix
from bmcell.v1 import segmenter_pb2, segmenter_pb2_grpc
from tests.conftest import free_port
from tests.integration.seed import migrate_before

pytestmark = pytest.mark.integration


def _field_png(seed: int, size: int = 352) -> bytes:
    _, mix = specimen_mix(5, 0, 0)
    sample = render_field(np.random.default_rng(seed), lab_style(5, "lab-c"), mix, size)
    buf = io.BytesIO()
    Image.fromarray(sample.image).save(buf, "PNG")
    return buf.getvalue()


def _requests(
    data: bytes, specimen: str, *, chunk: int = 64 << 10, sha256: str = "", lab: str = "lab-seg"
):
    yield segmenter_pb2.UploadRequest(
        header=segmenter_pb2.UploadHeader(
            lab=lab, specimen=specimen, diagnosis="normal", filename="f.png", sha256=sha256
        )
    )
    for i in range(0, len(data), chunk):
        yield segmenter_pb2.UploadRequest(chunk=data[i : i + chunk])


class _AsOperator:
    """The segmenter stub, every call with an operator's token (auth has its own tests)."""

    def __init__(self, stub: segmenter_pb2_grpc.SegmenterStub, token: str) -> None:
        self._stub = stub
        self._metadata = bearer(token)

    def Upload(self, requests, **kwargs):
        return self._stub.Upload(requests, metadata=self._metadata, **kwargs)

    def ListCells(self, request, **kwargs):
        return self._stub.ListCells(request, metadata=self._metadata, **kwargs)


@pytest.fixture(scope="module")
def stub(stack: Stack, operator_token: str):
    with tls.grpc_channel(stack.config.addr("segmenter")) as ch:
        yield _AsOperator(segmenter_pb2_grpc.SegmenterStub(ch), operator_token)


@pytest.fixture(scope="module")
def store(stack: Stack) -> ObjectStore:
    return ObjectStore(load(Settings))


def _sql(stack: Stack, query: str, *args: object) -> list[tuple]:
    with psycopg.connect(stack.env()["BMCELL_DATABASE_URL"]) as conn:
        return conn.execute(query, args).fetchall()


def _objects(store: ObjectStore) -> set[str]:
    return set(store.list("fields/")) | set(store.list("cells/"))


def _specimen() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


def test_upload_segments_and_stores_cells(stack: Stack, stub, store: ObjectStore) -> None:
    specimen = _specimen()
    r = stub.Upload(_requests(_field_png(1), specimen), timeout=120)
    assert not r.duplicate and r.cells > 0 and (r.width, r.height) == (352, 352)
    rows = _sql(
        stack,
        """SELECT c.touches_border, c.status, c.crop_key, c.mask_key, c.nucleus_cell_ratio
             FROM cells c JOIN specimens s ON s.id = c.specimen_id WHERE s.code = %s""",
        specimen,
    )
    assert len(rows) == r.cells
    assert sum(b for b, *_ in rows) == r.border_cells
    for border, status, crop_key, mask_key, ratio in rows:
        assert status == ("excluded" if border else "unlabelled")
        assert crop_key.startswith("cells/") and mask_key.endswith(".mask.png")
        crop = np.asarray(Image.open(io.BytesIO(store.get(crop_key))))
        mask = np.asarray(Image.open(io.BytesIO(store.get(mask_key))))
        assert crop.shape == (282, 282, 3) and mask.shape == (282, 282)
        assert np.all(crop[mask == 0] == 255)
        assert 0 <= ratio <= 1
    listed = stub.ListCells(segmenter_pb2.ListCellsRequest(specimen=specimen), timeout=10)
    assert len(listed.cells) == r.cells and not listed.next_page_token
    # Pages of two, by cell id, add up to the whole list.
    paged = list(
        paging.follow(
            lambda req: stub.ListCells(req, timeout=10),
            segmenter_pb2.ListCellsRequest(specimen=specimen, page_size=2),
            "cells",
        )
    )
    assert [c.cell_id for c in paged] == [c.cell_id for c in listed.cells]
    with pytest.raises(grpc.RpcError) as err:
        stub.ListCells(
            segmenter_pb2.ListCellsRequest(specimen=specimen, page_token="junk"), timeout=10
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token" in err.value.details()


def test_cells_get_their_network_input_with_them(stack: Stack, stub, store: ObjectStore) -> None:
    """The thumb stored with each cell is the crop's network input, bit for bit, and a
    thumb lost (or of another size) is made again from the crop on first read."""
    specimen = _specimen()
    r = stub.Upload(_requests(_field_png(5), specimen), timeout=120)
    rows = _sql(
        stack,
        """SELECT c.id, c.crop_key, t.pixels FROM cells c
             JOIN specimens s ON s.id = c.specimen_id
             LEFT JOIN cell_thumbs t ON t.cell_id = c.id AND t.size = %s
            WHERE s.code = %s ORDER BY c.id""",
        DEFAULT_INPUT_SIZE,
        specimen,
    )
    assert len(rows) == r.cells > 1
    for _, crop_key, pixels in rows:
        want = preprocess.crop_to_uint8(store.get(crop_key), DEFAULT_INPUT_SIZE)
        assert pixels is not None and bytes(pixels) == want.tobytes()
    ids = [cid for cid, *_ in rows]
    _sql(stack, "DELETE FROM cell_thumbs WHERE cell_id = %s RETURNING cell_id", ids[0])
    db = dbmod.Database(load(Settings), name="test-thumbs").open()
    try:
        got = thumbs.fetch(db, store, ids[::-1], DEFAULT_INPUT_SIZE)
        bigger = thumbs.fetch(db, store, ids[:1], 96)
        with pytest.raises(NotFound, match="-5"):
            thumbs.fetch(db, store, [ids[0], -5], DEFAULT_INPUT_SIZE)
    finally:
        db.close()
    for i, (_, crop_key, _) in enumerate(reversed(rows)):
        want = preprocess.crop_to_uint8(store.get(crop_key), DEFAULT_INPUT_SIZE)
        assert np.array_equal(got[i], want)
        np.testing.assert_array_equal(
            thumbs.to_batch(got[i : i + 1])[0],
            preprocess.crop_to_tensor(store.get(crop_key), DEFAULT_INPUT_SIZE),
        )
    assert bigger.shape == (1, 96, 96, 3)
    assert _sql(stack, "SELECT count(*) FROM cell_thumbs WHERE cell_id = %s", ids[0]) == [
        (2,)
    ]  # both sizes stored for next time


def test_same_bytes_twice_is_one_field(stack: Stack, stub) -> None:
    data = _field_png(2)
    first = stub.Upload(_requests(data, _specimen()), timeout=120)
    again = stub.Upload(_requests(data, _specimen(), chunk=1000), timeout=120)
    assert again.duplicate and not first.duplicate
    assert (again.field_id, again.cells, again.sha256) == (
        first.field_id,
        first.cells,
        first.sha256,
    )
    assert _sql(stack, "SELECT count(*) FROM field_images WHERE sha256 = %s", first.sha256) == [
        (1,)
    ]
    count = _sql(stack, "SELECT count(*) FROM cells WHERE field_id = %s", first.field_id)
    assert count == [(first.cells,)]


def test_concurrent_same_bytes_is_one_field(stack: Stack, stub) -> None:
    data = _field_png(3)
    specimen = _specimen()
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda _: stub.Upload(_requests(data, specimen), timeout=180), range(4))
        )
    assert len({r.field_id for r in results}) == 1
    assert sorted(r.duplicate for r in results) == [False, True, True, True]
    sha = results[0].sha256
    assert _sql(stack, "SELECT count(*) FROM field_images WHERE sha256 = %s", sha) == [(1,)]
    assert _sql(stack, "SELECT count(*) FROM cells WHERE field_id = %s", results[0].field_id) == [
        (results[0].cells,)
    ]


def test_concurrent_same_bytes_to_two_labs_is_one_field_per_lab(
    stack: Stack, stub, store: ObjectStore
) -> None:
    """Two labs, two uploads each, all at once: one field per lab, each with its own
    cells; the content-addressed objects are shared and none is lost."""
    data = _field_png(8, size=256)
    labs = [f"lab-x{i}-{uuid.uuid4().hex[:6]}" for i in range(2)]
    jobs = [lab for lab in labs for _ in range(2)]
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(
                lambda lab: stub.Upload(_requests(data, _specimen(), lab=lab), timeout=180), jobs
            )
        )
    by_lab = {lab: [r for r, j in zip(results, jobs, strict=True) if j == lab] for lab in labs}
    for rs in by_lab.values():
        assert len({r.field_id for r in rs}) == 1
        assert sorted(r.duplicate for r in rs) == [False, True]
    field_ids = [rs[0].field_id for rs in by_lab.values()]
    assert len(set(field_ids)) == 2
    rows = _sql(
        stack,
        """SELECT l.code, f.object_key, count(c.id), bool_and(c.lab_id = f.lab_id),
                  array_agg(c.crop_key ORDER BY c.index_in_field)
             FROM field_images f JOIN labs l ON l.id = f.lab_id
             LEFT JOIN cells c ON c.field_id = f.id
            WHERE f.sha256 = %s GROUP BY l.code, f.object_key ORDER BY l.code""",
        results[0].sha256,
    )
    assert [r[0] for r in rows] == sorted(labs)
    assert all(n == results[0].cells and same_lab for _, _, n, same_lab, _ in rows)
    assert rows[0][1] == rows[1][1]  # the field's object is shared
    for key in {rows[0][1], *rows[0][4], *rows[1][4]}:  # and none of them was lost
        assert store.exists(key), key


def _fresh_database(stack: Stack) -> str:
    base = stack.env()["BMCELL_DATABASE_URL"].rsplit("/", 1)[0]
    name = f"mig_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base + "/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return f"{base}/{name}"


def test_dedupe_per_lab_migration_keeps_existing_fields(stack: Stack) -> None:
    """0005 on a database that already holds fields: each gets its specimen's lab; then
    the same bytes may be stored once per lab, and a row whose lab is not its
    specimen's is refused."""
    url = _fresh_database(stack)
    with psycopg.connect(url, autocommit=True) as conn:
        migrate_before(conn, "0005")
        labs = [
            conn.execute("INSERT INTO labs (code) VALUES (%s) RETURNING id", (code,)).fetchone()[0]
            for code in ("old-a", "old-b")
        ]
        specimens = [
            conn.execute(
                "INSERT INTO specimens (lab_id, code) VALUES (%s, 's1') RETURNING id", (lab,)
            ).fetchone()[0]
            for lab in labs
        ]
        insert = (
            "INSERT INTO field_images (specimen_id, sha256, object_key, format, width, height,"
            " size_bytes) VALUES (%s, %s, 'fields/x.png', 'PNG', 10, 10, 1) RETURNING id"
        )
        sha_a, sha_b = "a" * 64, "b" * 64
        old = [
            conn.execute(insert, (sp, sha)).fetchone()[0]
            for sp, sha in zip(specimens, (sha_a, sha_b), strict=True)
        ]
    assert dbmod.migrate(url) == [m.version for m in dbmod.migrations() if m.version >= "0005"]
    with psycopg.connect(url, autocommit=True) as conn:
        got = conn.execute("SELECT id, lab_id FROM field_images ORDER BY id").fetchall()
        assert got == list(zip(old, labs, strict=True))
        # The same bytes in the other lab: allowed, and the lab comes from the specimen.
        again = conn.execute(insert, (specimens[1], sha_a)).fetchone()[0]
        assert conn.execute(
            "SELECT lab_id FROM field_images WHERE id = %s", (again,)
        ).fetchone() == (labs[1],)
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(insert, (specimens[0], sha_a))
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            conn.execute(
                "INSERT INTO field_images (lab_id, specimen_id, sha256, object_key, format,"
                " width, height, size_bytes) VALUES (%s, %s, %s, 'k', 'PNG', 1, 1, 1)",
                (labs[1], specimens[0], "c" * 64),
            )


def _big_pixels_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (5000, 4000)).save(buf, "PNG")  # 20 Mpx > the 16 Mpx default, ~20 KB
    return buf.getvalue()


def _oversized():
    yield segmenter_pb2.UploadRequest(
        header=segmenter_pb2.UploadHeader(lab="lab-seg", specimen="s-too-big")
    )
    block = b"\x89PNG\r\n\x1a\n" + bytes(1 << 20)
    for _ in range(34):  # 34 MiB > the 32 MiB default
        yield segmenter_pb2.UploadRequest(chunk=block)


@pytest.mark.parametrize(
    ("name", "make", "problem"),
    [
        ("corrupt", lambda: b"\x89PNG\r\n\x1a\n" + os.urandom(4000), "corrupt"),
        ("truncated", lambda: _field_png(4)[:20000], "truncated"),
        ("wrong format", lambda: b"GIF89a" + os.urandom(1000), "unsupported format"),
        ("too many pixels", _big_pixels_png, "5000x4000"),
        ("empty", lambda: b"", "empty"),
    ],
)
def test_bad_files_are_refused_and_leave_nothing(
    stack: Stack, stub, store: ObjectStore, name: str, make, problem: str
) -> None:
    before = _objects(store)
    specimen = _specimen()
    with pytest.raises(grpc.RpcError) as err:
        stub.Upload(_requests(make(), specimen), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    assert problem in err.value.details()
    assert _sql(stack, "SELECT count(*) FROM specimens WHERE code = %s", specimen) == [(0,)]
    assert _objects(store) == before


def test_too_large_and_cut_off_uploads_are_refused(stack: Stack, stub, store) -> None:
    before = _objects(store)
    with pytest.raises(grpc.RpcError) as err:
        stub.Upload(_oversized(), timeout=120)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "too large" in err.value.details()
    data = _field_png(6)
    import hashlib

    full = hashlib.sha256(data).hexdigest()
    with pytest.raises(grpc.RpcError) as err:
        stub.Upload(_requests(data[: len(data) - 100], _specimen(), sha256=full), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "truncated or altered" in err.value.details()
    assert _objects(store) == before
    assert _sql(stack, "SELECT count(*) FROM field_images WHERE sha256 = %s", full) == [(0,)]


def _with_metadata(fmt: str) -> bytes:
    _, mix = specimen_mix(5, 0, 1)
    img = Image.fromarray(
        render_field(np.random.default_rng(7), lab_style(5, "lab-c"), mix, 256).image
    )
    buf = io.BytesIO()
    if fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("Patient", "Jane Doe 1970-01-01")
        img.save(buf, "PNG", pnginfo=info)
    else:
        exif = Image.Exif()
        exif[0x010E] = "Patient Jane Doe"  # ImageDescription
        exif[0x013B] = "Dr. Who"  # Artist
        img.save(buf, "JPEG", exif=exif.tobytes(), quality=92)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_stored_image_has_no_metadata(stack: Stack, stub, store: ObjectStore, fmt: str) -> None:
    data = _with_metadata(fmt)
    assert b"Jane Doe" in data
    r = stub.Upload(_requests(data, _specimen()), timeout=120)
    [(key, stored_fmt)] = _sql(
        stack, "SELECT object_key, format FROM field_images WHERE id = %s", r.field_id
    )
    assert stored_fmt == fmt
    stored = store.get(key)
    assert b"Jane Doe" not in stored and b"Dr. Who" not in stored
    img = Image.open(io.BytesIO(stored))
    assert img.format == "PNG"
    assert not img.getexif() and not getattr(img, "text", {})
    assert set(img.info) <= {"dpi", "gamma", "srgb"}


def test_cli_upload_and_cells_json(stack: Stack, operator_token: str, tmp_path) -> None:
    folder = tmp_path / "fields"
    folder.mkdir()
    for i in range(2):
        (folder / f"field-{i}.png").write_bytes(_field_png(20 + i))
    specimen = _specimen()
    env = {**os.environ, **stack.env(), "BMCELL_TOKEN": operator_token}
    cmd = [sys.executable, "-m", "bmcell.cli.main"]
    up = subprocess.run(
        [*cmd, "upload", "--lab", "lab-cli", "--specimen", specimen, str(folder)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert up.returncode == 0, up.stderr
    assert "fields 2 (duplicates 0)" in up.stderr
    out = subprocess.run(
        [*cmd, "cells", "--specimen", specimen, "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    cells = json.loads(out.stdout)
    assert cells and {c["specimen"] for c in cells} == {specimen}
    assert all(c["status"] in ("unlabelled", "excluded") for c in cells)


def test_metrics_count_uploads(stack: Stack) -> None:
    text = httpx.get(f"http://{stack.config.addr('segmenter_metrics')}/metrics", timeout=5).text
    assert 'bmcell_segmenter_uploads_total{outcome="created"}' in text
    assert 'bmcell_segmenter_uploads_total{outcome="invalid_argument"}' in text
    assert "bmcell_segmenter_segmentation_seconds_bucket" in text
    assert "bmcell_segmenter_cells_per_field_bucket" in text


def test_without_weights_serves_but_refuses_uploads(stack: Stack, operator_token: str) -> None:
    port, metrics = free_port(), free_port()
    env = {
        **os.environ,
        **stack.env(),
        "BMCELL_GRPC_PORT": str(port),
        "BMCELL_METRICS_PORT": str(metrics),
        "BMCELL_SEGMENTER_MODEL": "untrained",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.segmenter"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        with tls.grpc_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=90)
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 60
            while True:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status == health_pb2.HealthCheckResponse.SERVING or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.RpcError) as err:
                segmenter_pb2_grpc.SegmenterStub(ch).Upload(
                    _requests(_field_png(30), _specimen()),
                    metadata=bearer(operator_token),
                    timeout=30,
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "bmcell segmenter train" in err.value.details()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _named(data: bytes, lab: str, filename: str):
    yield segmenter_pb2.UploadRequest(
        header=segmenter_pb2.UploadHeader(lab=lab, specimen=_specimen(), filename=filename)
    )
    yield segmenter_pb2.UploadRequest(chunk=data)


def test_filenames_are_digested_unless_the_lab_keeps_them(stack: Stack, stub) -> None:
    lab = f"lab-names-{uuid.uuid4().hex[:6]}"
    name = "MRN-0012345_DOE_JANE_1970-01-01.png"
    first = stub.Upload(_named(_field_png(40), lab, name), timeout=120)
    [(stored, digest)] = _sql(
        stack, "SELECT filename, filename_sha256 FROM field_images WHERE id = %s", first.field_id
    )
    assert stored == "" and len(digest) == 64 and name.encode().hex() not in digest
    [(salt,)] = _sql(stack, "SELECT filename_salt FROM labs WHERE code = %s", lab)
    import hashlib

    assert digest == hashlib.sha256(bytes(salt) + name.encode()).hexdigest()
    # The same name again digests the same (a repeated upload stays recognisable) ...
    again = stub.Upload(_named(_field_png(41), lab, name), timeout=120)
    assert _sql(
        stack, "SELECT filename_sha256 FROM field_images WHERE id = %s", again.field_id
    ) == [(digest,)]
    # ... and a lab that opts in keeps the names its clients give.
    _sql(stack, "UPDATE labs SET keep_filenames = true WHERE code = %s RETURNING id", lab)
    kept = stub.Upload(_named(_field_png(42), lab, "slide-7-field-3.png"), timeout=120)
    assert _sql(stack, "SELECT filename FROM field_images WHERE id = %s", kept.field_id) == [
        ("slide-7-field-3.png",)
    ]


def _stalled(released):
    yield segmenter_pb2.UploadRequest(
        header=segmenter_pb2.UploadHeader(lab="lab-seg", specimen=_specimen())
    )
    yield segmenter_pb2.UploadRequest(chunk=b"\x89PNG\r\n\x1a\n")
    released.wait(60)  # then nothing more: the client is stalled


def test_stalled_uploads_are_cut_off_and_concurrency_is_capped(
    stack: Stack, operator_token: str
) -> None:
    """A segmenter with tight limits: a stalled stream is cancelled naming its setting,
    and calls beyond BMCELL_GRPC_MAX_CONCURRENT_RPCS are refused at once."""
    import threading

    port, metrics = free_port(), free_port()
    env = {
        **os.environ,
        **stack.env(),
        "BMCELL_GRPC_PORT": str(port),
        "BMCELL_METRICS_PORT": str(metrics),
        "BMCELL_UPLOAD_IDLE_TIMEOUT_S": "4",
        "BMCELL_GRPC_MAX_CONCURRENT_RPCS": "2",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.segmenter"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    released = threading.Event()
    try:
        with tls.grpc_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=90)
            seg = segmenter_pb2_grpc.SegmenterStub(ch)
            auth = bearer(operator_token)
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                seg.Upload(_stalled(released), metadata=auth, timeout=60)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "BMCELL_UPLOAD_IDLE_TIMEOUT_S" in err.value.details()
            assert time.monotonic() - started < 30  # the server's 4 s, not the client's 60 s
            # Two stalled uploads hold both slots; a third call is refused, not queued.
            held = [
                seg.Upload.future(_stalled(released), metadata=auth, timeout=60) for _ in range(2)
            ]
            time.sleep(1.5)
            with pytest.raises(grpc.RpcError) as err:
                seg.ListCells(
                    segmenter_pb2.ListCellsRequest(lab="lab-seg"), metadata=auth, timeout=10
                )
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for f in held:
                with pytest.raises(grpc.RpcError):
                    f.result(timeout=60)
    finally:
        released.set()
        proc.terminate()
        proc.wait(timeout=30)
