"""Secrets (API keys) never reach a log, a ledger, a commit or a report.

Two defenses, one definition of a secret: child processes get an environment without secret variables
(`is_secret_name`, applied by agent/guard/child_env.py), and every text Ratchet writes passes through `redact`, which replaces the values of
the secret variables of this process.
"""
import os
import re

SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSW|CREDENTIAL|AUTH|PRIVATE|^AWS_", re.I)  # variable names that may hold one
MIN_SECRET_LEN = 8  # shorter values ("1", "true") would redact ordinary text


def is_secret_name(name: str) -> bool:
    return bool(SECRET_NAME.search(name))


def secret_values() -> list[str]:
    values = {v for k, v in os.environ.items() if is_secret_name(k) and len(v) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)  # longest first: a key that contains another is redacted whole


def redact(text: str) -> str:
    for value in secret_values():
        text = text.replace(value, "[redacted]")
    return text
