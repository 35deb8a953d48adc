"""Both OpenAPI documents against their servers, by schemathesis (a tool
nobody here wrote): generated requests, valid and not, with every check it
has (server errors, status codes and content types the document declares,
response schemas, negative data rejected, unsupported methods, ignored
auth...). Drift between a document and its server fails the suite.
In-process through Django's WSGI application, on the test database and the
test Redis; bounded examples per operation."""

import pytest
import schemathesis
from django.contrib.auth.models import User
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import CHECKS

from oma_site.wsgi import application
from replication.models import ApiToken
from replication.roles import grant

EXAMPLES = hypothesis_settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck),
                               derandomize=True)


def all_checks(but: tuple[str, ...] = ()):
    import schemathesis.specs.openapi.checks  # noqa: F401 - registers the OpenAPI checks

    return [check for check in CHECKS.get_all() if check.__name__ not in but]


@pytest.fixture
def keep_test_connection():
    """The WSGI application closes the database connection after each request
    (close_old_connections), which would close the test's own; Django's test
    client detaches it the same way."""
    from django.core.signals import request_finished, request_started
    from django.db import close_old_connections

    request_started.disconnect(close_old_connections)
    request_finished.disconnect(close_old_connections)
    yield
    request_started.connect(close_old_connections)
    request_finished.connect(close_old_connections)


@pytest.fixture
def json_api(db, keep_test_connection, credentials):
    # The document is behind the API's own auth, like the API.
    return schemathesis.openapi.from_wsgi("/api/openapi.json", application,
                                          headers={"Authorization": credentials["Authorization"]})


@pytest.fixture
def agent_api(keep_test_connection):
    return schemathesis.openapi.from_wsgi("/api/v1/openapi.json", application)


@pytest.fixture
def credentials(db, client) -> dict:
    """Both ways the document declares, valid, so that schemathesis's auth
    probes (each removed, each made invalid) are refused every time."""
    user = User.objects.create_user("script", password="not-used-here")
    grant(user, "viewer")
    client.force_login(user)
    return {"Authorization": f"Bearer {ApiToken.issue(user, 'conformance')[1]}",
            "Cookie": f"sessionid={client.cookies['sessionid'].value}"}


def conforms(schema, headers: dict, but: tuple[str, ...] = ()) -> list[str]:
    """Every operation of the document, with valid and with invalid data
    (hypothesis drives schemathesis's strategies here: its pytest plugin does
    not run under this pytest); returns the operations tried."""
    tried = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

            @EXAMPLES
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                case.call_and_validate(headers=headers, checks=all_checks(but))

            try:
                check()
            except Unsatisfiable:
                # Nothing to make invalid (no parameters, no body): only valid requests exist.
                assert mode == schemathesis.GenerationMode.NEGATIVE, operation.label
                continue
            tried.append(f"{mode.value} {operation.label}")
    return tried


def test_the_json_api_conforms_to_its_document(json_api, credentials):
    tried = conforms(json_api, credentials)
    assert len(tried) >= 6, tried  # 4 operations, valid data, and invalid where there is anything to vary


def test_the_agent_api_conforms_to_its_document(agent_api, settings):
    # One rule JSON Schema cannot say, so the document says it in words: an
    # update's bytes_transferred may not exceed its total_bytes. A schema-valid
    # update breaking it is refused (400), which positive_data_acceptance
    # counts against us; every other check runs.
    tried = conforms(agent_api, {"Authorization": f"Bearer {settings.VMA_TOKEN}"},
                     but=("positive_data_acceptance",))
    assert len(tried) >= 10, tried


def test_the_json_api_answers_json_for_every_refusal(client, credentials):
    token = {"HTTP_AUTHORIZATION": credentials["Authorization"]}
    assert client.get("/api/jobs/", **token).json() == {"jobs": []}
    wrong = client.get("/api/jobs/", HTTP_AUTHORIZATION="Bearer not-a-token")
    assert wrong.status_code == 401 and wrong.json() == {"error": "wrong or unknown API token"}
    assert wrong["WWW-Authenticate"] == 'Bearer realm="oma"'
    client.logout()
    assert client.get("/api/jobs/").status_code == 401
    for response, status in [(client.get("/api/jobs/", {"status": ""}, **token), 400),
                             (client.generic("TRACE", "/api/jobs/", **token), 405),
                             (client.get("/api/jobs/nope/", **token), 404),
                             (client.get("/api/failovers/abc/", **token), 404),
                             (client.get("/api/nothing-here/", **token), 404)]:
        assert response.status_code == status and response["Content-Type"] == "application/json", response
        assert response.json()["error"]
