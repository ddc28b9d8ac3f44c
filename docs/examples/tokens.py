"""Sign and verify journeyman tokens from Python (PyJWT with cryptography), with the key
lines `journeyman token keygen` writes. docs/protocol.md §10 explains each step.

    pip install pyjwt cryptography
    python3 tokens.py sign   my.key                      # a token signed with my private key
    python3 tokens.py verify registry TOKEN [AGENT_ID]   # the claims, if the token holds

A key line is `kid=MATERIAL sub=AGENT [roles=a,b]`, MATERIAL being `ed25519:<public>` or
`ed25519-private:<seed>`, both 32 bytes in unpadded base64url.
"""
import base64
import sys
import time

import jwt  # PyJWT
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

LEEWAY = 60  # seconds of clock skew, as journeyman allows


def b64url(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def read_keys(path):
    """kid -> (material kind, raw bytes, subject, roles) for every line of a key file."""
    keys = {}
    with open(path) as f:
        for line in f.read().replace(";", "\n").splitlines():
            line = line.split("#")[0].strip()
            if not line:
                continue
            kid, rest = line.split("=", 1)
            material, *opts = rest.split()
            opts = dict(o.split("=", 1) for o in opts)
            kind, raw = material.split(":", 1)
            roles = [r for r in opts.get("roles", "").split(",") if r]
            keys[kid.strip()] = (kind, b64url(raw), opts.get("sub"), roles)
    return keys


def sign(private_key_file, ttl=3600, roles=()):
    kid, (kind, seed, sub, _) = next(iter(read_keys(private_key_file).items()))
    assert kind == "ed25519-private", "sign with your private key"
    now = int(time.time())
    claims = {"sub": sub, "iat": now, "exp": now + ttl}
    if roles:
        claims["roles"] = list(roles)  # optional: the verifier's registry decides
    key = Ed25519PrivateKey.from_private_bytes(seed)
    return jwt.encode(claims, key, algorithm="EdDSA", headers={"kid": kid})


def verify(registry_file, token, source_agent=None):
    """The claims of a valid token, roles replaced by what the registry grants; raises
    otherwise. The key decides the algorithm: never take `alg` from the token."""
    registry = read_keys(registry_file)
    kid = jwt.get_unverified_header(token).get("kid")
    if kid not in registry:
        raise ValueError(f"unknown key id {kid!r}")
    kind, public, sub, granted = registry[kid]
    assert kind == "ed25519", "a registry holds public keys"
    key = Ed25519PublicKey.from_public_bytes(public)
    claims = jwt.decode(token, key, algorithms=["EdDSA"], leeway=LEEWAY,
                        options={"require": ["exp", "iat", "sub"]})
    if claims["sub"] != sub and not (sub.endswith("*") and claims["sub"].startswith(sub[:-1])):
        raise ValueError(f"key {kid!r} is for {sub!r}, not {claims['sub']!r}")
    if source_agent is not None and claims["sub"] != source_agent:
        raise ValueError("source_agent does not match the token's subject")
    extra = set(claims.get("roles", [])) - set(granted)
    if extra:
        raise PermissionError(f"forbidden: key {kid!r} does not grant {sorted(extra)}")
    claims["roles"] = granted
    return claims


if __name__ == "__main__":
    if sys.argv[1] == "sign":
        print(sign(sys.argv[2]))
    else:
        print(verify(sys.argv[2], sys.argv[3], *(sys.argv[4:5])))
