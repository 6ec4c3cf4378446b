"""Who may upload to the segmenter: the shared interceptor's tokens and roles
(bmcell.grpc_auth, bmcell.policy) and the segmenter's lab scope.

Every refusal is checked to leave nothing behind: no lab, specimen or field row and no
new object under ``fields/`` or ``cells/``.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from PIL import Image

from bmcell import tls
from bmcell import users as user_repo
from bmcell.db import Database
from bmcell.grpc_client import bearer
from bmcell.settings import Settings
from bmcell.stack import Stack
from bmcell.storage import ObjectStore, sha256_hex
from bmcell.synth import lab_style, render_field, specimen_mix
from bmcell.v1 import segmenter_pb2, segmenter_pb2_grpc

pytestmark = pytest.mark.integration


@dataclass
class People:
    """Labs, users and their tokens, named uniquely per run (``{name}-{tag}``)."""

    db: Database
    tag: str = field(default_factory=lambda: uuid.uuid4().hex[:8])

    def lab(self, name: str) -> str:
        code = f"{name}-{self.tag}"
        with self.db.transaction() as conn:
            conn.execute("INSERT INTO labs (code) VALUES (%s)", (code,))
        return code

    def token(self, name: str, role: str, labs: list[str]) -> str:
        with self.db.transaction() as conn:
            user_repo.add_user(conn, f"{name}-{self.tag}", role, labs)
            return user_repo.issue_token(conn, f"{name}-{self.tag}", 1).token

    def one(self, query: str, *args: object):
        with self.db.connection() as conn:
            return conn.execute(query, args).fetchone()


@dataclass(frozen=True)
class World:
    lab_a: str
    lab_b: str
    # By the user's short name: uploader, reviewer (both of lab A), operator, admin, and
    # uploaders of lab A whose token is revoked, expired, or who are disabled.
    tokens: dict[str, str]
    people: People

    def user(self, short: str) -> str:
        return f"{short}-{self.people.tag}"


@pytest.fixture(scope="module")
def world(rt: tuple[Settings, Database, ObjectStore]) -> World:
    _, db, _ = rt
    people = People(db)
    a, b = people.lab("auth-a"), people.lab("auth-b")
    roles = {
        "uploader": ("uploader", [a]),
        "reviewer": ("reviewer", [a]),
        "operator": ("operator", []),
        "admin": ("admin", []),
        "revoked": ("uploader", [a]),
        "expired": ("uploader", [a]),
        "disabled": ("uploader", [a]),
    }
    tokens = {short: people.token(short, role, labs) for short, (role, labs) in roles.items()}
    world = World(a, b, tokens, people)
    with db.transaction() as conn:
        user_repo.revoke(conn, name=world.user("revoked"), token_prefix=None)
        conn.execute(
            "UPDATE api_tokens SET expires_at = now() - interval '1 minute' WHERE prefix = %s",
            (tokens["expired"][:12],),
        )
        conn.execute(
            "UPDATE users SET disabled_at = now() WHERE name = %s", (world.user("disabled"),)
        )
    return world


@pytest.fixture(scope="module")
def channel(stack: Stack) -> Iterator[grpc.Channel]:
    with tls.grpc_channel(stack.config.addr("segmenter")) as ch:
        yield ch


def _field_png(seed: int, size: int = 256) -> bytes:
    _, mix = specimen_mix(9, 0, 0)
    sample = render_field(np.random.default_rng(seed), lab_style(9, "lab-d"), mix, size)
    buf = io.BytesIO()
    Image.fromarray(sample.image).save(buf, "PNG")
    return buf.getvalue()


def _fresh_png() -> bytes:
    """A field no other upload has sent, so a wrongly accepted one would write objects."""
    return _field_png(int(uuid.uuid4().int % 10**9))


def _requests(data: bytes, lab: str, specimen: str):
    yield segmenter_pb2.UploadRequest(
        header=segmenter_pb2.UploadHeader(lab=lab, specimen=specimen, filename="f.png")
    )
    yield segmenter_pb2.UploadRequest(chunk=data)


def _upload(
    channel: grpc.Channel, data: bytes, lab: str, specimen: str, metadata
) -> segmenter_pb2.UploadResponse:
    stub = segmenter_pb2_grpc.SegmenterStub(channel)
    return stub.Upload(_requests(data, lab, specimen), metadata=metadata, timeout=180)


def _objects(store: ObjectStore) -> set[str]:
    return set(store.list("fields/")) | set(store.list("cells/"))


def _specimen() -> str:
    return f"s-{uuid.uuid4().hex[:10]}"


REFUSALS = [
    # (who, how the metadata is sent, which lab, code, words in the detail)
    ("no token", None, "a", grpc.StatusCode.UNAUTHENTICATED, "missing 'authorization'"),
    ("basic", "Basic dXNlcjpwdw==", "a", grpc.StatusCode.UNAUTHENTICATED, "Bearer <token>"),
    ("garbage", "Bearer bmc_not-a-token", "a", grpc.StatusCode.UNAUTHENTICATED, "not known"),
    ("revoked", "revoked", "a", grpc.StatusCode.UNAUTHENTICATED, "revoked at"),
    ("expired", "expired", "a", grpc.StatusCode.UNAUTHENTICATED, "expired at"),
    ("disabled", "disabled", "a", grpc.StatusCode.UNAUTHENTICATED, "is disabled"),
    (
        "reviewer",
        "reviewer",
        "a",
        grpc.StatusCode.PERMISSION_DENIED,
        "'reviewer' may not call /bmcell.v1.Segmenter/Upload",
    ),
    ("uploader, other lab", "uploader", "b", grpc.StatusCode.PERMISSION_DENIED, "lab {lab}"),
    ("uploader, new lab", "uploader", "new", grpc.StatusCode.PERMISSION_DENIED, "lab {lab}"),
]


@pytest.mark.parametrize(
    ("who", "send", "which", "code", "words"), REFUSALS, ids=[r[0] for r in REFUSALS]
)
def test_refused_upload_leaves_nothing(
    world: World,
    channel: grpc.Channel,
    rt: tuple[Settings, Database, ObjectStore],
    who: str,
    send: str | None,
    which: str,
    code: grpc.StatusCode,
    words: str,
) -> None:
    store = rt[2]
    lab = {"a": world.lab_a, "b": world.lab_b, "new": f"auth-new-{uuid.uuid4().hex[:8]}"}[which]
    if send is None:
        metadata = None
    elif send.startswith(("Basic ", "Bearer ")):
        metadata = (("authorization", send),)
    else:
        metadata = bearer(world.tokens[send])
    data, specimen = _fresh_png(), _specimen()
    before = _objects(store)
    with pytest.raises(grpc.RpcError) as err:
        _upload(channel, data, lab, specimen, metadata)
    assert err.value.code() == code, (who, err.value.details())
    assert words.format(lab=repr(lab)) in err.value.details(), err.value.details()
    people = world.people
    assert people.one("SELECT count(*) AS n FROM specimens WHERE code = %s", specimen)["n"] == 0
    digest = sha256_hex(data)
    assert people.one("SELECT count(*) AS n FROM field_images WHERE sha256 = %s", digest)["n"] == 0
    if which == "new":
        assert people.one("SELECT count(*) AS n FROM labs WHERE code = %s", lab)["n"] == 0
    assert _objects(store) == before


def test_uploader_names_its_own_labs_when_refused(world: World, channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _upload(channel, _fresh_png(), world.lab_b, _specimen(), bearer(world.tokens["uploader"]))
    assert f"may not upload to lab {world.lab_b!r}; their labs: {world.lab_a}" in (
        err.value.details()
    )


@pytest.mark.parametrize(("who", "which"), [("uploader", "a"), ("operator", "b"), ("admin", "new")])
def test_allowed_upload_records_the_uploader(
    world: World, channel: grpc.Channel, who: str, which: str
) -> None:
    lab = {"a": world.lab_a, "b": world.lab_b, "new": f"auth-new-{uuid.uuid4().hex[:8]}"}[which]
    r = _upload(channel, _fresh_png(), lab, _specimen(), bearer(world.tokens[who]))
    assert not r.duplicate and r.field_id > 0
    row = world.people.one(
        """SELECT u.name, l.code FROM field_images f
             JOIN users u ON u.id = f.uploaded_by
             JOIN specimens s ON s.id = f.specimen_id JOIN labs l ON l.id = s.lab_id
            WHERE f.id = %s""",
        r.field_id,
    )
    assert (row["name"], row["code"]) == (world.user(who), lab)


def test_same_bytes_in_another_lab_are_that_labs_own_field(
    world: World, channel: grpc.Channel
) -> None:
    """Deduplication is per lab: lab B's uploader sending bytes lab A already has gets
    a new field of B's (not A's id or counts, which would tell B what A holds)."""
    people, data = world.people, _fresh_png()
    uploader_b = bearer(people.token("uploader-b", "uploader", [world.lab_b]))
    specimen_a, specimen_b = _specimen(), _specimen()
    in_a = _upload(channel, data, world.lab_a, specimen_a, bearer(world.tokens["operator"]))
    in_b = _upload(channel, data, world.lab_b, specimen_b, uploader_b)
    assert not in_a.duplicate and not in_b.duplicate
    assert in_b.field_id != in_a.field_id and in_b.sha256 == in_a.sha256 == sha256_hex(data)
    assert in_b.cells == in_a.cells > 0  # the same image, segmented again for B

    # Again to lab B, even for another specimen: B's field, as a duplicate.
    again = _upload(channel, data, world.lab_b, _specimen(), uploader_b)
    assert again.duplicate
    assert (again.field_id, again.cells, again.border_cells) == (
        in_b.field_id,
        in_b.cells,
        in_b.border_cells,
    )

    def field(field_id: int):
        return people.one(
            """SELECT l.code AS lab, s.code AS specimen, u.name AS uploader, f.object_key,
                      (SELECT count(*) FROM cells c WHERE c.field_id = f.id) AS cells,
                      (SELECT count(*) FROM cells c WHERE c.field_id = f.id
                          AND (c.lab_id, c.specimen_id) = (f.lab_id, f.specimen_id)) AS own
                 FROM field_images f JOIN specimens s ON s.id = f.specimen_id
                 JOIN labs l ON l.id = s.lab_id JOIN users u ON u.id = f.uploaded_by
                WHERE f.id = %s""",
            field_id,
        )

    a, b = field(in_a.field_id), field(in_b.field_id)
    assert (a["lab"], a["specimen"], a["uploader"]) == (
        world.lab_a,
        specimen_a,
        world.user("operator"),
    )
    assert (b["lab"], b["specimen"], b["uploader"]) == (
        world.lab_b,
        specimen_b,
        world.user("uploader-b"),
    )
    assert a["cells"] == a["own"] == in_a.cells and b["cells"] == b["own"] == in_b.cells
    assert a["object_key"] == b["object_key"]  # objects are content addressed, shared
    n = people.one("SELECT count(*) AS n FROM field_images WHERE sha256 = %s", in_a.sha256)["n"]
    assert n == 2

    # B's uploader lists B's field's cells, and A's field as if it did not exist.
    stub = segmenter_pb2_grpc.SegmenterStub(channel)
    mine = stub.ListCells(
        segmenter_pb2.ListCellsRequest(field_id=in_b.field_id), metadata=uploader_b, timeout=10
    )
    assert len(mine.cells) == in_b.cells and {c.lab for c in mine.cells} == {world.lab_b}
    theirs = stub.ListCells(
        segmenter_pb2.ListCellsRequest(field_id=in_a.field_id), metadata=uploader_b, timeout=10
    )
    assert list(theirs.cells) == []


def test_list_cells_needs_a_token_and_keeps_to_the_callers_labs(
    world: World, channel: grpc.Channel
) -> None:
    stub = segmenter_pb2_grpc.SegmenterStub(channel)
    specimen_b = _specimen()
    _upload(channel, _fresh_png(), world.lab_b, specimen_b, bearer(world.tokens["operator"]))
    request = segmenter_pb2.ListCellsRequest(specimen=specimen_b)
    with pytest.raises(grpc.RpcError) as err:
        stub.ListCells(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    as_operator = stub.ListCells(request, metadata=bearer(world.tokens["operator"]), timeout=10)
    assert as_operator.cells and {c.lab for c in as_operator.cells} == {world.lab_b}
    # An uploader of lab A sees lab B's specimen as it would one that does not exist.
    outside = stub.ListCells(request, metadata=bearer(world.tokens["uploader"]), timeout=10)
    assert list(outside.cells) == []
    by_lab = segmenter_pb2.ListCellsRequest(lab=world.lab_b)
    assert list(stub.ListCells(by_lab, metadata=bearer(world.tokens["reviewer"])).cells) == []


def test_cli_upload_sends_the_token(world: World, stack: Stack, tmp_path) -> None:
    path = tmp_path / "field.png"
    path.write_bytes(_fresh_png())
    env = {k: v for k, v in os.environ.items() if k != "BMCELL_TOKEN"} | stack.env()
    # An env file without a token (the stack's carries its operator's).
    env["BMCELL_STACK_RUN_DIR"] = str(tmp_path)
    cmd = [sys.executable, "-m", "bmcell.cli.main", "upload", "--lab", world.lab_a]
    cmd += ["--specimen", _specimen()]

    def run(*args: str, token: str | None = None) -> subprocess.CompletedProcess:
        extra = {} if token is None else {"BMCELL_TOKEN": token}
        return subprocess.run(
            [*cmd, *args, str(path)],
            capture_output=True,
            text=True,
            env=env | extra,
            timeout=300,
        )

    missing = run()
    assert missing.returncode == 2 and "BMCELL_TOKEN" in missing.stderr
    refused = run("--token", world.tokens["reviewer"])
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr
    done = run(token=world.tokens["uploader"])
    assert done.returncode == 0, done.stderr
    assert "fields 1 (duplicates 0)" in done.stderr


def test_scenario_uploads_with_an_operator_token(stack: Stack, tmp_path) -> None:
    """What `bmcell demo` and `bmcell experiment` do: an operator's token, issued again
    on a second run, for every lab's `bmcell upload` process."""
    from bmcell import scenario
    from bmcell.synth import generate_dataset

    seed = int(uuid.uuid4().int % 10**6)
    manifest = generate_dataset(tmp_path, labs=2, specimens=1, fields=1, seed=seed, size=256)
    said: list[str] = []
    url = stack.env()["BMCELL_LABELAPI_URL"]
    first = scenario.person_token(url, stack.admin_token(), "test-operator")
    token = scenario.person_token(url, stack.admin_token(), "test-operator")
    assert token != first
    scenario.upload(manifest, said.append, token, stack.env())
    assert sum("fields 1" in line for line in said) == 2, said
