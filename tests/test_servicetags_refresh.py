"""Service tags refreshed from the Service Tag Discovery API (issue #18, item 4).

The management endpoint is a real HTTP server on loopback answering as Azure Resource Manager
does (change numbers as strings, ``nextLink``, ARM error bodies), the token comes from a static
credential, and the config container is on Azurite.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError
from azure.storage.blob import BlobServiceClient, ContainerClient

from analyzer.capture.budget import InvalidSettingError
from analyzer.judge.servicetags import ServiceTags
from analyzer.pipeline.servicetags_refresh import (
    API_VERSION,
    DEFAULT_BLOB,
    SOURCE,
    RefreshError,
    RefreshSettings,
    attention,
    normalized_document,
    refresh_service_tags,
    service_tags_state,
    state_blob_name,
    validated,
)
from analyzer.pipeline.status import status_document
from analyzer.store.results import TableResultsStore
from tests.clirunner import nwcap
from tests.conftest import network_watcher_path, udp_capture

DATA = Path(__file__).resolve().parent / "data" / "servicetags_small.json"
SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
LOCATION = "westeurope"
TOKEN = "test-token-for-the-management-endpoint"  # noqa: S105  # a fake, checked on arrival
LIST_PATH = (
    f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Network/locations/{LOCATION}/serviceTags"
)


def api_document(change_number: int = 321) -> dict[str, Any]:
    """The small download file as the Discovery API returns it: change numbers as strings."""
    download = json.loads(DATA.read_text())
    values = copy.deepcopy(download["values"])
    for value in values:
        value["properties"]["changeNumber"] = str(value["properties"]["changeNumber"])
    return {
        "name": "Public",
        "id": f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Network/serviceTags/Public",
        "type": "Microsoft.Network/serviceTags",
        "changeNumber": str(change_number),
        "cloud": "Public",
        "values": values,
    }


@dataclass
class Answer:
    """What the fake management endpoint answers to one request."""

    status: int = 200
    body: bytes = b""
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Management:
    """A loopback HTTP server standing in for management.azure.com."""

    endpoint: str
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)  # (path?query, Authorization)

    def answer(self, path: str, *answers: Answer) -> None:
        """Answer requests for ``path`` in turn, the last one for ever after."""
        self.answers[path] = list(answers)

    def serve(self, document: dict[str, Any]) -> None:
        self.answer(LIST_PATH, Answer(body=json.dumps(document).encode()))

    def next_answer(self, path: str) -> Answer:
        queue = self.answers.get(path)
        if not queue:
            return Answer(404, b'{"error": {"code": "NotFound", "message": "no such path"}}')
        return queue.pop(0) if len(queue) > 1 else queue[0]


@pytest.fixture
def management() -> Iterator[Management]:
    state = Management(endpoint="")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append((self.path, self.headers.get("Authorization", "")))
            answer = state.next_answer(urlsplit(self.path).path)
            if answer.delay:
                time.sleep(answer.delay)
            try:
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer.body)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(answer.body)
            except OSError:
                pass  # the client gave up (the slow case)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


class StaticCredential:
    """A token credential handing out one fixed token, recording the scopes asked for."""

    def __init__(self, token: str = TOKEN, error: Exception | None = None) -> None:
        self.token = token
        self.error = error
        self.scopes: list[str] = []

    def get_token(
        self,
        *scopes: str,
        claims: str | None = None,
        tenant_id: str | None = None,
        enable_cae: bool = False,
        **kwargs: Any,
    ) -> AccessToken:
        self.scopes.extend(scopes)
        if self.error is not None:
            raise self.error
        return AccessToken(self.token, int(time.time()) + 3600)


@pytest.fixture
def config(blob_service: BlobServiceClient) -> Iterator[ContainerClient]:
    container = blob_service.create_container(f"cfg-{uuid.uuid4().hex[:12]}")
    yield container
    container.delete_container()


def settings_for(
    management: Management, container: ContainerClient, **changes: Any
) -> RefreshSettings:
    base = RefreshSettings.from_environ(
        {
            "NWCAP_SERVICE_TAGS_SUBSCRIPTION": SUBSCRIPTION,
            "NWCAP_SERVICE_TAGS_LOCATION": LOCATION,
            "NWCAP_SERVICE_TAGS_ENDPOINT": management.endpoint,
            "NWCAP_SERVICE_TAGS_REFRESH_CONTAINER": container.container_name,
        }
    )
    return replace(base, **{"retries": 0, "timeout_seconds": 5.0, **changes})


Refresh = Callable[..., Any]


@pytest.fixture
def refresh(management: Management, config: ContainerClient) -> Refresh:
    """Refresh into the test's container from the test's endpoint (forced unless told)."""

    def run(settings: RefreshSettings | None = None, **kwargs: Any) -> Any:
        kwargs.setdefault("force", True)
        credential = kwargs.pop("credential", StaticCredential())
        return refresh_service_tags(
            settings or settings_for(management, config), config, credential, **kwargs
        )

    return run


def stored(
    container: ContainerClient, blob: str = DEFAULT_BLOB
) -> tuple[bytes, str, dict[str, str]]:
    client = container.get_blob_client(blob)
    properties = client.get_blob_properties()
    return client.download_blob().readall(), str(properties.etag), dict(properties.metadata)


class TestRefresh:
    def test_first_fetch_writes_the_tags_and_their_metadata(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.serve(api_document(321))
        credential = StaticCredential()
        before = time.time()
        result = refresh(credential=credential)
        assert result.status == "updated", result.error
        assert (result.change_number, result.cloud, result.error) == (321, "Public", "")
        assert result.previous_change_number is None
        assert result.blob == f"{config.container_name}/{DEFAULT_BLOB}"
        data, _, metadata = stored(config)
        assert metadata["changeNumber"] == "321"
        assert metadata["cloud"] == "Public"
        assert metadata["location"] == LOCATION
        assert metadata["source"] == SOURCE == "discovery-api"
        assert metadata["fetched_at"] == result.fetched_at
        fetched = time.mktime(time.strptime(result.fetched_at[:19], "%Y-%m-%dT%H:%M:%S"))
        assert abs(fetched - time.timezone - before) < 60
        # stored in the download's shape, integers and all, and read by the app's parser
        document = json.loads(data)
        assert document["changeNumber"] == 321
        assert {v["properties"]["changeNumber"] for v in document["values"]} == {3}
        assert "nextLink" not in document and "id" not in document
        tags = ServiceTags.from_json(data)
        assert tags.change_number == 321
        assert len(tags) == len(json.loads(DATA.read_text())["values"])
        assert tags.lookup("20.50.1.1")
        # the request: the documented URL, api-version and a bearer token for the endpoint
        [(path, authorization)] = management.requests
        assert path == f"{LIST_PATH}?api-version={API_VERSION}"
        assert authorization == f"Bearer {TOKEN}"
        assert credential.scopes == [f"{management.endpoint}/.default"]

    def test_same_change_number_is_not_written_again(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.serve(api_document(321))
        first = refresh()
        data, etag, metadata = stored(config)
        time.sleep(0.01)
        again = refresh()
        assert again.status == "unchanged", again.error
        assert (again.change_number, again.fetched_at) == (321, first.fetched_at)
        assert stored(config) == (data, etag, metadata)
        assert len(management.requests) == 2
        # the check itself is recorded beside it, for the status
        state = service_tags_state(config)
        assert state is not None
        assert state["last_status"] == "unchanged"
        assert state["checked_at"] >= first.fetched_at

    def test_new_change_number_replaces_the_copy(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.serve(api_document(321))
        refresh()
        _, etag, _ = stored(config)
        newer = api_document(322)
        newer["values"][0]["properties"]["addressPrefixes"].append("198.51.100.0/24")
        management.serve(newer)
        result = refresh()
        assert (result.status, result.change_number, result.previous_change_number) == (
            "updated",
            322,
            321,
        )
        data, new_etag, metadata = stored(config)
        assert new_etag != etag
        assert metadata["changeNumber"] == "322"
        assert ServiceTags.from_json(data).lookup("198.51.100.7") == ("ActionGroup",)

    def test_older_change_number_is_not_a_step_back(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.serve(api_document(321))
        refresh()
        before = stored(config)
        management.serve(api_document(300))
        result = refresh()
        assert (result.status, result.change_number) == ("unchanged", 321)
        assert "older" in result.error
        assert stored(config) == before

    def test_pages_are_joined(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        document = api_document(321)
        first, second = dict(document), dict(document)
        first["values"], second["values"] = document["values"][:2], document["values"][2:]
        first["nextLink"] = f"{management.endpoint}/page2?api-version={API_VERSION}"
        management.serve(first)
        management.answer("/page2", Answer(body=json.dumps(second).encode()))
        result = refresh()
        assert result.status == "updated", result.error
        assert len(ServiceTags.from_json(stored(config)[0])) == len(document["values"])
        assert [auth for _, auth in management.requests] == [f"Bearer {TOKEN}"] * 2


FAILURES = {
    "server error": (
        Answer(500, b'{"error": {"code": "InternalServerError", "message": "try later"}}'),
        "HTTP 500 InternalServerError: try later",
    ),
    "forbidden": (
        Answer(
            403,
            b'{"error": {"code": "AuthorizationFailed", "message": "The client does not have '
            b"authorization to perform action 'Microsoft.Network/locations/serviceTags/read'\"}}",
        ),
        "HTTP 403 AuthorizationFailed",
    ),
    "slow": (Answer(delay=3.0, body=b"{}"), "timed out"),
    "not json": (Answer(body=b"<html>maintenance</html>"), "not JSON"),
    "bad prefix": (None, "not valid service tags: values[0].properties.addressPrefixes[0]"),
    "no change number": (None, "changeNumber is missing"),
    "no tags": (None, "no service tag"),
    "not an object": (Answer(body=b"[1, 2]"), "not a JSON object"),
    "redirect": (Answer(302, b"", headers={"Location": "https://elsewhere.example/"}), "HTTP 302"),
}


def failing_answer(case: str) -> Answer:
    answer, _ = FAILURES[case]
    if answer is not None:
        return answer
    document = api_document(999)
    if case == "bad prefix":
        document["values"][0]["properties"]["addressPrefixes"][0] = "300.1.2.3/8"
    elif case == "no change number":
        del document["changeNumber"]
    else:
        document["values"] = []
    return Answer(body=json.dumps(document).encode())


class TestFailureKeepsTheLastGoodCopy:
    @pytest.mark.parametrize("case", sorted(FAILURES))
    def test_failure(
        self, case: str, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.serve(api_document(321))
        good = refresh()
        assert good.status == "updated"
        before = stored(config)
        management.answer(LIST_PATH, failing_answer(case))
        settings = settings_for(management, config, timeout_seconds=1.0)
        started = time.monotonic()
        result = refresh(settings)
        assert time.monotonic() - started < 2.5
        assert result.status == "failed"
        assert FAILURES[case][1] in result.error
        # the copy kept is the one described
        assert (result.change_number, result.fetched_at) == (321, good.fetched_at)
        assert stored(config) == before
        state = service_tags_state(config)
        assert state is not None
        assert (state["change_number"], state["last_status"]) == (321, "failed")
        assert FAILURES[case][1] in state["last_error"]

    def test_forbidden_says_which_role(self, management: Management, refresh: Refresh) -> None:
        management.answer(LIST_PATH, failing_answer("forbidden"))
        result = refresh()
        assert "Microsoft.Network/locations/serviceTags/read" in result.error
        assert "docs/deploy.md" in result.error

    def test_no_token(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.serve(api_document(321))
        refresh()
        before = stored(config)
        error = ClientAuthenticationError("ManagedIdentityCredential: no identity assigned")
        result = refresh(credential=StaticCredential(error=error))
        assert result.status == "failed"
        assert "no token for" in result.error and "no identity assigned" in result.error
        assert stored(config) == before
        assert len(management.requests) == 1  # nothing was sent without a token

    def test_nothing_stored_before_a_first_failure(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.answer(LIST_PATH, failing_answer("server error"))
        result = refresh()
        assert (result.status, result.change_number, result.fetched_at) == ("failed", None, None)
        assert [b.name for b in config.list_blobs()] == [state_blob_name(DEFAULT_BLOB)]
        state = service_tags_state(config)
        assert state is not None
        assert state["change_number"] is None and state["age_seconds"] is None
        assert state["last_status"] == "failed"

    def test_throttling_is_retried(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.answer(
            LIST_PATH,
            Answer(429, b"{}", headers={"Retry-After": "1"}),
            Answer(body=json.dumps(api_document(321)).encode()),
        )
        pauses: list[float] = []
        result = refresh(settings_for(management, config, retries=2), sleep=pauses.append)
        assert result.status == "updated", result.error
        assert pauses == [1.0]
        assert len(management.requests) == 2

    def test_next_link_elsewhere_gets_no_token(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        document = api_document(321)
        document["nextLink"] = "https://attacker.example/page2"
        management.serve(document)
        result = refresh()
        assert result.status == "failed"
        assert "nextLink leads away" in result.error
        assert len(management.requests) == 1

    def test_missing_container(
        self, management: Management, blob_service: BlobServiceClient
    ) -> None:
        missing = blob_service.get_container_client(f"none-{uuid.uuid4().hex[:12]}")
        management.serve(api_document(321))
        settings = settings_for(management, missing)
        result = refresh_service_tags(settings, missing, StaticCredential(), force=True)
        assert result.status == "failed"
        assert "no container" in result.error
        assert management.requests == []


class TestWhenToRefresh:
    def test_off_and_unconfigured(self, management: Management, refresh: Refresh) -> None:
        management.serve(api_document(321))
        unset = refresh(RefreshSettings.from_environ({}))
        assert unset.status == "skipped"
        assert "NWCAP_SERVICE_TAGS_SUBSCRIPTION" in unset.error
        off = refresh(
            RefreshSettings.from_environ(
                {
                    "NWCAP_SERVICE_TAGS_SUBSCRIPTION": SUBSCRIPTION,
                    "NWCAP_SERVICE_TAGS_LOCATION": LOCATION,
                    "NWCAP_SERVICE_TAGS_REFRESH": "off",
                }
            )
        )
        assert (off.status, off.error) == ("skipped", "NWCAP_SERVICE_TAGS_REFRESH is off")
        assert management.requests == []

    def test_timer_waits_for_the_interval(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.serve(api_document(321))
        now = time.time()
        assert refresh(force=False, clock=lambda: now).status == "updated"
        later = refresh(force=False, clock=lambda: now + 3600)
        assert (later.status, later.change_number) == ("skipped", 321)
        assert "next check in" in later.error
        assert len(management.requests) == 1
        assert refresh(force=False, clock=lambda: now + 86400).status == "unchanged"
        assert refresh(force=True, clock=lambda: now + 86401).status == "unchanged"
        assert len(management.requests) == 3

    def test_a_deleted_copy_is_fetched_again_at_once(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.serve(api_document(321))
        now = time.time()
        assert refresh(force=False, clock=lambda: now).status == "updated"
        config.delete_blob(DEFAULT_BLOB)
        assert refresh(force=False, clock=lambda: now + 60).status == "updated"
        assert ServiceTags.from_json(stored(config)[0]).change_number == 321

    def test_after_a_failure_the_timer_retries_sooner(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.answer(LIST_PATH, failing_answer("server error"))
        now = time.time()
        assert refresh(force=False, clock=lambda: now).status == "failed"
        assert refresh(force=False, clock=lambda: now + 600).status == "skipped"
        management.serve(api_document(321))
        assert refresh(force=False, clock=lambda: now + 3601).status == "updated"

    def test_a_file_given_by_setting_wins(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.serve(api_document(321))
        mine = json.dumps(json.loads(DATA.read_text())).encode()
        config.upload_blob("ServiceTags_Public_20260105.json", mine)
        for location in (
            f"{config.container_name}/ServiceTags_Public_20260105.json",
            config.get_blob_client("ServiceTags_Public_20260105.json").url,
            "/etc/nwcap/ServiceTags_Public.json",
        ):
            settings = settings_for(management, config, explicit_location=location)
            assert settings.tags_location() == location
            result = refresh(settings)
            assert result.status == "skipped"
            assert "NWCAP_SERVICE_TAGS names" in result.error and "wins" in result.error
        assert management.requests == []
        assert [b.name for b in config.list_blobs()] == ["ServiceTags_Public_20260105.json"]
        assert (
            config.get_blob_client("ServiceTags_Public_20260105.json").download_blob().readall()
            == mine
        )

    def test_a_setting_naming_the_refreshed_blob_is_refreshed(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.serve(api_document(321))
        for location in (
            f"{config.container_name}/{DEFAULT_BLOB}",
            config.get_blob_client(DEFAULT_BLOB).url,
        ):
            settings = settings_for(management, config, explicit_location=location)
            assert refresh(settings).status in ("updated", "unchanged")
        assert len(management.requests) == 2

    def test_never_overwrites_a_file_it_did_not_write(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.serve(api_document(999))
        uploaded = DATA.read_bytes()
        config.upload_blob(DEFAULT_BLOB, uploaded)
        etag = config.get_blob_client(DEFAULT_BLOB).get_blob_properties().etag
        result = refresh()
        assert result.status == "skipped"
        assert "not written by the refresh" in result.error
        properties = config.get_blob_client(DEFAULT_BLOB).get_blob_properties()
        assert properties.etag == etag
        assert management.requests == []
        state = service_tags_state(config)
        assert state is not None and state["source"] == "uploaded"


class TestState:
    def test_nothing_yet(self, config: ContainerClient) -> None:
        assert service_tags_state(config) is None

    def test_change_number_and_age(
        self, management: Management, config: ContainerClient, refresh: Refresh
    ) -> None:
        management.serve(api_document(321))
        now = time.time()
        result = refresh(clock=lambda: now)
        state = service_tags_state(config, clock=lambda: now + 100)
        assert state == {
            "blob": f"{config.container_name}/{DEFAULT_BLOB}",
            "source": "discovery-api",
            "change_number": 321,
            "cloud": "Public",
            "fetched_at": result.fetched_at,
            "age_seconds": pytest.approx(100, abs=0.1),
            "checked_at": result.fetched_at,
            "checked_age_seconds": pytest.approx(100, abs=0.1),
            "last_attempt_at": result.fetched_at,
            "last_status": "updated",
            "last_error": None,
        }
        json.dumps(state)  # ready for the status document
        # an unchanged check a day later: the copy is as old as before, the check is new
        refresh(clock=lambda: now + 86400)
        state = service_tags_state(config, clock=lambda: now + 86500)
        assert state is not None
        assert state["age_seconds"] == pytest.approx(86500, abs=0.1)
        assert state["checked_age_seconds"] == pytest.approx(100, abs=0.1)
        settings = settings_for(management, config)
        assert attention(state, settings) == []
        stale = service_tags_state(config, clock=lambda: now + 86400 + 3 * 86400)
        assert attention(stale, settings) == [
            "service tags: no successful check for more than 48 h"
        ]

    def test_attention(self, management: Management, config: ContainerClient) -> None:
        settings = settings_for(management, config)
        assert attention(None, settings) == [
            f"service tags: {config.container_name}/{DEFAULT_BLOB} has never been refreshed"
        ]
        assert attention(None, replace(settings, enabled=False)) == []
        assert attention(None, replace(settings, explicit_location="/etc/nwcap/tags.json")) == []
        failed = {
            "last_status": "failed",
            "last_error": "HTTP 403",
            "change_number": 7,
            "checked_age_seconds": 10.0,
        }
        assert attention(failed, settings) == [
            "service tags: the last refresh failed (HTTP 403); change number 7 is kept"
        ]


class TestDocument:
    """The pure half: the API's document into the download's shape, then validated."""

    def test_api_shape_becomes_the_download_shape(self) -> None:
        document = normalized_document([api_document(5)])
        assert document["changeNumber"] == 5
        assert set(document) == {"changeNumber", "cloud", "values"}
        assert validated(document).change_number == 5

    def test_download_shape_is_accepted_as_is(self) -> None:
        download = json.loads(DATA.read_text())
        assert normalized_document([download]) == {
            "changeNumber": download["changeNumber"],
            "cloud": download["cloud"],
            "values": download["values"],
        }

    @pytest.mark.parametrize(
        ("pages", "message"),
        [
            ([], "no document"),
            ([{"changeNumber": "x1", "values": []}], "not a whole number"),
            ([{"changeNumber": True, "values": []}], "not a whole number"),
            ([{"changeNumber": "-1", "values": []}], "not a whole number"),
            ([{"changeNumber": "1", "values": {}}], "values is not a list"),
            (
                [{"changeNumber": "1", "values": []}, {"changeNumber": "2", "values": []}],
                "changed while they were read",
            ),
        ],
    )
    def test_bad_documents(self, pages: list[Any], message: str) -> None:
        with pytest.raises(RefreshError, match=message):
            normalized_document(pages)


class TestSettings:
    def test_defaults(self) -> None:
        settings = RefreshSettings.from_environ({})
        assert not settings.enabled
        assert settings.tags_location() == ""
        on = RefreshSettings.from_environ(
            {
                "NWCAP_SERVICE_TAGS_SUBSCRIPTION": SUBSCRIPTION.upper().replace("0", "A"),
                "NWCAP_SERVICE_TAGS_LOCATION": "West Europe",
            }
        )
        assert on.enabled
        assert on.location == "westeurope"
        assert on.subscription_id == "aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa"
        assert (on.container, on.blob) == ("nwcap-config", "servicetags.json")
        assert on.tags_location() == "nwcap-config/servicetags.json"
        assert on.state_blob == "servicetags.refresh.json"
        assert on.url() == (
            "https://management.azure.com/subscriptions/aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa"
            "/providers/Microsoft.Network/locations/westeurope/serviceTags"
            f"?api-version={API_VERSION}"
        )
        assert on.scope == "https://management.azure.com/.default"
        assert on.interval_seconds == 86400

    def test_explicit_file_is_what_the_app_reads(self) -> None:
        settings = RefreshSettings.from_environ(
            {
                "NWCAP_SERVICE_TAGS_SUBSCRIPTION": SUBSCRIPTION,
                "NWCAP_SERVICE_TAGS_LOCATION": LOCATION,
                "NWCAP_SERVICE_TAGS": " https://x.blob.core.windows.net/c/tags.json ",
            }
        )
        assert settings.tags_location() == "https://x.blob.core.windows.net/c/tags.json"

    def test_sovereign_cloud(self) -> None:
        settings = RefreshSettings.from_environ(
            {
                "NWCAP_SERVICE_TAGS_SUBSCRIPTION": SUBSCRIPTION,
                "NWCAP_SERVICE_TAGS_LOCATION": "usgovvirginia",
                "NWCAP_SERVICE_TAGS_ENDPOINT": "https://management.usgovcloudapi.net/",
                "NWCAP_SERVICE_TAGS_API_VERSION": "2023-09-01",
                "NWCAP_SERVICE_TAGS_REFRESH_INTERVAL": "12h",
            }
        )
        assert settings.url().startswith("https://management.usgovcloudapi.net/subscriptions/")
        assert settings.url().endswith("?api-version=2023-09-01")
        assert settings.scope == "https://management.usgovcloudapi.net/.default"
        assert settings.interval_seconds == 12 * 3600

    @pytest.mark.parametrize(
        ("environ", "named"),
        [
            ({"NWCAP_SERVICE_TAGS_REFRESH": "on"}, "NWCAP_SERVICE_TAGS_SUBSCRIPTION and"),
            ({"NWCAP_SERVICE_TAGS_REFRESH": "maybe"}, "NWCAP_SERVICE_TAGS_REFRESH"),
            ({"NWCAP_SERVICE_TAGS_SUBSCRIPTION": "../../providers"}, "SUBSCRIPTION"),
            ({"NWCAP_SERVICE_TAGS_LOCATION": "west/europe"}, "NWCAP_SERVICE_TAGS_LOCATION"),
            ({"NWCAP_SERVICE_TAGS_ENDPOINT": "http://management.example"}, "must be https"),
            ({"NWCAP_SERVICE_TAGS_ENDPOINT": "https://m.example/x?y=1"}, "_ENDPOINT"),
            ({"NWCAP_SERVICE_TAGS_API_VERSION": "latest"}, "_API_VERSION"),
            ({"NWCAP_SERVICE_TAGS_REFRESH_INTERVAL": "5s"}, "_REFRESH_INTERVAL"),
            ({"NWCAP_SERVICE_TAGS_REFRESH_CONTAINER": "No_Such"}, "_REFRESH_CONTAINER"),
        ],
    )
    def test_invalid(self, environ: dict[str, str], named: str) -> None:
        with pytest.raises(InvalidSettingError, match=named):
            RefreshSettings.from_environ(environ)


class TestInStatus:
    """nwcap status and /api/status show the refreshed tags' change number and age."""

    def test_status_document_shows_the_tags(
        self,
        management: Management,
        config: ContainerClient,
        refresh: Refresh,
        results_store: TableResultsStore,
    ) -> None:
        settings = settings_for(management, config)
        before = status_document(
            results_store, tags_container=config, tags_refresh=settings, live=True
        )
        assert before["service_tags"] is None
        assert any("service tag" in note for note in before["attention"])
        management.serve(api_document(321))
        assert refresh(settings).status == "updated"
        after = status_document(
            results_store, tags_container=config, tags_refresh=settings, live=True
        )
        assert after["service_tags"]["change_number"] == 321
        assert after["service_tags"]["age_seconds"] >= 0
        assert not any("service tag" in note for note in after["attention"])

    def test_the_command_says_when_the_refresh_is_off(
        self, monkeypatch: pytest.MonkeyPatch, storage_env: Mapping[str, str]
    ) -> None:
        monkeypatch.delenv("NWCAP_SERVICE_TAGS_SUBSCRIPTION", raising=False)
        ran = nwcap("servicetags", "update")
        assert ran.code == 2
        assert "NWCAP_SERVICE_TAGS_SUBSCRIPTION" in ran.err


class TestCommandsReadTheRefreshedCopy:
    """nwcap process reads the service tags where the function does: the refreshed copy."""

    def test_no_copy_yet_then_the_copy(
        self,
        management: Management,
        config: ContainerClient,
        refresh: Refresh,
        monkeypatch: pytest.MonkeyPatch,
        storage_env: Mapping[str, str],
        captures_container: ContainerClient,
        results_store: TableResultsStore,
    ) -> None:
        monkeypatch.setenv("NWCAP_SERVICE_TAGS_SUBSCRIPTION", SUBSCRIPTION)
        monkeypatch.setenv("NWCAP_SERVICE_TAGS_LOCATION", LOCATION)
        monkeypatch.setenv("NWCAP_SERVICE_TAGS_REFRESH_CONTAINER", config.container_name)
        storage_address = "20.60.41.7"  # in Storage.WestEurope of the small tag file
        name = network_watcher_path()
        captures_container.upload_blob(
            name, udp_capture({storage_address: (2, 2), "20.0.0.9": (1, 1)})
        )

        def tags_seen() -> list[str]:
            [capture] = results_store.list_captures().items
            peers = results_store.iter_capture_peers(capture["capture_id"])
            return next(p["service_tags"] for p in peers if p["address"] == storage_address)

        first = nwcap("process")  # before the first refresh: no tags, and no error
        assert first.code == 0, first.err
        assert tags_seen() == []
        management.serve(api_document(321))
        assert refresh(settings_for(management, config)).status == "updated"
        second = nwcap("process", "--force")
        assert second.code == 0, second.err
        assert any(tag.startswith("Storage") for tag in tags_seen())
