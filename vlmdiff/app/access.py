"""Who may change the model for everyone.

A private app (the default) lets its user change the model: saved thresholds and fine-tuned
classes go to the user model folder. A public app (a Hugging Face Space, or `--public`) and an
app with an admin password are *gated*: a visitor's changes stay in their own session, and only
a request with the admin password (`--admin-password`, env VLMDIFF_ADMIN_PASSWORD) changes the
model for everyone. A public app also caps each fine-tune request.
"""
from __future__ import annotations

import hmac
from dataclasses import dataclass

from vlmdiff.app.errors import ServiceError
from vlmdiff.app.limits import FINETUNE_LIMITS, PUBLIC_FINETUNE_LIMITS, FinetuneLimits

ADMIN_PASSWORD_ENV = "VLMDIFF_ADMIN_PASSWORD"


@dataclass(frozen=True)
class Access:
    public: bool = False
    admin_password: str | None = None

    @property
    def gated(self) -> bool:
        """Whether changes stay in the visitor's session unless the admin password comes with them."""
        return self.public or bool(self.admin_password)

    @property
    def finetune_limits(self) -> FinetuneLimits:
        return PUBLIC_FINETUNE_LIMITS if self.public else FINETUNE_LIMITS

    def for_everyone(self, password: str | None) -> bool:
        """Whether a change sent with `password` goes to the shared model (ServiceError for a wrong one)."""
        if not self.gated:
            return True
        if not password:
            return False
        if not self.admin_password:
            raise ServiceError("This app has no admin password, so changes stay in your session: "
                               "leave the password empty.")
        if not hmac.compare_digest(password.encode(), self.admin_password.encode()):
            raise ServiceError("Wrong admin password; nothing was changed.")
        return True
