"""The peer channel of the failsafe: one UDP datagram asks, one answers.

Why UDP and the standard library: the exchange is one request and one answer, and it must
work while everything else is failing, so no connection set-up, no handshake and no library
between the owner and its deadline (hmac, hashlib and socket suffice; TLS would add a
handshake per peer on the very path that has a fraction of a heartbeat). A lost datagram is
simply no promise: the owner then demotes as it would without the failsafe.

Every message is a JSON object {v, kind, sender, receiver, time, nonce, ...}, followed by a
newline and the hex HMAC-SHA256 of exactly those JSON bytes under the cluster secret. The
member's endpoint refuses (and logs, at most once per REFUSAL_LOG_EVERY per reason) a bad
MAC, a message to another node, a sender that is not a recorded member, a time off by more
than decide/failsafe.WINDOW, and a nonce seen within that window (the replay cache, bounded:
when full, every request is refused until entries age out). An answer names the request's
nonce (`reply_to`), so an old answer replayed to the owner counts for nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from reconciler.decide import failsafe as rules
from reconciler.spec.model import SpecError
from reconciler.spec.strictmodes import check_permissions

log = logging.getLogger("reconciler.agent")
MAX_DATAGRAM = 2048
REPLAY_CACHE_MAX = 65536  # nonces (about 100 bytes each); a full cache refuses everything new
REFUSAL_LOG_EVERY = 10.0  # seconds between two log lines of one refusal reason
VERSION = 1


class PeerError(Exception):
    """The failsafe cannot start (one line naming the file or address)."""


def read_secret(path: str) -> bytes:
    """The cluster secret in `path`: a file only root or this user can change and nobody
    else can read (mode 0600 or 0400); at least 16 bytes. PeerError names the file."""
    try:
        resolved = check_permissions(path, secret=True)
        with open(resolved, "rb") as fh:
            data = fh.read(4097).strip()
    except SpecError as exc:
        raise PeerError(f"{exc.file}: {exc.detail}") from None
    except OSError as exc:
        raise PeerError(f"{path}: cannot read the peer secret: {exc.strerror or exc}") from None
    if len(data) < 16 or len(data) > 4096:
        raise PeerError(f"{path}: the peer secret must hold 16 to 4096 bytes (e.g. `openssl rand -hex 32`)")
    return data


def split_address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def seal(secret: bytes, body: Mapping[str, object]) -> bytes:
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return raw + b"\n" + hmac.new(secret, raw, hashlib.sha256).hexdigest().encode()


def unseal(secret: bytes, data: bytes) -> dict[str, object] | None:
    """The message's body if its MAC is right (None otherwise: forged, torn or not ours)."""
    raw, sep, mac = data.rpartition(b"\n")
    if not sep or not hmac.compare_digest(mac, hmac.new(secret, raw, hashlib.sha256).hexdigest().encode()):
        return None
    try:
        body = json.loads(raw)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _request_of(body: Mapping[str, object]) -> rules.Request | None:
    try:
        sender, receiver, nonce = body["sender"], body["receiver"], body["nonce"]
        wall, duration = float(body["time"]), float(body["duration"])  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None
    if body.get("v") != VERSION or body.get("kind") != "ask":
        return None
    if not (isinstance(sender, str) and isinstance(receiver, str) and isinstance(nonce, str) and len(nonce) <= 64):
        return None
    return rules.Request(sender=sender, receiver=receiver, wall=wall, nonce=nonce, duration=duration)


class ReplayCache:
    """Nonces seen within the window (wall clock of this node), bounded."""

    def __init__(self, window: float = rules.WINDOW, limit: int = REPLAY_CACHE_MAX):
        self.window, self.limit = window, limit
        self._seen: dict[str, float] = {}  # nonce -> wall time it was seen (insertion order: oldest first)

    def check_and_add(self, key: str, wall: float) -> bool:
        """True if `key` was seen within the window (or the cache is full); records it."""
        while self._seen:
            oldest, at = next(iter(self._seen.items()))
            if wall - at <= 2 * self.window:  # (2x: a request's time may be WINDOW ahead of ours)
                break
            del self._seen[oldest]
        if key in self._seen or len(self._seen) >= self.limit:
            return True
        self._seen[key] = wall
        return False


class Endpoint:
    """The member's side: answers requests on `listen` ("ADDR:PORT") on a thread of its own.

    `decide(request, seen)` gives the answer (decide/failsafe.answer with this node's state)
    and records a promise durably before it returns; the answer is sent after that."""

    def __init__(self, node: str, *, listen: str, secret: bytes, decide: Callable[[rules.Request, bool], rules.Promise | rules.Refusal],
                 wall: Callable[[], float] = time.time, on_answer: Callable[[str], None] = lambda kind: None):
        self.node = node
        self.secret = secret
        self._decide = decide
        self._wall = wall
        self._on_answer = on_answer
        host, port = split_address(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise PeerError(f"peer_listen {listen}: cannot listen: {exc.strerror or exc}") from None
        self.address = self.sock.getsockname()
        self.replays = ReplayCache()
        self._logged: dict[str, float] = {}
        self._stop = False
        self.thread = threading.Thread(target=self._serve, name="peer-endpoint", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.thread.join(timeout=2.0)

    def _refused(self, reason: str, origin: object) -> None:
        self._on_answer("refused")
        key = reason.split(" ", 1)[0] if reason.startswith(("sender", "addressed", "its time", "duration")) else reason
        now = time.monotonic()
        if now - self._logged.get(key, float("-inf")) >= REFUSAL_LOG_EVERY:
            self._logged[key] = now
            log.warning("failsafe: refused a request from %s: %s", origin, reason)

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, origin = self.sock.recvfrom(MAX_DATAGRAM)
            except OSError:
                if self._stop:
                    return
                continue
            if self._stop:
                return
            try:
                self.handle(data, origin)
            except Exception:  # never let the endpoint die: members would stop answering
                log.exception("failsafe: a request could not be answered")

    def handle(self, data: bytes, origin: Any) -> None:
        body = unseal(self.secret, data)
        if body is None:
            self._refused("bad MAC (not signed with the cluster secret)", origin)
            return
        request = _request_of(body)
        if request is None:
            self._refused("not a request", origin)
            return
        seen = self.replays.check_and_add(f"{request.sender}/{request.nonce}", self._wall())
        verdict = self._decide(request, seen)
        if isinstance(verdict, rules.Refusal):
            self._refused(verdict.reason, f"{request.sender} ({origin})")
            kind, reason = "refuse", verdict.reason
        else:
            self._on_answer("promised")
            kind, reason = "promise", ""
        reply = {"v": VERSION, "kind": kind, "sender": self.node, "receiver": request.sender, "time": self._wall(),
                 "nonce": secrets.token_hex(12), "reply_to": request.nonce, "duration": request.duration, "reason": reason}
        try:
            self.sock.sendto(seal(self.secret, reply), origin)
        except OSError as exc:
            log.debug("failsafe: cannot answer %s: %s", origin, exc)


def ask(node: str, *, secret: bytes, peers: Mapping[str, str], duration: float, budget: float,
        clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
        ) -> tuple[float, dict[str, rules.Promise | rules.Refusal | None]]:
    """The owner's side: ask every peer (name -> "ADDR:PORT") to promise for `duration`;
    wait at most `budget` seconds for the answers. Returns (when the first request left, on
    `clock`; {peer: Promise (its deadline unknown here: 0), Refusal, or None: no answer})."""
    answers: dict[str, rules.Promise | rules.Refusal | None] = {p: None for p in peers}
    nonces: dict[str, str] = {}
    socks: dict[int, socket.socket] = {}
    sent_at = clock()
    try:
        for peer, address in peers.items():
            try:
                host, port = split_address(address)
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socks.get(family)
                if sock is None:
                    sock = socks[family] = socket.socket(family, socket.SOCK_DGRAM)
                    sock.setblocking(False)
                nonce = nonces[peer] = secrets.token_hex(12)
                body = {"v": VERSION, "kind": "ask", "sender": node, "receiver": peer, "time": wall(), "nonce": nonce,
                        "duration": duration}
                sock.sendto(seal(secret, body), (host, port))
            except (OSError, ValueError) as exc:
                answers[peer] = rules.Refusal(f"cannot send: {exc}")
        deadline = sent_at + budget
        with selectors.DefaultSelector() as sel:
            for sock in socks.values():
                sel.register(sock, selectors.EVENT_READ)
            while any(a is None for a in answers.values()):
                remaining = deadline - clock()
                if remaining <= 0:
                    break
                for key, _ in sel.select(remaining):
                    _take(key.fileobj, secret, node, nonces, answers)  # type: ignore[arg-type]
    finally:
        for sock in socks.values():
            sock.close()
    return sent_at, answers


def _take(sock: socket.socket, secret: bytes, node: str, nonces: Mapping[str, str],
          answers: dict[str, rules.Promise | rules.Refusal | None]) -> None:
    while True:
        try:
            data, _origin = sock.recvfrom(MAX_DATAGRAM)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # (an ICMP port unreachable surfaces here: that peer simply did not answer)
        body = unseal(secret, data)
        if body is None or body.get("receiver") != node:
            continue
        sender = body.get("sender")
        if not isinstance(sender, str) or sender not in nonces or body.get("reply_to") != nonces[sender]:
            continue  # not an answer to this round's request (a replay of an older one)
        if answers.get(sender) is not None:
            continue
        if body.get("kind") == "promise":
            answers[sender] = rules.Promise(owner=node, deadline=0.0)
        else:
            answers[sender] = rules.Refusal(str(body.get("reason", "refused")))


def boot_id() -> str:
    """This boot's id (monotonic deadlines mean nothing across a reboot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            return fh.read().strip()
    except OSError:
        return ""


__all__ = ["Endpoint", "PeerError", "ReplayCache", "ask", "boot_id", "read_secret", "seal", "split_address", "unseal"]
