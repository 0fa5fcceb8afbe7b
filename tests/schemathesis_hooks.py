"""Schemathesis hooks of the contract test (`scripts/contract`): sign each webhook as AcmeCRM does.

Loaded with SCHEMATHESIS_HOOKS=schemathesis_hooks and this folder on PYTHONPATH. The secret comes
from ACME_CONTRACT_SECRET.

`X-Acme-Signature` is `sha256=` + hex(HMAC-SHA256(secret, raw body)) over exactly the bytes sent,
and `X-Acme-Timestamp` is the current unix time (api/src/signature.rs, README "HTTP API"). Both
replace the values Schemathesis generated, and only where it generated one: a case that leaves a
required header out on purpose (the `missing_required_header` check) must still reach the service
without it and get its 401.
"""

import hashlib
import hmac
import json
import os
import time

import schemathesis

WEBHOOK_PATH = "/api/webhooks"
SECRET = os.environ["ACME_CONTRACT_SECRET"].encode()
MAX_ID_BYTES = 255


@schemathesis.hook
def filter_case(context, case):
    """Drops the valid-per-schema webhook bodies that OpenAPI 3.0 cannot tell apart from invalid
    ones: exactly the rules the receiveWebhook description lists as beyond the schema.

    - U+0000 in a key or in the value of an undeclared field (no `propertyNames` in OpenAPI 3.0;
      declared strings carry a pattern, so a NUL in a valid-per-schema body is always in such a place);
    - an id over 255 bytes of UTF-8 while within 255 characters (`maxLength` counts characters).

    Invalid-per-schema (negative) cases are all kept: the service must refuse every one of them.
    """
    if case.operation.path != WEBHOOK_PATH or case.meta is None:
        return True
    if not case.meta.generation.mode.is_positive or not isinstance(case.body, dict):
        return True
    body = case.body
    if _contains_nul(body):
        return False
    data = body.get("data")
    ids = [body.get("id"), data.get("id") if isinstance(data, dict) else None]
    return not any(isinstance(i, str) and len(i.encode("utf-8", "surrogatepass")) > MAX_ID_BYTES for i in ids)


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.operation.path != WEBHOOK_PATH:
        return
    raw = _raw_body(case.body)
    if raw is None:
        return
    # Send these very bytes, so the signature covers what the service receives.
    kwargs["data"] = raw
    headers = case.headers
    if headers is None:
        return
    for name in list(headers):
        if name.lower() == "x-acme-signature":
            headers[name] = "sha256=" + hmac.new(SECRET, raw, hashlib.sha256).hexdigest()
        elif name.lower() == "x-acme-timestamp":
            headers[name] = str(int(time.time()))


def _raw_body(body):
    """The bytes Schemathesis would send for `body` as application/json (None: no body)."""
    if isinstance(body, (bytes, bytearray)):
        return bytes(body)
    if type(body).__name__ == "NotSet":
        return None
    try:
        # What `requests` does with `json=`: compact separators are not used there either.
        return json.dumps(body, allow_nan=False).encode("utf-8")
    except (TypeError, ValueError):
        return None


def _contains_nul(value):
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False
