"""Who may call the server: TLS credentials and the bearer-token check, built once from the
``server`` section of the config before the cluster starts.

    security = ServerSecurity.load(cfg.server, cfg.source)   # reads the files; ConfigError if bad
    server = grpc.aio.server(interceptors=security.interceptors)
    server.add_secure_port(address, security.credentials)    # None: plaintext (add_insecure_port)

With ``server.auth_token_file`` and/or ``server.auth_token_env`` set, every call must carry the
metadata ``authorization: Bearer <token>`` with one of the configured tokens; any other call ends
with UNAUTHENTICATED before a handler runs or a request message is read. The health service
(``server.health_without_token``, default open) and reflection (``server.reflection_without_token``,
default closed) can be exempted. The token file holds one token a line; blank lines and lines
starting with ``#`` are ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import ssl
from dataclasses import dataclass
from typing import Iterable

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from cluster.config import ConfigError, ServerSettings

# A token goes in an HTTP/2 header after "Bearer ": printable ASCII without spaces; long enough
# that guessing it is hopeless.
MIN_TOKEN_LENGTH = 16
_TOKEN = re.compile(r"[\x21-\x7e]{%d,}" % MIN_TOKEN_LENGTH)
TOKEN_RULE = f"{MIN_TOKEN_LENGTH} or more printable ASCII characters without spaces"


def parse_tokens(text: str) -> list[tuple[int, str]]:
    """(line number, token) for every line that is neither blank nor a ``#`` comment."""
    lines = ((n, line.strip()) for n, line in enumerate(text.splitlines(), start=1))
    return [(n, line) for n, line in lines if line and not line.startswith("#")]


def is_valid_token(token: str) -> bool:
    return _TOKEN.fullmatch(token) is not None


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when its bearer token is one of `tokens` or its service is open."""

    def __init__(self, tokens: Iterable[str], open_services: Iterable[str] = ()):
        # Compared as SHA-256 digests: equal lengths, so the comparison time says nothing about
        # a token's length either.
        self._digests = tuple(_digest(t) for t in tokens)
        if not self._digests:
            raise ValueError("at least one token is needed")
        self._open = frozenset(open_services)

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if _service(details.method) in self._open:
            return await continuation(details)
        problem = self._problem(details.invocation_metadata)
        if problem is None:
            return await continuation(details)
        return _denied(problem)

    def _problem(self, metadata) -> str | None:
        """Why the call is refused, or None. The message never contains what the client sent."""
        header = next((value for key, value in metadata or () if key == "authorization"), None)
        if header is None:
            return "missing bearer token (send metadata 'authorization: Bearer <token>')"
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not self.known(token.strip()):
            return "invalid bearer token"
        return None

    def known(self, token: str) -> bool:
        presented = _digest(token)
        found = False
        for digest in self._digests:  # every one, in constant time: no early exit on a match
            found |= hmac.compare_digest(presented, digest)
        return found


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def _service(method: str) -> str:
    return method.split("/")[1] if method.count("/") == 2 else ""  # "/pkg.Service/Method"


def _denied(message: str) -> grpc.RpcMethodHandler:
    """A handler that refuses the call. Stream-stream fits every kind of call and reads no
    request message: nothing an unauthenticated client sent is parsed."""
    async def deny(requests, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
    return grpc.stream_stream_rpc_method_handler(deny)


# --- from the config -------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSecurity:
    credentials: grpc.ServerCredentials | None  # None = plaintext
    interceptors: tuple[grpc.aio.ServerInterceptor, ...]  # empty = no token check
    transport: str = "plaintext"  # plaintext | TLS | mutual TLS

    @classmethod
    def load(cls, s: ServerSettings, source: str = "<config>") -> "ServerSecurity":
        """Read the TLS files and the tokens; a problem is a ConfigError naming the field."""
        try:
            tokens = _tokens(s)
            credentials = _credentials(s)
        except ConfigError as err:
            raise err.in_file(source) from None
        interceptors = (TokenAuthInterceptor(tokens, _open_services(s)),) if tokens else ()
        transport = ("plaintext" if credentials is None else
                     "mutual TLS" if s.tls_client_ca_file is not None else "TLS")
        return cls(credentials, interceptors, transport)

    @property
    def token_check(self):
        """`check(token) -> bool` with the same tokens and comparison as the gRPC side, for the
        HTTP API; None when no token is asked for."""
        return self.interceptors[0].known if self.interceptors else None

    @property
    def description(self) -> str:
        """For the start-up line, e.g. "mutual TLS, bearer tokens"."""
        return f"{self.transport}, {'bearer tokens' if self.interceptors else 'no tokens'}"


def _open_services(s: ServerSettings) -> set[str]:
    services = set()
    if s.health_without_token:
        services.add(health.SERVICE_NAME)
    if s.reflection_without_token:
        services.add(reflection.SERVICE_NAME)
    return services


def _tokens(s: ServerSettings) -> list[str]:
    tokens = []
    if s.auth_token_file is not None:
        tokens += _file_tokens(s.auth_token_file)
    if s.auth_token_env is not None:
        token = os.environ.get(s.auth_token_env, "").strip()
        if not token:
            raise ConfigError("server.auth_token_env", "names an environment variable that is "
                              "not set or empty", s.auth_token_env)
        if not is_valid_token(token):
            raise ConfigError("server.auth_token_env", f"the token in this variable must be "
                              f"{TOKEN_RULE}", s.auth_token_env)
        tokens.append(token)
    return tokens


def _file_tokens(path: str) -> list[str]:
    field = "server.auth_token_file"
    numbered = parse_tokens(_read(field, path).decode("utf-8", "replace"))
    if not numbered:
        raise ConfigError(field, "holds no token (one a line; blank and # lines are ignored)", path)
    for n, token in numbered:
        if not is_valid_token(token):  # the message names the line, never shows the token
            raise ConfigError(field, f"line {n}: a token must be {TOKEN_RULE}", path)
    return [token for _, token in numbered]


def _credentials(s: ServerSettings) -> grpc.ServerCredentials | None:
    if s.tls_cert_file is None:
        return None  # config.py has checked that the key and the client CA come with the cert
    cert = _read("server.tls_cert_file", s.tls_cert_file)
    key = _read("server.tls_key_file", s.tls_key_file)
    client_ca = None
    if s.tls_client_ca_file is not None:
        client_ca = _read("server.tls_client_ca_file", s.tls_client_ca_file)
    _check_pem(s, cert, client_ca)
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=client_ca,
                                       require_client_auth=client_ca is not None)


def _read(field: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise ConfigError(field, f"cannot read the file: {err.strerror or err}", path) from None


def _check_pem(s: ServerSettings, cert: bytes, client_ca: bytes | None) -> None:
    """gRPC refuses bad PEM only when it binds the port, after the cluster has started, and
    says just "Failed to bind to address"; Python's ssl module tells now which file is wrong."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for field, path, pem in (("tls_cert_file", s.tls_cert_file, cert),
                             ("tls_client_ca_file", s.tls_client_ca_file, client_ca)):
        if pem is not None:
            try:
                context.load_verify_locations(cadata=pem.decode("latin-1"))
            except (ssl.SSLError, ValueError):
                raise ConfigError(f"server.{field}", "holds no PEM certificate", path) from None
    try:  # the password callback refuses encrypted keys instead of prompting on the terminal
        context.load_cert_chain(s.tls_cert_file, s.tls_key_file, password=_no_password)
    except (ssl.SSLError, ValueError, TypeError):
        raise ConfigError("server.tls_key_file", "is not an unencrypted PEM private key matching "
                          "server.tls_cert_file", s.tls_key_file) from None


def _no_password() -> str:
    raise ValueError("encrypted private keys are not supported")
