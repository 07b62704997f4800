"""Who is calling: bearer tokens from a token file, or the subject of a verified client certificate.

Token file: one `name:token` per line, optionally `name:token:weight` (the caller's share of free
sampler rows relative to others, default 1), `#` starts a comment. A name may have several tokens
(add the new one, move the clients, remove the old one). The file is read again when it changes,
so tokens rotate without a restart.

Tokens are compared in constant time (as SHA-256 digests, every stored one each time) and never
logged; the caller's `name` is what logs and metrics show.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import logging
import os
import re
import threading
from pathlib import Path
from typing import Iterable

from .errors import Unauthenticated

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}$")
_TOKEN = re.compile(r"^[\x21-\x7e]{8,512}$")  # printable ASCII, no spaces: what fits a header


class TokenFileError(ValueError):
    """The token file cannot be used; the message names the file, the line and the problem."""


@dataclasses.dataclass(frozen=True)
class Caller:
    name: str = ANONYMOUS
    weight: float = 1.0


ANONYMOUS_CALLER = Caller()


@dataclasses.dataclass(frozen=True)
class _Entry:
    digest: bytes
    caller: Caller


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def parse_token_file(path: str | os.PathLike) -> list[_Entry]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise TokenFileError(f"token file {path}: cannot be read ({err})") from None
    entries: list[_Entry] = []
    weights: dict[str, float] = {}
    seen: set[bytes] = set()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split(":")
        if len(fields) not in (2, 3):
            raise TokenFileError(f"token file {path}, line {number}: expected name:token or name:token:weight")
        name, token = fields[0].strip(), fields[1].strip()
        if not _NAME.match(name):
            raise TokenFileError(f"token file {path}, line {number}: the name must be 1-64 letters, digits or "
                                 f"._@+- (starting with a letter or digit), got {name!r}")
        if not _TOKEN.match(token):
            raise TokenFileError(f"token file {path}, line {number}: the token must be 8-512 printable ASCII "
                                 f"characters without spaces or ':'")
        weight = 1.0
        if len(fields) == 3:
            try:
                weight = float(fields[2])
            except ValueError:
                weight = float("nan")
            if not 0 < weight <= 1000:
                raise TokenFileError(f"token file {path}, line {number}: the weight must be a number in (0, 1000], "
                                     f"got {fields[2].strip()!r}")
        if weights.setdefault(name, weight) != weight:
            raise TokenFileError(f"token file {path}, line {number}: {name!r} is given two different weights")
        digest = _digest(token)
        if digest in seen:
            raise TokenFileError(f"token file {path}, line {number}: this token is already listed "
                                 f"(each token must name one caller)")
        seen.add(digest)
        entries.append(_Entry(digest, Caller(name, weight)))
    if not entries:
        raise TokenFileError(f"token file {path} lists no tokens (lines of name:token)")
    return entries


class Authenticator:
    """Turns a call's `authorization` metadata and peer certificate into a Caller, or UNAUTHENTICATED."""

    def __init__(self, token_file: str | os.PathLike | None = None, client_certificates: bool = False):
        self.token_file = Path(token_file) if token_file else None
        self.client_certificates = client_certificates
        self._entries: list[_Entry] = []
        self._stamp: tuple[int, int] | None = None
        self._lock = threading.Lock()
        if self.token_file:
            self._entries = parse_token_file(self.token_file)
            self._stamp = self._file_stamp()

    @property
    def required(self) -> bool:
        """True when callers must prove who they are (a token, or a client certificate)."""
        return self.token_file is not None or self.client_certificates

    def names(self) -> list[str]:
        return sorted({entry.caller.name for entry in self._current()})

    def authenticate(self, authorization: Iterable[str], certificate_subject: str | None = None) -> Caller:
        """`authorization`: every value of the call's authorization metadata (or header)."""
        if self.token_file is None:
            if self.client_certificates and certificate_subject:
                return Caller(certificate_subject)
            return ANONYMOUS_CALLER
        values = list(authorization)
        if not values:
            raise Unauthenticated("missing token: send metadata 'authorization: Bearer <token>'")
        if len(values) > 1:
            raise Unauthenticated("malformed authorization: send exactly one 'authorization: Bearer <token>'")
        scheme, _, token = values[0].strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("malformed authorization: expected 'Bearer <token>'")
        digest = _digest(token)
        found = None
        for entry in self._current():  # every entry, every time: the time taken says nothing about the token
            if hmac.compare_digest(entry.digest, digest):
                found = entry.caller
        if found is None:
            raise Unauthenticated("unknown token: it is not in this server's token file")
        return found

    def _file_stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.token_file)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _current(self) -> list[_Entry]:
        stamp = self._file_stamp()
        if stamp is not None and stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    try:
                        self._entries = parse_token_file(self.token_file)
                        log.info("token file reloaded", extra={"callers": len({e.caller for e in self._entries})})
                    except TokenFileError as err:  # keep serving with the tokens we had
                        log.warning("token file not reloaded: %s", err)
                    self._stamp = stamp
        return self._entries
