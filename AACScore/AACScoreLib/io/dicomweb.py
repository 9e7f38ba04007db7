"""A DICOMweb server (a PACS) as a source of radiographs and a place for results, through dicomweb-client:
QIDO-RS finds instances, WADO-RS retrieves them, STOW-RS stores the SEG, SR and heatmap back.

On the command line a server is written `dicomweb+http://HOST:PORT/dicom-web` (or `dicomweb+https://`), so that
it cannot be taken for a folder. Credentials never appear on the command line: with `--user NAME` the password
comes from the environment variable AACSCORE_DICOMWEB_PASSWORD (else a prompt on a terminal), and `--token`
takes a bearer token from AACSCORE_DICOMWEB_TOKEN. Every failure of the server (unreachable, refused login,
HTTP error) leaves as an AACScoreError of one line naming the server.
"""

from __future__ import annotations

import getpass
import itertools
import os
import sys
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence, TypeVar

import requests

from ..errors import AACScoreError

PREFIXES = ("dicomweb+http://", "dicomweb+https://")
PASSWORD_ENV = "AACSCORE_DICOMWEB_PASSWORD"
TOKEN_ENV = "AACSCORE_DICOMWEB_TOKEN"
TIMEOUT = (10, 120)
"""Seconds to connect and to wait for the server's next bytes (dicomweb-client's default of 20 s to answer can be
too short for a busy PACS storing large objects)."""
ATTEMPTS = 3
"""Tries per request (dicomweb-client's retry, 2 s then 4 s apart): a busy PACS gets a second chance, an
unreachable one costs seconds, not minutes."""
_T = TypeVar("_T")


def is_dicomweb(text: str) -> bool:
    return str(text).lower().startswith(PREFIXES)


@dataclass(frozen=True)
class Instance:
    """One instance a query found: its three UIDs and what QIDO-RS said it is."""

    study: str
    series: str
    sop: str
    modality: str
    sop_class: str


def parse_filters(texts: Sequence[str]) -> list[dict[str, str]]:
    """'Modality=DX,CR' (repeatable) -> one QIDO-RS query per combination of values: [{'Modality': 'DX'}, ...].

    QIDO-RS matches a list of values only for UIDs, so a list becomes several queries whose results are joined.
    """
    from pydicom.datadict import dictionary_VR, tag_for_keyword

    choices: dict[str, list[str]] = {}
    for text in texts:
        keyword, equals, values = text.partition("=")
        keyword = keyword.strip()
        if not equals or not keyword or not values.strip():
            raise AACScoreError(f"--filter must look like Keyword=value[,value...] (e.g. Modality=DX,CR), got {text!r}")
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise AACScoreError(f"--filter {text!r}: {keyword!r} is not a DICOM keyword")
        parts = [value.strip() for value in values.split(",") if value.strip()]
        if dictionary_VR(tag) == "UI":  # QIDO-RS takes a UID list as one comma-separated value
            parts = [",".join(parts)]
        choices.setdefault(keyword, []).extend(parts)
    keywords = list(choices)
    return [dict(zip(keywords, combination)) for combination in itertools.product(*choices.values())] or [{}]


class DicomWebServer:
    """One DICOMweb service root; `call` turns every transport or HTTP failure into a one-line AACScoreError."""

    def __init__(self, url: str, user: str | None = None, password: str | None = None, token: str | None = None):
        from dicomweb_client.api import DICOMwebClient

        self.address = url
        self.url = url.split("+", 1)[1] if is_dicomweb(url) else url
        self.session = requests.Session()
        if user is not None:
            self.session.auth = (user, password or "")
        if token is not None:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.client = DICOMwebClient(url=self.url.rstrip("/"), session=self.session, timeout=TIMEOUT)
        self.client.set_http_retry_params(retry=ATTEMPTS > 1, max_attempts=ATTEMPTS)

    @classmethod
    def from_options(cls, url: str, user: str | None = None, token: bool = False,
                     environ: Mapping[str, str] | None = None,
                     prompt: Callable[[str], str] | None = None) -> "DicomWebServer":
        """The server with the credentials the options ask for, taken from the environment (or a prompt)."""
        environ = os.environ if environ is None else environ
        password = None
        if user is not None:
            password = environ.get(PASSWORD_ENV)
            if password is None:
                if prompt is None and not sys.stdin.isatty():
                    raise AACScoreError(f"--user {user}: set the password in the environment variable {PASSWORD_ENV}")
                password = (prompt or getpass.getpass)(f"DICOMweb password for {user}: ")
        bearer = None
        if token:
            bearer = environ.get(TOKEN_ENV)
            if not bearer:
                raise AACScoreError(f"--token: set the token in the environment variable {TOKEN_ENV}")
        return cls(url, user, password, bearer)

    def instance_url(self, instance: Instance) -> str:
        """The instance's WADO-RS address: the key of its row in results.csv."""
        return f"{self.url.rstrip('/')}/studies/{instance.study}/series/{instance.series}/instances/{instance.sop}"

    def call(self, what: str, function: Callable[..., _T], *args, **kwargs) -> _T:
        try:
            return function(*args, **kwargs)
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else "?"
            hint = " (check --user/--token and the credentials)" if status in (401, 403) else ""
            raise AACScoreError(f"{self.url}: {what} refused with HTTP {status}{hint}") from None
        except requests.RequestException as error:
            raise AACScoreError(f"{self.url}: cannot {what} ({type(error).__name__}: server unreachable or not "
                                "answering?)") from None

    def find(self, filters: Sequence[Mapping[str, str]]) -> list[Instance]:
        """Every instance matching any of the queries (QIDO-RS, all pages), sorted by UIDs, without repeats."""
        found: dict[str, Instance] = {}
        for query in filters:
            matches = self.call("query instances", self.client.search_for_instances,
                                search_filters=dict(query), get_remaining=True,
                                fields=["Modality", "SOPClassUID"])
            for match in matches:
                instance = Instance(*(_value(match, tag) for tag in ("0020000D", "0020000E", "00080018",
                                                                     "00080060", "00080016")))
                if instance.sop:
                    found.setdefault(instance.sop, instance)
        return sorted(found.values(), key=lambda i: (i.study, i.series, i.sop))

    def retrieve(self, instance: Instance):
        """The instance as a pydicom dataset (WADO-RS, in its stored transfer syntax)."""
        return self.call("retrieve an instance", self.client.retrieve_instance,
                         instance.study, instance.series, instance.sop)

    def store(self, datasets: Sequence) -> list[str]:
        """Store datasets (STOW-RS); returns their SOP Instance UIDs, or raises naming those the server refused."""
        response = self.call("store results", self.client.store_instances, list(datasets))
        failed = [str(item.get("ReferencedSOPInstanceUID", "?")) for item in response.get("FailedSOPSequence", [])]
        if failed:
            raise AACScoreError(f"{self.url}: the server refused to store {', '.join(failed)}")
        return [str(dataset.SOPInstanceUID) for dataset in datasets]


def _value(match: Mapping, tag: str) -> str:
    values = match.get(tag, {}).get("Value") or [""]
    return str(values[0])
