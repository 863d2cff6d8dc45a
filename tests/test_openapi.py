"""monitor/openapi.json: a valid OpenAPI 3.1 document that describes exactly the routes the app
serves, served at /openapi.json and shipped in the wheel. (tests/test_schemathesis.py checks
a live monitor's answers against it.)"""

from __future__ import annotations

import json
import re

import pytest
import webtest
from openapi_spec_validator import OpenAPIV31SpecValidator

from monitor import loop
from monitor import web
from tests.fakes import FakeGitHub
from tests.fakes import FakeHypervisor
from tests.support.clock import Clock

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Pages meant for a browser: their errors are HTML whatever the client asks.
BROWSER_PATHS = ("/", "/dashboard.html")


def shipped() -> dict:
    return json.loads(web.OPENAPI.read_text(encoding="utf-8"))


def operations(document: dict):
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


@pytest.fixture
def make_app(make_config, store):
    monitors = []

    def make(**kwargs):
        config = make_config(**kwargs)
        monitor = loop.Monitor(config, FakeGitHub(), FakeHypervisor(), clock=Clock())
        monitors.append(monitor)
        return config, web.make_app(config, monitor)

    yield make
    for monitor in monitors:
        monitor.workers.shutdown()


def test_document_is_valid_openapi_3_1():
    document = shipped()
    assert document["openapi"].startswith("3.1.")
    errors = [str(error) for error in OpenAPIV31SpecValidator(document).iter_errors()]
    assert errors == []


def _template(rule: str) -> str:
    """A Bottle rule as an OpenAPI path template: `<name>` and `<name:filter>` → `{name}`."""
    return re.sub(r"<([^:>]+)(?::[^>]*)?>", r"{\1}", rule)


def test_every_route_is_documented_and_every_documented_operation_is_served(make_app):
    config, app = make_app()
    served = {(route.method.lower(), _template(route.rule)) for route in app.routes}
    documented = {(method, path) for path, method, _ in operations(shipped())}
    assert sorted(served - documented) == [], "routes missing from monitor/openapi.json"
    assert sorted(documented - served) == [], "documented but not served"


def test_path_parameters_match_the_templates():
    document = shipped()
    parameters = document["components"]["parameters"]
    for path, method, operation in operations(document):
        declared = set()
        for parameter in operation.get("parameters", []):
            if "$ref" in parameter:
                parameter = parameters[parameter["$ref"].rsplit("/", 1)[1]]
            if parameter["in"] == "path":
                assert parameter["required"] is True
                declared.add(parameter["name"])
        assert declared == set(re.findall(r"{([^}]+)}", path)), (method, path)


def test_errors_are_described_as_upstream_answers_them():
    """JSON `{"error": …}` (HTML too where a browser may ask: GETs), Retry-After on every
    503, 401 and 403 on every token route, X-RateLimit-* and Retry-After on a 429."""
    document = shipped()
    for path, method, operation in operations(document):
        where = f"{method.upper()} {path}"
        for status, response in operation["responses"].items():
            if int(status) < 400:
                continue
            content = response["content"]
            if path in BROWSER_PATHS:
                assert set(content) == {"text/html"}, where
            else:
                assert content["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Error"
                }, where
                expected = (
                    {"application/json", "text/html"} if method == "get" else {"application/json"}
                )
                assert set(content) == expected, (where, status)
            if status in ("503", "429"):
                assert "Retry-After" in response["headers"], (where, status)
        if {"apiToken": []} in operation.get("security", []):
            assert {"401", "403"} <= set(operation["responses"]), where
    limited = document["paths"]["/select-runner"]["post"]["responses"]["429"]["headers"]
    assert {"X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset"} <= set(limited)


def test_served_document_is_the_shipped_one_with_this_monitors_take_max_count(make_app):
    config, app = make_app(extra="take_max_count = 5\n")
    assert config.take_max_count == 5
    response = webtest.TestApp(app).get("/openapi.json")
    assert response.status_int == 200
    assert response.content_type == "application/json"
    served = response.json
    count = served["components"]["parameters"]["Count"]["schema"]
    assert (count["minimum"], count["maximum"]) == (1, 5)
    count["maximum"] = shipped()["components"]["parameters"]["Count"]["schema"]["maximum"]
    assert served == shipped()


def test_shipped_document_says_the_default_take_max_count(make_app):
    config, _ = make_app()
    count = shipped()["components"]["parameters"]["Count"]["schema"]
    assert count["maximum"] == config.take_max_count
