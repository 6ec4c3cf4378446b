"""Object storage on the ``minio`` SDK: the same code talks to MinIO or the embedded
S3 server, so switching is configuration.

Two buckets: ``data_bucket`` holds fields/, cells/, checkpoints/ and reports/;
``models_bucket`` is Triton's model repository, kept apart so a serving node can be
given read access to models and nothing else.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import urllib3
from minio import Minio
from minio.error import S3Error

from bmcell import tls
from bmcell.errors import NotFound, Unavailable
from bmcell.settings import Settings


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_key(prefix: str, digest: str, suffix: str = "") -> str:
    """``prefix/ab/abcdef...suffix``: two-character fan-out keeps listings short."""
    return f"{prefix.strip('/')}/{digest[:2]}/{digest}{suffix}"


def digest_of_key(key: str) -> str | None:
    """The sha256 a :func:`content_key` carries (``cells/ab/<digest>.mask.png``), or None
    for a key that is not a content address."""
    name = key.rsplit("/", 1)[-1]
    digest = name.split(".", 1)[0]
    if len(digest) == 64 and all(c in "0123456789abcdef" for c in digest):
        return digest
    return None


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    modified: datetime  # timezone-aware, from the server


def _trust(settings: Settings) -> dict[str, str]:
    """An HTTPS endpoint is verified against BMCELL_TLS_CA when one is set (the stack's
    and deploy/'s stores present a certificate of the bmcell CA), else the system's CAs."""
    if settings.s3_secure and settings.tls_ca is not None:
        return {"cert_reqs": "CERT_REQUIRED", "ca_certs": str(tls.ca_file(settings))}
    return {}


class ObjectStore:
    def __init__(self, settings: Settings, *, timeout_s: float | None = None) -> None:
        timeout = timeout_s or settings.outbound_timeout_s
        http = urllib3.PoolManager(
            **_trust(settings),
            timeout=urllib3.Timeout(connect=min(timeout, 5.0), read=timeout),
            retries=urllib3.Retry(total=3, backoff_factor=0.2, status_forcelist=(502, 503, 504)),
            maxsize=16,
        )
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key.get_secret_value(),
            secret_key=settings.s3_secret_key.get_secret_value(),
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=http,
        )
        self.data_bucket = settings.data_bucket
        self.models_bucket = settings.models_bucket
        self.endpoint = settings.s3_endpoint

    def ensure_buckets(self) -> ObjectStore:
        for bucket in (self.data_bucket, self.models_bucket):
            with self._mapped(bucket):
                if not self.client.bucket_exists(bucket):
                    try:
                        self.client.make_bucket(bucket)
                    except S3Error as exc:  # another service created it first
                        if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                            raise
        return self

    def put(
        self,
        key: str,
        data: bytes,
        content_type: str = "application/octet-stream",
        *,
        bucket: str | None = None,
    ) -> str:
        bucket = bucket or self.data_bucket
        with self._mapped(f"{bucket}/{key}"):
            self.client.put_object(
                bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )
        return key

    def put_content_addressed(
        self,
        prefix: str,
        data: bytes,
        *,
        suffix: str = "",
        content_type: str = "application/octet-stream",
    ) -> tuple[str, str]:
        """Store ``data`` under its sha256; returns (key, digest). Writing twice is harmless."""
        digest = sha256_hex(data)
        key = content_key(prefix, digest, suffix)
        if not self.exists(key):
            self.put(key, data, content_type)
        return key, digest

    def get(self, key: str, *, bucket: str | None = None) -> bytes:
        bucket = bucket or self.data_bucket
        with self._mapped(f"{bucket}/{key}"):
            resp = self.client.get_object(bucket, key)
            try:
                return resp.read()
            finally:
                resp.close()
                resp.release_conn()

    def exists(self, key: str, *, bucket: str | None = None) -> bool:
        try:
            with self._mapped(key):
                self.client.stat_object(bucket or self.data_bucket, key)
            return True
        except NotFound:
            return False

    def delete(self, key: str, *, bucket: str | None = None) -> None:
        with self._mapped(key):
            self.client.remove_object(bucket or self.data_bucket, key)

    def list(self, prefix: str, *, bucket: str | None = None) -> Iterator[str]:
        bucket = bucket or self.data_bucket
        with self._mapped(f"{bucket}/{prefix}"):
            for obj in self.client.list_objects(bucket, prefix=prefix, recursive=True):
                yield obj.object_name

    def list_objects(self, prefix: str, *, bucket: str | None = None) -> Iterator[StoredObject]:
        """Like :meth:`list`, with each object's size and last-modified time."""
        bucket = bucket or self.data_bucket
        with self._mapped(f"{bucket}/{prefix}"):
            for obj in self.client.list_objects(bucket, prefix=prefix, recursive=True):
                yield StoredObject(obj.object_name, obj.size or 0, obj.last_modified)

    def presigned_url(self, key: str, *, expires_s: int = 3600, bucket: str | None = None) -> str:
        with self._mapped(key):
            return self.client.presigned_get_object(
                bucket or self.data_bucket, key, expires=timedelta(seconds=expires_s)
            )

    class _mapped:
        """Translate the SDK's and urllib3's exceptions into bmcell errors.

        Keys and the store's own words go to ``detail`` (logged), not to the client.
        """

        def __init__(self, what: str) -> None:
            self.what = what

        def __enter__(self) -> None:
            return None

        def __exit__(self, exc_type, exc, tb) -> bool:
            if exc is None:
                return False
            if isinstance(exc, S3Error):
                if exc.code in ("NoSuchKey", "NoSuchBucket", "NoSuchObject"):
                    raise NotFound(f"object {self.what} does not exist") from exc
                raise Unavailable(
                    "object storage refused the request", detail=f"{self.what}: {exc}"
                ) from exc
            if isinstance(exc, urllib3.exceptions.HTTPError | OSError):
                raise Unavailable(
                    "object storage is unreachable", detail=f"{self.what}: {exc}"
                ) from exc
            return False
