"""Where files live: a local path or any fsspec URL (s3://, gs://, az://, http(s)://, memory://...).

The data layer reads images, headers and json through these few functions. Local paths keep
their own fast path (plain ``open``, which the JPEG decoders read directly); URLs go through
fsspec (``pip install 'detector[s3]'`` for S3 and S3-compatible servers). Credentials and
endpoints come from the storage client's own configuration (for S3: AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY / AWS_PROFILE / AWS_ENDPOINT_URL, ~/.aws, instance roles; fsspec's
FSSPEC_<PROTOCOL>_<KEY> variables), never from our config: a URL that carries credentials is
refused, and every URL shown in a message is redacted first.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
HEADER_BLOCK = 64 * 1024  # bytes fetched per request while PIL reads a header (EXIF included)
MAX_REMOTE_THREADS = 8  # concurrent requests of the start-up header scan over a URL
# Query parameter names (parts of) that carry credentials: S3/GCS signed URLs (X-Amz-Signature,
# X-Amz-Credential, X-Amz-Security-Token, AWSAccessKeyId), Azure SAS (sig), and the generic ones.
_SECRET_PARAMS = ("sig", "credential", "token", "key", "secret", "pass", "auth")
# Azure's fsspec schemes (adlfs) write the container where a URL has its user:
# abfs://container@account.dfs.core.windows.net/path. A user without a password is a name there.
_CONTAINER_AT_HOST = ("abfs", "abfss", "az", "wasb", "wasbs")


class StorageError(ValueError):
    """A URL that cannot be used (no fsspec backend, credentials in it, unreachable)."""


def is_url(path: str | os.PathLike) -> bool:
    """True for ``scheme://...`` other than file:// (which is read as a local path)."""
    s = str(path)
    return bool(_URL.match(s)) and not s.startswith("file://")


def local_or_url(path: str | os.PathLike) -> Path | str:
    """A Path for local files, the URL string unchanged otherwise (Path() would fold '//')."""
    s = os.fspath(path)
    if s.startswith("file://"):
        return Path(s[len("file://") :])
    return s if is_url(s) else Path(s)


def _userinfo_secret(url: str) -> str:
    """The part before '@' of a URL's netloc when it may be a credential, else "".

    ``user:password@`` always is; a bare ``user@`` is one too (a token used as the user name),
    except in Azure's schemes, where it is the container (``abfs://container@account...``).
    """
    netloc = urlsplit(url).netloc
    if "@" not in netloc:
        return ""
    userinfo = netloc.rsplit("@", 1)[0]
    if url.split("://", 1)[0].lower() in _CONTAINER_AT_HOST and ":" not in userinfo:
        return ""
    return userinfo


def redact(url: str | os.PathLike) -> str:
    """The URL without its credentials (user:password@, a token as user) and without a query
    string (signed URLs carry keys there); an Azure container (``container@account``) stays."""
    s = str(url)
    if not is_url(s):
        return s
    parts = urlsplit(s)
    netloc = parts.netloc.rsplit("@", 1)[-1] if _userinfo_secret(s) else parts.netloc
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def check_url(url: str | os.PathLike, what: str) -> None:
    """Refuse a URL that carries credentials: they would end up in config.yaml and in logs.

    Raises:
        StorageError: naming ``what`` (e.g. data.train.images) and the redacted URL.
    """
    s = str(url)
    if is_url(s):
        parts = urlsplit(s)
        names = [n.lower() for n, _ in parse_qsl(parts.query, keep_blank_values=True)]
        if _userinfo_secret(s) or any(k in n for n in names for k in _SECRET_PARAMS):
            raise StorageError(
                f"{what}: {redact(s)}: credentials in the URL are not accepted (they would be saved in the "
                "run's config and logs); give them through the storage client's own environment or config "
                "(for S3: AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE, AWS_ENDPOINT_URL)"
            )


def _fs(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path within it) for a URL."""
    try:
        import fsspec
    except ImportError:
        raise StorageError(f"{redact(url)}: reading URLs needs fsspec: pip install 'detector[s3]'") from None
    try:
        fs, path = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        raise StorageError(f"{redact(url)}: no filesystem for this URL ({_clean(exc, url)})") from None
    return fs, path


def _clean(exc: BaseException, url: str) -> str:
    """An exception's message with the URL's secret parts removed, should a backend echo them."""
    from urllib.parse import unquote

    text = str(exc) or type(exc).__name__
    userinfo = _userinfo_secret(url)
    parts = [userinfo, urlsplit(url).query, userinfo.partition(":")[2]]  # the password alone, as a backend may echo it
    for secret in sorted({q for p in parts if p for q in (p, unquote(p))}, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text


def join(root: str | os.PathLike, name: str) -> str:
    """root/name for a folder or a URL prefix."""
    r = str(root)
    return r.rstrip("/") + "/" + name if is_url(r) else os.path.join(r, name)


def read_bytes(path: str | os.PathLike) -> bytes:
    """The whole file.

    Raises:
        FileNotFoundError / OSError: naming the (redacted) path.
    """
    if not is_url(path):
        return Path(path).read_bytes()
    fs, p = _fs(str(path))
    try:
        return fs.cat_file(p)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such object: {redact(path)}") from None
    except OSError as exc:
        raise OSError(f"cannot read {redact(path)}: {_clean(exc, str(path))}") from None


def open_binary(path: str | os.PathLike, block_size: int = HEADER_BLOCK) -> IO[bytes]:
    """A binary file object that reads lazily (for headers); local files are opened directly.

    Args:
        path: a local path or URL.
        block_size: bytes fetched per remote request (small: a header needs a few KB).
    """
    if not is_url(path):
        return open(path, "rb")
    fs, p = _fs(str(path))
    try:
        return fs.open(p, "rb", block_size=block_size, cache_type="readahead")
    except FileNotFoundError:
        raise FileNotFoundError(f"no such object: {redact(path)}") from None
    except OSError as exc:
        raise OSError(f"cannot open {redact(path)}: {_clean(exc, str(path))}") from None


def source(path: str | os.PathLike) -> str | os.PathLike | IO[bytes]:
    """What PIL and the decoders read: the path itself when local, the bytes in memory for a URL
    (one GET per image: an object store charges and waits per request, not per byte)."""
    return io.BytesIO(read_bytes(path)) if is_url(path) else path


def isfile(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return os.path.isfile(path)
    fs, p = _fs(str(path))
    try:
        return bool(fs.isfile(p))
    except OSError:
        return False


def existing(root: str | os.PathLike, names: list[str]) -> list[bool]:
    """Which of root/name exist. Under a URL the prefix is listed once (a few paged requests)
    rather than asked about file by file (one round trip each); http(s) roots, which cannot be
    listed, are asked per file, MAX_REMOTE_THREADS at a time."""
    if not is_url(root):
        return [os.path.isfile(os.path.join(root, n)) for n in names]
    fs, p = _fs(str(root))
    p = p.rstrip("/")
    if str(root).startswith(("http://", "https://")):  # a web server cannot be listed: ask per file
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(MAX_REMOTE_THREADS) as pool:
            return list(pool.map(lambda n: isfile(join(root, n)), names))
    try:
        listed = {f[len(p) + 1 :] for f in fs.find(p)} if names else set()
    except FileNotFoundError:
        listed = set()
    except OSError as exc:
        raise OSError(f"cannot list {redact(root)}: {_clean(exc, str(root))}") from None
    return [n in listed for n in names]


def list_files(root: str | os.PathLike, suffixes: tuple[str, ...]) -> list[str]:
    """Files under a folder or URL prefix whose names end with one of ``suffixes`` (lower case),
    sorted, as paths or full URLs."""
    if not is_url(root):
        return sorted(str(p) for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    fs, p = _fs(str(root))
    protocol = str(root).split("://", 1)[0]
    return sorted(f"{protocol}://{f}" for f in fs.find(p.rstrip("/")) if f.lower().endswith(suffixes))
