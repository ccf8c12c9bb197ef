"""Who may change the model for everyone, and how hard it is to guess the admin password.

A private app (the default: it listens on localhost only) lets its user change the model: saved
thresholds and fine-tuned classes go to the user model folder. A public app (a Hugging Face Space,
`--public`, `--share`, or one listening beyond localhost) and an app with an admin password are
*gated*: a visitor's changes stay in their own session, and only a request with the admin password
(`--admin-password`, env VLMDIFF_ADMIN_PASSWORD) changes the model for everyone. On a gated app a
visitor's fine-tunes get the public caps; a request with the admin password gets the full ones.

The password is compared in constant time (digests of equal length), and each client may guess it
at most `FREE_GUESSES` times in a row before every further guess waits out a doubling delay
(1 s, 2 s, 4 s ... at most `MAX_DELAY_S`): a guess in that time is refused unread, with the same
reply as a wrong one.
"""
from __future__ import annotations

import hashlib
import hmac
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from vlmdiff.app.errors import ServiceError
from vlmdiff.app.limits import FINETUNE_LIMITS, PUBLIC_FINETUNE_LIMITS, FinetuneLimits

ADMIN_PASSWORD_ENV = "VLMDIFF_ADMIN_PASSWORD"
FREE_GUESSES = 5  # wrong passwords a client may send before the delay starts
MAX_DELAY_S = 60.0
TRACKED_CLIENTS = 10_000  # clients whose failures are remembered (the oldest are forgotten first)
REJECTED = "Wrong admin password, or too many recent attempts from your address; nothing was changed."


class PasswordGuard:
    """Failed guesses per client and the time each client may guess again."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()  # client -> (failures, next guess at)
        self._lock = threading.Lock()

    def check(self, expected: str, password: str, client: str) -> bool:
        """Whether `password` is right; a client still waiting out its delay gets False without a comparison."""
        with self._lock:
            failures, allowed_at = self._failures.get(client, (0, 0.0))
            now = self._clock()
            if now < allowed_at:
                return False
            if same_secret(password, expected):
                self._failures.pop(client, None)
                return True
            failures += 1
            delay = 0.0 if failures < FREE_GUESSES else min(2.0 ** (failures - FREE_GUESSES), MAX_DELAY_S)
            self._failures[client] = (failures, now + delay)
            self._failures.move_to_end(client)
            while len(self._failures) > TRACKED_CLIENTS:
                self._failures.popitem(last=False)
            return False


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison that does not even tell the length (both sides hashed first)."""
    digest = lambda text: hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()  # noqa: E731
    return hmac.compare_digest(digest(given), digest(expected))


@dataclass(frozen=True)
class Access:
    public: bool = False
    admin_password: str | None = None
    guard: PasswordGuard = field(default_factory=PasswordGuard, compare=False, repr=False)

    @property
    def gated(self) -> bool:
        """Whether changes stay in the visitor's session unless the admin password comes with them."""
        return self.public or bool(self.admin_password)

    def finetune_limits(self, for_everyone: bool = False) -> FinetuneLimits:
        """The caps of one fine-tune request: the public ones for a visitor of a gated app."""
        return PUBLIC_FINETUNE_LIMITS if self.gated and not for_everyone else FINETUNE_LIMITS

    def for_everyone(self, password: str | None, client: str = "local") -> bool:
        """Whether a change sent with `password` goes to the shared model (ServiceError for a wrong one,
        or for any guess while `client` waits out its delay)."""
        if not self.gated:
            return True
        if not password:
            return False
        if not self.admin_password:
            raise ServiceError("This app has no admin password, so changes stay in your session: "
                               "leave the password empty.")
        if not isinstance(password, str) or not self.guard.check(self.admin_password, password, client):
            raise ServiceError(REJECTED)
        return True
