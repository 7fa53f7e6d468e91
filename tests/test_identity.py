"""The host app's identity (docs/identity.md): its JWTs and its backend's service key,
against real `jobwire serve` processes, with tokens shaped as Supabase, Auth0 and Clerk
issue them (signed with this test's own keys)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from jobwire.store import open_store
from tests.conftest import Proc, cli, free_port, guest
from tests.pageserver import PageServer

SECRET = "super-secret-jwt-token-with-at-least-32-characters-long"  # Supabase's local dev shape
SERVICE_KEY = "svc-" + "k" * 40
SUPABASE_ISS = "https://abcdefgh.supabase.co/auth/v1"
AUTH0_ISS = "https://example-tenant.eu.auth0.com/"
AUTH0_AUD = "https://jobs.example.com/api"
CLERK_ISS = "https://clean-mole-12.clerk.accounts.dev"

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_KEY_2 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()


def pem(key: Any) -> str:
    return str(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode())


def jwk(key: Any, kid: str) -> dict[str, Any]:
    """The public half of `key` as a JWKS entry."""
    kind = (RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else
            ECAlgorithm if isinstance(key, ec.EllipticCurvePrivateKey) else OKPAlgorithm)
    return {**kind.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"}


def claims(**extra: Any) -> dict[str, Any]:
    t = int(time.time())
    return {"iat": t, "exp": t + 3600, **extra}


def supabase(sub: str, **extra: Any) -> dict[str, Any]:
    """An access token's claims as Supabase Auth issues them."""
    return claims(**{"aud": "authenticated", "iss": SUPABASE_ISS, "sub": sub,
                     "role": "authenticated", "email": "someone@example.com", "phone": "",
                     "session_id": str(uuid.uuid4()), "is_anonymous": False, "aal": "aal1",
                     "app_metadata": {"provider": "email"}, "user_metadata": {}, **extra})


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None) -> str:
    """A token PyJWT refuses to make: `alg: none`, or HMAC keyed with a public key."""
    signing = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    mac = b"" if secret is None else hmac.new(secret, signing.encode(), hashlib.sha256).digest()
    return f"{signing}.{b64(mac)}"


def start(directory: Path, env: dict[str, str]) -> Proc:
    with pytest.MonkeyPatch.context() as mp:  # the server inherits these, this process not
        for name, value in env.items():
            mp.setenv(name, value)
        return Proc("serve", "--app", "tests.tasks:jobwire", "--db",
                    f"sqlite:///{directory / 'jobwire.db'}", port=free_port(),
                    log=directory / "serve.log").start()


@pytest.fixture(scope="module")
def supa(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    """Supabase's HS256 project secret, its anonymous sign-ins as guests, a service key."""
    proc = start(tmp_path_factory.mktemp("supa"), {
        "JOBWIRE_JWT_SECRET": SECRET, "JOBWIRE_JWT_AUDIENCE": "authenticated",
        "JOBWIRE_JWT_ISSUER": SUPABASE_ISS, "JOBWIRE_JWT_GUEST_CLAIM": "is_anonymous",
        "JOBWIRE_SERVICE_KEY": SERVICE_KEY})
    yield proc
    proc.stop()


class Jwks:
    """A JWKS endpoint on loopback, counting the requests it answers."""

    def __init__(self, keys: list[dict[str, Any]]) -> None:
        self.keys = keys
        self.hits = 0
        self.server = PageServer(self._answer)
        self.url = f"{self.server.base}/.well-known/jwks.json"

    def _answer(self) -> tuple[bytes, str]:
        self.hits += 1
        return json.dumps({"keys": self.keys}).encode(), "application/json"

    def close(self) -> None:
        self.server.close()


@pytest.fixture(scope="module")
def auth0(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Jwks]]:
    """Auth0's shape: RS256 keys from the tenant's JWKS URL, its API audience and issuer."""
    jwks = Jwks([jwk(RSA_KEY, "k1")])
    proc = start(tmp_path_factory.mktemp("auth0"), {
        "JOBWIRE_JWT_JWKS": jwks.url, "JOBWIRE_JWT_AUDIENCE": AUTH0_AUD,
        "JOBWIRE_JWT_ISSUER": AUTH0_ISS, "JOBWIRE_JWT_JWKS_REFRESH_SECONDS": "2"})
    yield proc, jwks
    proc.stop()
    jwks.close()


def auth0_token(sub: str, key: Any = RSA_KEY, kid: str = "k1", **extra: Any) -> str:
    """An Auth0 access token for an API, requested with the openid scope."""
    shape = {"iss": AUTH0_ISS, "sub": sub, "aud": [AUTH0_AUD, AUTH0_ISS + "userinfo"],
             "azp": "Xy7q0pQ1ZxClientId", "scope": "openid profile read:jobs"}
    return jwt.encode(claims(**{**shape, **extra}), key, "RS256", headers={"kid": kid})


def clerk_token(sub: str, key: Any, kid: str, alg: str) -> str:
    """A Clerk session token: no aud, an azp, a session id, nbf a little before iat."""
    t = int(time.time())
    return jwt.encode({"azp": "http://localhost:3000", "exp": t + 60, "iat": t, "nbf": t - 10,
                       "iss": CLERK_ISS, "sid": "sess_2abcDEF", "sub": sub, "v": 2},
                      key, alg, headers={"kid": kid})


def http(server: Proc, token: str, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=30,
                             headers={"Authorization": f"Bearer {token}", **headers})


def ws_url(server: Proc) -> str:
    return server.url.replace("http://", "ws://") + "/api/ws"


async def subscribe(server: Proc, token: str, job_id: str, **headers: str) -> dict[str, Any]:
    """The reply to subscribing to `job_id` on a socket authenticated by header."""
    async with websockets.connect(ws_url(server), additional_headers={
            "Authorization": f"Bearer {token}", **headers}) as ws:
        await ws.send(json.dumps({"op": "subscribe", "job": job_id, "after": 0}))
        reply: dict[str, Any] = json.loads(await ws.recv())
        return reply


async def ws_refusal(server: Proc, token: str, **headers: str) -> tuple[int, str]:
    """How a socket with this token closes: (code, reason)."""
    async with websockets.connect(ws_url(server), additional_headers={
            "Authorization": f"Bearer {token}", **headers}) as ws:
        with pytest.raises(websockets.ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code, closed.value.rcvd.reason


async def submit(api: httpx.AsyncClient, task: str = "echo") -> dict[str, Any]:
    r = await api.post("/api/jobs", json={"task": task, "input": 1})
    assert r.status_code == 201, r.text
    job: dict[str, Any] = r.json()["job"]
    return job


READS = ("", "/items", "/events", "/stream")


async def test_a_users_jwt_never_sees_another_users_job(supa: Proc) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    ta, tb = (jwt.encode(supabase(u), SECRET, "HS256") for u in (alice, bob))
    async with http(supa, ta) as a, http(supa, tb) as b:
        job = await submit(a)
        assert job["owner"] == f"user:{alice}"
        jid = job["id"]
        for path in READS:
            assert (await a.get(f"/api/jobs/{jid}{path}")).status_code == 200, path
            r = await b.get(f"/api/jobs/{jid}{path}")
            assert (r.status_code, r.json()) == (404, {"detail": "job not found"}), path
        assert (await b.post(f"/api/jobs/{jid}/cancel")).status_code == 404
        assert (await b.delete(f"/api/jobs/{jid}")).status_code == 404
        assert (await b.get("/api/jobs")).json() == []
        assert [j["id"] for j in (await a.get("/api/jobs")).json()] == [jid]
    assert (await subscribe(supa, tb, jid))["code"] == 404
    assert (await subscribe(supa, ta, jid))["op"] == "subscribed"


async def test_the_guest_claim_makes_a_guest_only_when_exactly_true(supa: Proc) -> None:
    anon = str(uuid.uuid4())
    for value, owner in [(True, f"guest:{anon}"), ("true", f"user:{anon}"),
                         (1, f"user:{anon}"), (False, f"user:{anon}")]:
        token = jwt.encode({**supabase(anon), "is_anonymous": value}, SECRET, "HS256")
        async with http(supa, token) as api:
            assert (await submit(api))["owner"] == owner, value


async def test_bad_jwts_are_401_saying_why_never_echoing_the_token(supa: Proc) -> None:
    sub, t = str(uuid.uuid4()), int(time.time())
    good = supabase(sub)
    cases = {
        "token expired": supabase(sub, exp=t - 60),  # past the 30 s leeway
        "token not yet valid": supabase(sub, nbf=t + 60),
        "token audience not accepted": {**good, "aud": "anon"},
        "token issuer not accepted": {**good, "iss": "https://other.supabase.co/auth/v1"},
        "token lacks a required claim (exp)": {k: v for k, v in good.items() if k != "exp"},
    }
    tokens = {detail: jwt.encode(c, SECRET, "HS256") for detail, c in cases.items()}
    tokens["token signature invalid"] = jwt.encode(good, "x" * 40, "HS256")
    tokens["token algorithm not accepted"] = hand_made({"alg": "none", "typ": "JWT"}, good, None)
    tokens["malformed token"] = "eyJhbGciOi.not-base64!.x"
    for detail, token in tokens.items():
        async with http(supa, token) as api:
            for method, path in [("GET", "/api/jobs"), ("POST", "/api/jobs"),
                                 ("GET", "/api/jobs/x/stream")]:
                r = await api.request(method, path, json={"task": "echo"})
                assert (r.status_code, r.json()) == (401, {"detail": detail}), (detail, path)
                assert token not in r.text
        assert await ws_refusal(supa, token) == (4401, detail)
    async with http(supa, jwt.encode(supabase(sub, exp=t - 10), SECRET, "HS256")) as api:
        assert (await api.get("/api/jobs")).status_code == 200, "within the leeway"


@pytest.mark.parametrize("sub", ["", "a\x00b", "tab\there", "\u202eevil", "\ud800", "x" * 201,
                                 12345, None, ["a"]])
async def test_a_hostile_sub_makes_no_owner(supa: Proc, sub: Any) -> None:
    token = jwt.encode({**supabase("x"), "sub": sub}, SECRET, "HS256")
    async with http(supa, token) as api:
        r = await api.post("/api/jobs", json={"task": "echo"})
    assert r.status_code == 401
    assert r.json()["detail"].startswith("token claim 'sub' is missing or not an id")


async def test_guest_sessions_work_beside_jwts(supa: Proc) -> None:
    g = await guest(supa.url)
    job = (await g.submit("echo", 1))[0]
    assert job["owner"] == g.owner and g.owner.startswith("guest:")
    token = jwt.encode(supabase(g.owner.removeprefix("guest:")), SECRET, "HS256")
    async with http(supa, token) as api:  # a JWT naming the same id is someone else
        assert (await api.get(f"/api/jobs/{job['id']}")).status_code == 404
    # Routed by shape: a dotless token is a session token, a two-dot one a JWT.
    async with http(supa, "no-dots-here") as api:
        assert (await api.get("/api/jobs")).json() == {"detail": "invalid or expired token"}
    async with http(supa, "a.b.c") as api:
        assert (await api.get("/api/jobs")).json() == {"detail": "malformed token"}
    await g.http.aclose()


async def test_the_service_key_acts_only_as_the_named_owner(supa: Proc) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    ta, tb = (jwt.encode(supabase(u), SECRET, "HS256") for u in (alice, bob))
    async with http(supa, ta) as a, http(supa, tb) as b, \
            http(supa, SERVICE_KEY, **{"X-Jobwire-Owner": f"user:{alice}"}) as svc:
        ja, jb = await submit(a), await submit(b)
        for path in READS:
            assert (await svc.get(f"/api/jobs/{ja['id']}{path}")).status_code == 200, path
            assert (await svc.get(f"/api/jobs/{jb['id']}{path}")).status_code == 404, path
        assert (await svc.post(f"/api/jobs/{jb['id']}/cancel")).status_code == 404
        assert (await svc.delete(f"/api/jobs/{jb['id']}")).status_code == 404
        made = await submit(svc)
        assert made["owner"] == f"user:{alice}"
        assert {j["id"] for j in (await svc.get("/api/jobs")).json()} == {ja["id"], made["id"]}
        assert (await svc.get("/api/jobs", params={"owner": f"user:{bob}"})).status_code == 403
        # Nobody else may name an owner: not a JWT, not a guest session.
        g = await guest(supa.url)
        for api in (a, g.http):
            r = await api.get(f"/api/jobs/{jb['id']}", headers={"X-Jobwire-Owner": f"user:{bob}"})
            assert r.status_code == 403, r.text
            assert (await api.get("/api/jobs", params={"owner": f"user:{bob}"})).status_code == 403
        await g.http.aclose()
        for bad in ("admin", "user:", "root:x", "user:" + "x" * 201):
            r = await svc.get("/api/jobs", headers={"X-Jobwire-Owner": bad})
            assert r.status_code == 400, bad
    as_alice = {"X-Jobwire-Owner": f"user:{alice}"}
    assert (await subscribe(supa, SERVICE_KEY, jb["id"], **as_alice))["code"] == 404
    assert (await subscribe(supa, SERVICE_KEY, ja["id"], **as_alice))["op"] == "subscribed"
    assert (await ws_refusal(supa, tb, **as_alice))[0] == 4403


async def test_the_service_key_alone_reads_every_owner_but_writes_nothing(supa: Proc) -> None:
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    ta, tb = (jwt.encode(supabase(u), SECRET, "HS256") for u in (alice, bob))
    async with http(supa, ta) as a, http(supa, tb) as b, http(supa, SERVICE_KEY) as svc:
        ja, jb = await submit(a), await submit(b)
        listed = {j["id"] for j in (await svc.get("/api/jobs", params={"limit": 500})).json()}
        assert {ja["id"], jb["id"]} <= listed
        only_bob = (await svc.get("/api/jobs", params={"owner": f"user:{bob}"})).json()
        assert [j["id"] for j in only_bob] == [jb["id"]]
        assert (await svc.get("/api/jobs", params={"owner": "bob"})).status_code == 400
        for job in (ja, jb):
            for path in READS:
                assert (await svc.get(f"/api/jobs/{job['id']}{path}")).status_code == 200
        for method, path in [("POST", "/api/jobs"), ("POST", f"/api/jobs/{ja['id']}/cancel"),
                             ("DELETE", f"/api/jobs/{ja['id']}")]:
            r = await svc.request(method, path, json={"task": "echo", "input": 1})
            assert r.status_code == 400 and "X-Jobwire-Owner" in r.json()["detail"], path
        assert (await a.get(f"/api/jobs/{ja['id']}")).status_code == 200, "still there"
    assert (await subscribe(supa, SERVICE_KEY, jb["id"]))["op"] == "subscribed"
    async with http(supa, SERVICE_KEY) as svc, http(supa, ta) as a:
        r = await svc.post("/api/sessions")  # the service key alone is no session to keep
        assert r.status_code == 201 and r.json()["owner"].startswith("guest:")
        r = await a.post("/api/sessions")  # a JWT is the caller's session, kept as it is
        assert (r.status_code, r.json()["owner"]) == (200, f"user:{alice}")


async def test_public_key_pem_refuses_algorithm_confusion(tmp_path: Path) -> None:
    (tmp_path / "key.pem").write_text(pem(RSA_KEY))
    proc = start(tmp_path, {"JOBWIRE_JWT_PUBLIC_KEY": str(tmp_path / "key.pem")})
    try:
        for alg in ("RS256", "PS512"):
            async with http(proc, jwt.encode(claims(sub="u1"), RSA_KEY, alg)) as api:
                assert (await api.get("/api/jobs")).status_code == 200, alg
        # HS256 keyed with the public key's PEM: whoever has the public key could sign.
        confused = hand_made({"alg": "HS256", "typ": "JWT"}, claims(sub="u1"),
                             pem(RSA_KEY).encode())
        forged = jwt.encode(claims(sub="u1"), RSA_KEY_2, "RS256")
        none = hand_made({"alg": "none"}, claims(sub="u1"), None)
        for token, detail in [(confused, "token algorithm not accepted"),
                              (forged, "token signature invalid"),
                              (none, "token algorithm not accepted")]:
            async with http(proc, token) as api:
                assert (await api.get("/api/jobs")).json() == {"detail": detail}
    finally:
        proc.stop()


async def test_auth0_tokens_from_a_jwks_url_and_its_key_rotation(
        auth0: tuple[Proc, Jwks]) -> None:
    proc, jwks = auth0
    async with http(proc, auth0_token("auth0|alice")) as api:
        assert (await submit(api))["owner"] == "user:auth0|alice"
    for token, detail in [(auth0_token("auth0|a", aud="https://other.example/api"),
                           "token audience not accepted"),
                          (auth0_token("auth0|a", iss="https://evil.auth0.com/"),
                           "token issuer not accepted"),
                          (auth0_token("auth0|a", key=RSA_KEY_2), "token signature invalid"),
                          (auth0_token("auth0|a", exp=int(time.time()) - 60), "token expired")]:
        async with http(proc, token) as api:
            assert (await api.get("/api/jobs")).json() == {"detail": detail}
        assert await ws_refusal(proc, token) == (4401, detail)
    # The provider rotates: k1 withdrawn, k2 published. After the refresh interval (2 s
    # here), a k2 token's unknown kid fetches the set once; k1 then fails.
    jwks.keys = [jwk(RSA_KEY_2, "k2")]
    await asyncio.sleep(2.2)
    hits = jwks.hits
    async with http(proc, auth0_token("auth0|alice", key=RSA_KEY_2, kid="k2")) as api:
        assert (await api.get("/api/jobs")).status_code == 200
    assert jwks.hits == hits + 1
    async with http(proc, auth0_token("auth0|alice")) as api:
        assert (await api.get("/api/jobs")).json() == {"detail": "token signing key unknown"}


async def test_a_flood_of_unknown_kids_fetches_the_jwks_at_most_once_per_interval(
        auth0: tuple[Proc, Jwks]) -> None:
    proc, jwks = auth0
    hits, began, sent = jwks.hits, time.monotonic(), 0
    async with httpx.AsyncClient(base_url=proc.url, timeout=30) as api:
        while time.monotonic() - began < 3:
            tokens = [auth0_token("auth0|x", kid=uuid.uuid4().hex) for _ in range(20)]
            replies = await asyncio.gather(*(api.get(
                "/api/jobs", headers={"Authorization": f"Bearer {t}"}) for t in tokens))
            assert {r.status_code for r in replies} == {401}
            sent += len(tokens)
    elapsed = time.monotonic() - began
    assert sent >= 100
    assert 1 <= jwks.hits - hits <= elapsed / 2 + 1, (jwks.hits - hits, elapsed)


async def test_clerk_tokens_from_a_jwks_file_of_each_key_type(tmp_path: Path) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk(RSA_KEY, "ins_rsa"), jwk(EC_KEY, "ins_ec"),
                                         jwk(ED_KEY, "ins_ed")]}))
    proc = start(tmp_path, {"JOBWIRE_JWT_JWKS": str(path), "JOBWIRE_JWT_ISSUER": CLERK_ISS,
                            "JOBWIRE_JWT_JWKS_REFRESH_SECONDS": "1"})
    try:
        for key, kid, alg in [(RSA_KEY, "ins_rsa", "RS256"), (EC_KEY, "ins_ec", "ES256"),
                              (ED_KEY, "ins_ed", "EdDSA")]:
            async with http(proc, clerk_token("user_2NNEqL2nrIRdJ194ndJqAHwEfxC", key, kid,
                                              alg)) as api:
                assert (await submit(api))["owner"] == "user:user_2NNEqL2nrIRdJ194ndJqAHwEfxC"
        # An EC key cannot verify an RS256 token, whatever the header says.
        async with http(proc, clerk_token("user_x", RSA_KEY, "ins_ec", "RS256")) as api:
            r = await api.get("/api/jobs")
        assert r.json() == {"detail": "token algorithm not accepted"}
        path.write_text(json.dumps({"keys": [jwk(RSA_KEY_2, "ins_new")]}))
        await asyncio.sleep(1.2)
        async with http(proc, clerk_token("user_x", RSA_KEY_2, "ins_new", "RS256")) as api:
            assert (await api.get("/api/jobs")).status_code == 200
    finally:
        proc.stop()


@pytest.mark.parametrize("env, says", [
    ({"JOBWIRE_SERVICE_KEY": "short"}, "JOBWIRE_SERVICE_KEY must be at least 32"),
    ({"JOBWIRE_JWT_SECRET": "short"}, "JOBWIRE_JWT_SECRET must be at least 32"),
    ({"JOBWIRE_JWT_SECRET": SECRET, "JOBWIRE_JWT_JWKS": "/x.json"}, "set one of"),
    ({"JOBWIRE_JWT_PUBLIC_KEY": "/nonexistent.pem"}, "JOBWIRE_JWT_PUBLIC_KEY is not"),
])
def test_bad_identity_settings_stop_the_server(env: dict[str, str], says: str,
                                              tmp_path: Path) -> None:
    done = cli("serve", "--db", f"sqlite:///{tmp_path / 'j.db'}", "--port", str(free_port()),
               env=env)
    assert done.returncode != 0
    assert says in done.stderr and "Traceback" not in done.stderr, done.stderr


async def test_stores_list_every_owners_jobs(db_url: str) -> None:
    store = open_store(db_url)
    await store.open()
    try:
        a = (await store.submit("user:a", "echo", 1, None, 1))[0]
        b = (await store.submit("guest:b", "echo", 2, None, 1))[0]
        assert [j.id for j in await store.list_jobs(None, None, 10)] == [b.id, a.id]
        assert [j.id for j in await store.list_jobs("user:a", None, 10)] == [a.id]
    finally:
        await store.close()
