"""JWT bearer tokens for ``sd35fp8 serve`` (PyJWT): HS256 with a shared secret, or RS256 with a public key.

Why JWT next to API keys: an organisation that already has an identity provider issues short-lived signed
tokens; the images API only has to check the signature and the expiry — no key list to distribute. The
token's ``sub`` (subject) becomes the rate-limit and in-flight identity (``jwt:SUB``), so one user is one
bucket whichever API process they reach.

What is checked, and the 401 each failure gives (the token itself is never echoed or logged):

* the algorithm is the one configured (HS256 *or* RS256, never ``none``, never both: accepting both would let
  an RS256 public key be used as an HS256 secret — the classic algorithm-confusion attack);
* the signature; ``exp`` is present and in the future (30 s leeway for clock skew); ``nbf`` if present;
* ``sub`` is present, a non-empty string; ``aud`` / ``iss`` when the server was given them.

Example:
    >>> verifier = JwtVerifier(JwtConfig(secret="s" * 32))
    >>> verifier.identify(make_jwt("alice", secret="s" * 32, expires_in=60))
    'jwt:alice'
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Sd35fp8Error

MIN_SECRET_BYTES = 32
"""HS256 keys shorter than the hash (256 bits) are guessable offline from one token (RFC 7518 §3.2)."""
LEEWAY_S = 30.0
SUB_PATTERN = re.compile(r"^[A-Za-z0-9@._:+\-|]{1,128}$")


class TokenRejected(Exception):
    """A bearer token that is not accepted; ``message`` says why (never quoting the token)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True)
class JwtConfig:
    """How tokens are verified: ``secret`` (HS256) or ``public_key`` (RS256, PEM), optional audience/issuer."""

    secret: str = field(default="", repr=False)
    public_key: str = field(default="", repr=False)
    audience: str | None = None
    issuer: str | None = None
    leeway_s: float = LEEWAY_S

    def __post_init__(self) -> None:
        if bool(self.secret) == bool(self.public_key):
            raise Sd35fp8Error("JWT verification needs exactly one of a secret (HS256) or a public key (RS256)",
                               fix="pass --jwt-secret-file FILE (or set SD35FP8_JWT_SECRET), or --jwt-public-key FILE")
        if self.secret and len(self.secret.encode()) < MIN_SECRET_BYTES:
            raise Sd35fp8Error(f"the JWT secret is shorter than {MIN_SECRET_BYTES} bytes (value not shown)",
                               fix="make one with: python -c 'import secrets; print(secrets.token_urlsafe(48))'")
        if self.public_key and "PUBLIC KEY" not in self.public_key:
            raise Sd35fp8Error("the JWT public key is not a PEM public key (-----BEGIN PUBLIC KEY-----)",
                               fix="export it with: openssl rsa -in private.pem -pubout -out public.pem")

    @property
    def algorithm(self) -> str:
        return "HS256" if self.secret else "RS256"

    @classmethod
    def from_files(cls, secret_file: str | None = None, public_key_file: str | None = None,
                   secret_env: str = "", **options: Any) -> "JwtConfig | None":
        """From ``--jwt-secret-file`` / ``--jwt-public-key`` / ``SD35FP8_JWT_SECRET``; None when none is given."""
        def read(path: str, what: str) -> str:
            p = Path(path)
            if not p.is_file():
                raise Sd35fp8Error(f"{what} {p} does not exist", fix=f"write it first, or fix the path ({what})")
            return p.read_text().strip()

        secret = read(secret_file, "--jwt-secret-file") if secret_file else secret_env.strip()
        public_key = read(public_key_file, "--jwt-public-key") if public_key_file else ""
        if secret and public_key:
            raise Sd35fp8Error("both a JWT secret and a JWT public key were given",
                               fix="use one: HS256 (--jwt-secret-file) or RS256 (--jwt-public-key)")
        if not secret and not public_key:
            return None
        return cls(secret=secret, public_key=public_key, **options)


def looks_like_jwt(token: str | None) -> bool:
    """Three base64url parts, the first a JSON header (``eyJ``): a JWT, not an ``sk-sd35fp8-`` key."""
    return bool(token) and token.count(".") == 2 and token.startswith("eyJ")


class JwtVerifier:
    """Checks tokens against a :class:`JwtConfig`; :meth:`identify` → ``"jwt:SUB"`` or :class:`TokenRejected`."""

    def __init__(self, config: JwtConfig) -> None:
        self.config = config
        if config.public_key:
            try:
                import cryptography  # noqa: F401  (PyJWT needs it for RS256)
            except ModuleNotFoundError:
                raise Sd35fp8Error("RS256 tokens need the 'cryptography' package",
                                   fix="pip install cryptography (or pip install -e . from the repository root)") from None

    def identify(self, token: str) -> str:
        import jwt

        key = self.config.secret or self.config.public_key
        options = {"require": ["exp", "sub"], "verify_aud": self.config.audience is not None}
        try:
            claims = jwt.decode(token, key, algorithms=[self.config.algorithm], options=options,
                                audience=self.config.audience, issuer=self.config.issuer,
                                leeway=self.config.leeway_s)
        except jwt.ExpiredSignatureError:
            raise TokenRejected("the JWT has expired (its 'exp' is in the past): get a new token") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("the JWT's signature does not verify with this server's key") from None
        except jwt.MissingRequiredClaimError as exc:
            why = "the server uses it as the rate-limit identity" if exc.claim == "sub" else "tokens must expire"
            raise TokenRejected(f"the JWT has no '{exc.claim}' claim: {why}") from None
        except jwt.InvalidAlgorithmError:
            raise TokenRejected(f"the JWT is not signed with {self.config.algorithm}, the only algorithm this "
                                "server accepts") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("the JWT is not valid yet (its 'nbf' is in the future)") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected(f"the JWT's 'aud' is not {self.config.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected(f"the JWT's 'iss' is not {self.config.issuer!r}") from None
        except jwt.PyJWTError:
            raise TokenRejected("the bearer token is not a valid JWT") from None
        sub = claims.get("sub")
        if not isinstance(sub, str) or not SUB_PATTERN.match(sub):
            raise TokenRejected("the JWT's 'sub' must be a non-empty id (letters, digits, @._:+-|; at most "
                                "128 characters)")
        return f"jwt:{sub}"


def make_jwt(sub: str | None, *, secret: str = "", private_key: str = "", expires_in: float | None = 3600,
             **claims: Any) -> str:
    """A signed token (HS256 with ``secret``, RS256 with a PEM ``private_key``) — for tests, notebooks and
    scripts; production tokens come from your identity provider. ``sub=None`` / ``expires_in=None`` leave
    those claims out (to see the 401 they cause)."""
    import jwt

    now = time.time()
    payload: dict[str, Any] = {"iat": int(now), **claims}
    if sub is not None:
        payload["sub"] = sub
    if expires_in is not None:
        payload["exp"] = int(now + expires_in)
    return jwt.encode(payload, secret or private_key, algorithm="HS256" if secret else "RS256")
