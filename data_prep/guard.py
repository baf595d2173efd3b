"""The MIMIC-CXR data-use guard: no MIMIC report text leaves this machine unless the user says it may.

MIMIC-CXR is credentialed-access data. The PhysioNet Credentialed Health Data Use Agreement forbids sharing it
with anyone not bound by that agreement, and PhysioNet's guidance on online services says report text must not be
sent to a hosted LLM API unless the provider is contractually barred from keeping or reviewing it (for example
Azure OpenAI with human review / abuse monitoring opted out, or a model you run yourself). A tool cannot check a
contract, so it asks the user to state it: `llm.allow_remote_mimic=true`. Loopback endpoints (a local vLLM or
llama.cpp server) need no flag: nothing leaves the machine.
"""

from __future__ import annotations

import sys
from typing import TextIO

from xraygpt.openai_client import ChatEndpointConfig, endpoint_url, is_local_endpoint

WHY = (
    "MIMIC-CXR reports are credentialed-access data under the PhysioNet Credentialed Health Data Use Agreement: "
    "they may not be shared with third parties. Sending them to a hosted LLM API is only allowed when that "
    "service is covered, e.g. Azure OpenAI with human review/abuse monitoring opted out, or a model you host "
    "yourself (see PhysioNet's 'Responsible use of MIMIC data with online services like GPT')."
)


class DataUseError(RuntimeError):
    """MIMIC text would go to a non-local endpoint without the explicit approval flag."""


def safe_url(url: str) -> str:
    """The URL without any user:password part, for logs and manifests."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return url


def check_data_use(dataset: str, cleaner: str, endpoint: ChatEndpointConfig, allow_remote_mimic: bool,
                   dry_run: bool = False, out: TextIO | None = None) -> str:
    """Raise DataUseError, or say why sending is fine, *before* any request. Returns the verdict for the manifest."""
    out = out or sys.stderr
    if dataset != "mimic" or cleaner != "llm":
        return "not applicable"
    url = safe_url(endpoint_url(endpoint))
    if is_local_endpoint(endpoint):
        print(f"[data-use] MIMIC-CXR text goes to a local endpoint ({url}); it does not leave this machine.",
              file=out)
        return "local endpoint"
    if dry_run:
        print(f"[data-use] dry run: nothing is sent. A real run would send MIMIC-CXR text to {url}. {WHY} "
              "It will refuse unless llm.allow_remote_mimic=true.", file=out)
        return "dry run"
    if not allow_remote_mimic:
        raise DataUseError(
            f"Refusing to send MIMIC-CXR report text to the non-local endpoint {url}. {WHY}\n"
            "If your endpoint is covered by the agreement, rerun with llm.allow_remote_mimic=true; otherwise use "
            "a local server (llm.endpoint.base_url=http://127.0.0.1:8000/v1) or the offline cleaner (cleaner=rules)."
        )
    print(f"[data-use] Sending MIMIC-CXR report text to {url} because llm.allow_remote_mimic=true. {WHY} "
          "You have stated that this endpoint is covered.", file=out)
    return "remote endpoint approved by llm.allow_remote_mimic"
