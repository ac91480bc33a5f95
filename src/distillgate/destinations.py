"""Where exports go: ``file://`` paths and ``s3://`` URLs, written the same way.

``write_files(url, files)`` writes a set of named files under one destination prefix and returns the full URL of
each. File names are relative and may not escape the destination (no ``..``, no absolute paths). S3 uses boto3; the
endpoint comes from the ``endpoint_url`` argument, else ``$DISTILLGATE_S3_ENDPOINT``, else boto3's own resolution
(``$AWS_ENDPOINT_URL``, the AWS default). Local writes are atomic per file (temporary file, fsync, rename).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import unquote, urlparse

from distillgate.errors import DestinationError


@dataclass(frozen=True)
class Destination:
    scheme: str  # "file" or "s3"
    location: str  # directory path (file) or bucket (s3)
    prefix: str = ""  # key prefix inside the bucket (s3)

    @property
    def url(self) -> str:
        if self.scheme == "file":
            return Path(self.location).resolve().as_uri() + "/"
        return f"s3://{self.location}/{self.prefix}"


def parse_destination(url: str) -> Destination:
    """Parse ``file:///abs/dir``, a plain local path, or ``s3://bucket/prefix/``."""
    if not url:
        raise DestinationError("empty destination", hint="give a file:///path or s3://bucket/prefix/ URL")
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        path = unquote(parsed.path) if parsed.scheme == "file" else url
        if parsed.scheme == "file" and parsed.netloc not in ("", "localhost"):
            raise DestinationError(
                f"file URL {url!r} names host {parsed.netloc!r}",
                hint="use file:///absolute/path (three slashes) or a plain local path",
            )
        return Destination("file", str(Path(path).expanduser()))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise DestinationError(f"s3 URL {url!r} has no bucket", hint="use s3://bucket/prefix/")
        prefix = parsed.path.lstrip("/")
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return Destination("s3", parsed.netloc, prefix)
    raise DestinationError(
        f"unsupported destination scheme {parsed.scheme!r} in {url!r}",
        hint="use file:///path or s3://bucket/prefix/",
    )


def safe_relative_name(name: str) -> str:
    """Refuse names that would escape the destination root (path traversal)."""
    pure = PurePosixPath(name.replace("\\", "/"))
    if not name or pure.is_absolute() or any(part in ("..", "") for part in pure.parts) or ":" in name:
        raise DestinationError(
            f"refusing file name {name!r}: it would escape the destination",
            hint="names must be relative paths without '..'",
        )
    return str(pure)


def join_url(url: str, name: str) -> str:
    dest = parse_destination(url)
    rel = safe_relative_name(name)
    if dest.scheme == "file":
        return (Path(dest.location).resolve() / rel).as_uri()
    return f"s3://{dest.location}/{dest.prefix}{rel}"


def _write_local(root: Path, rel: str, data: bytes) -> Path:
    target = (root / rel).resolve()
    if root.resolve() not in target.parents:
        raise DestinationError(f"refusing to write {rel!r} outside {root}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def s3_client(endpoint_url: str | None = None):  # type: ignore[no-untyped-def]
    import boto3

    endpoint = endpoint_url or os.environ.get("DISTILLGATE_S3_ENDPOINT") or None
    return boto3.client("s3", endpoint_url=endpoint)


def write_files(url: str, files: Mapping[str, bytes], *, endpoint_url: str | None = None) -> list[str]:
    """Write every ``name -> bytes`` under the destination; return the written URLs in order."""
    dest = parse_destination(url)
    names = [safe_relative_name(n) for n in files]
    written: list[str] = []
    if dest.scheme == "file":
        root = Path(dest.location)
        for name, data in zip(names, files.values(), strict=True):
            written.append(_write_local(root, name, data).as_uri())
        return written
    try:
        client = s3_client(endpoint_url)
        for name, data in zip(names, files.values(), strict=True):
            key = dest.prefix + name
            client.put_object(Bucket=dest.location, Key=key, Body=data)
            written.append(f"s3://{dest.location}/{key}")
    except DestinationError:
        raise
    except Exception as exc:  # botocore raises many types; report them as one user-facing error
        raise DestinationError(
            f"could not write to {url}: {exc}",
            hint="check the bucket exists, credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY) and the "
            "endpoint ($DISTILLGATE_S3_ENDPOINT)",
        ) from exc
    return written


def read_file(url: str, *, endpoint_url: str | None = None) -> bytes:
    """Read back one file written by ``write_files`` (used by tests and ``dataset`` imports)."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        client = s3_client(endpoint_url)
        try:
            obj = client.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))
        except Exception as exc:
            raise DestinationError(f"could not read {url}: {exc}") from exc
        body: bytes = obj["Body"].read()
        return body
    path = Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(url)
    return path.read_bytes()


def url_allowed(url: str, prefixes: list[str]) -> bool:
    """True when ``url`` lies under one of the allowed prefixes (compared after normalising file paths)."""
    try:
        target = parse_destination(url).url
    except DestinationError:
        return False
    for prefix in prefixes:
        try:
            allowed = parse_destination(prefix).url
        except DestinationError:
            continue
        if target == allowed or target.startswith(allowed):
            return True
    return False
