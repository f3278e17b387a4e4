"""render_hook and parse_body on real-shaped payloads: a GitHub ``issues`` event and a Stripe ``invoice.paid``."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from difyq.producers.hooks.mapping import (
    BodyError,
    MappedJob,
    MappingError,
    MissingFieldError,
    collect_fields,
    parse_body,
    render_hook,
)
from difyq.worker.config import HookConfig, parse_config

FIXTURES = Path(__file__).parent / "fixtures" / "webhooks"
GITHUB_ISSUE_OPENED = json.loads((FIXTURES / "github-issues-opened.json").read_bytes())
STRIPE_INVOICE_PAID = json.loads((FIXTURES / "stripe-invoice-paid.json").read_bytes())
GITHUB_HEADERS = {
    "x-github-event": "issues",
    "x-github-delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
    "content-type": "application/json",
}


def hook(**settings_: Any) -> HookConfig:
    """A hook validated the way difyq.yaml is (so every template here also compiles at config load)."""
    definition = {"app": "support", "verify": {"scheme": "none"}, **settings_}
    config = parse_config({"apps": {"support": {"api_key": "app-x", "mode": "chat"}}, "hooks": {"h": definition}})
    return config.hooks["h"]


GITHUB_HOOK = hook(
    when="{{ headers['x-github-event'] == 'issues' and body.action == 'opened' }}",
    idempotency_key="{{ headers['x-github-delivery'] }}",
    query="Summarize: {{ body.issue.title }}\n{{ body.issue.body }}",
    inputs={"repo": "{{ body.repository.full_name }}", "number": "{{ body.issue.number }}",
            "labels": "{{ body.issue.labels | map(attribute='name') | list }}"},
    user="{{ body.sender.login }}",
    callback_url="https://example.com/summaries",
    metadata={"issue_url": "{{ body.issue.html_url }}", "source": "github"},
)

STRIPE_HOOK = hook(
    when="{{ body.type == 'invoice.paid' }}",
    query=(
        "Write a thank-you note to {{ body.data.object.customer_name }} for invoice {{ body.data.object.number }}: "
        "{{ '%.2f' | format(body.data.object.amount_paid / 100) }} {{ body.data.object.currency | upper }}."
    ),
    inputs={
        "customer": "{{ body.data.object.customer }}",
        "amount_paid": "{{ body.data.object.amount_paid }}",
        "paid": "{{ body.data.object.paid }}",
        "lines": "{{ body.data.object.lines.data | map(attribute='description') | list }}",
        "plan": "{{ body.data.object.lines.data[0].price.nickname }}",
    },
    user="{{ body.data.object.customer_email }}",
    conversation_id="{{ body.data.object.metadata.conversation_id | default('') }}",
    metadata={"stripe_event": "{{ body.id }}", "crm_account": "{{ body.data.object.metadata.crm_account }}"},
)


class TestGitHubIssues:
    def test_an_opened_issue_maps_to_the_expected_job(self):
        job = render_hook(GITHUB_HOOK, GITHUB_ISSUE_OPENED, GITHUB_HEADERS, {})
        assert job == MappedJob(
            app="support",
            query=(
                "Summarize: Login page returns 500 after upgrading to 2.4.0\n"
                "After upgrading to 2.4.0 the login page answers 500.\r\n\r\n"
                "Steps: open /login, submit valid credentials.\r\nExpected: dashboard. Actual: Internal Server Error."
            ),
            inputs={"repo": "octo-org/hello-world", "number": 1347, "labels": ["bug"]},
            user="monalisa",
            conversation_id=None,
            callback_url="https://example.com/summaries",
            metadata={"issue_url": "https://github.com/octo-org/hello-world/issues/1347", "source": "github"},
            idempotency_key="72d3162e-cc78-11e3-81ab-4c9367dc0958",
        )

    def test_a_closed_issue_is_skipped(self):
        payload = {**GITHUB_ISSUE_OPENED, "action": "closed"}
        assert render_hook(GITHUB_HOOK, payload, GITHUB_HEADERS, {}) is None

    def test_another_event_is_skipped(self):
        assert render_hook(GITHUB_HOOK, GITHUB_ISSUE_OPENED, {**GITHUB_HEADERS, "x-github-event": "push"}, {}) is None

    def test_when_naming_a_field_the_payload_lacks_is_skipped(self):
        ping = {"zen": "Design for failure.", "hook_id": 292430182, "hook": {"type": "Repository"}}
        assert render_hook(GITHUB_HOOK, ping, GITHUB_HEADERS, {}) is None

    def test_when_naming_a_header_the_request_lacks_is_skipped(self):
        assert render_hook(GITHUB_HOOK, GITHUB_ISSUE_OPENED, {"content-type": "application/json"}, {}) is None

    def test_a_missing_field_names_the_template_and_the_field(self):
        payload = {key: value for key, value in GITHUB_ISSUE_OPENED.items() if key != "repository"}
        with pytest.raises(MissingFieldError) as caught:
            render_hook(GITHUB_HOOK, payload, GITHUB_HEADERS, {})
        assert caught.value.field == "inputs.repo"
        assert "repository" in caught.value.message

    def test_a_null_issue_body_renders_empty_not_none(self):
        payload = copy.deepcopy(GITHUB_ISSUE_OPENED)
        payload["issue"]["body"] = None
        job = render_hook(GITHUB_HOOK, payload, GITHUB_HEADERS, {})
        assert job is not None and job.query == "Summarize: Login page returns 500 after upgrading to 2.4.0\n"


class TestStripeInvoicePaid:
    def test_an_invoice_paid_event_maps_to_the_expected_job(self):
        job = render_hook(STRIPE_HOOK, STRIPE_INVOICE_PAID, {"content-type": "application/json"}, {})
        assert job == MappedJob(
            app="support",
            query="Write a thank-you note to Jenny Rosen for invoice 8C3D1F2A-0007: 49.00 EUR.",
            inputs={
                "customer": "cus_QVQ9wn1b0Yx4Gm",
                "amount_paid": 4900,
                "paid": True,
                "lines": ["1 \u00d7 Pro plan (at \u20ac49.00 / month)"],
                "plan": "Pro",
            },
            user="jenny.rosen@example.com",
            conversation_id=None,
            metadata={"stripe_event": "evt_1PeQ2vLkdIwHu7ixQ5Zr6Hx3", "crm_account": "ACME-0042"},
            idempotency_key=None,
        )

    def test_another_event_type_is_skipped(self):
        assert render_hook(STRIPE_HOOK, {**STRIPE_INVOICE_PAID, "type": "invoice.created"}, {}, {}) is None

    def test_a_missing_nested_field_is_a_mapping_error_naming_it(self):
        payload = copy.deepcopy(STRIPE_INVOICE_PAID)
        del payload["data"]["object"]["metadata"]["crm_account"]
        with pytest.raises(MappingError) as caught:
            render_hook(STRIPE_HOOK, payload, {}, {})
        assert caught.value.field == "metadata.crm_account"
        assert "crm_account" in caught.value.message

    def test_a_type_error_is_a_mapping_error_not_a_crash(self):
        payload = copy.deepcopy(STRIPE_INVOICE_PAID)
        payload["data"]["object"]["amount_paid"] = "forty-nine"
        with pytest.raises(MappingError) as caught:
            render_hook(STRIPE_HOOK, payload, {}, {})
        assert caught.value.field == "query" and not isinstance(caught.value, MissingFieldError)


class TestValueTypes:
    def test_single_expressions_keep_native_json_types_in_inputs_and_metadata(self):
        mapping = hook(
            inputs={"n": "{{ body.n }}", "f": "{{- body.f -}}", "flag": " {{ body.flag }} ",
                    "items": "{{ body['items'] }}", "obj": "{{ body.obj }}", "null": "{{ body.nothing }}",
                    "text": "{{ body.text }}",
                    "mixed": "n={{ body.n }}", "tuple": "{{ (1, 2) }}", "literal": 7, "nested": {"k": "{{ raw }}"}},
            metadata={"n": "{{ body.n * 2 }}"},
        )
        body = {"n": 3, "f": 0.5, "flag": False, "items": [1, "a"], "obj": {"k": [None]}, "nothing": None,
                "text": "hi"}
        job = render_hook(mapping, body, {}, {})
        assert job is not None
        assert job.inputs == {"n": 3, "f": 0.5, "flag": False, "items": [1, "a"], "obj": {"k": [None]},
                              "null": None, "text": "hi", "mixed": "n=3", "tuple": "(1, 2)", "literal": 7,
                              "nested": {"k": "{{ raw }}"}}
        assert job.metadata == {"n": 6}

    def test_text_fields_are_strings_and_empty_means_unset(self):
        mapping = hook(query="{{ body.n }}", user="{{ body.user }}", conversation_id="{{ body.conversation }}",
                       callback_url="{{ body.callback or '' }}", idempotency_key="{{ body.key }}")
        job = render_hook(mapping, {"n": 5, "user": None, "conversation": "", "callback": None, "key": 12}, {}, {})
        assert job == MappedJob(app="support", query="5", idempotency_key="12")

    @pytest.mark.parametrize(("when", "expected"), [
        ("{{ body.n > 1 }}", True), ("{{ body.n > 5 }}", False), ("{{ body['items'] }}", True),
        ("{{ body.empty }}", False), ("{% if body.n %}yes{% endif %}", True),
        ("{% if body.zero %}yes{% endif %}", False),
        ("{{ 'false' }}", False), ("{{ 'FALSE ' }}", False), ("{{ 'off' }}", False), ("{{ 'ok' }}", True),
        ("{{ body.maybe is defined and body.maybe }}", False), ("{{ body.n }}", True), ("{{ body.zero }}", False),
    ])
    def test_when_truthiness(self, when, expected):
        body = {"n": 3, "zero": 0, "items": [1], "empty": []}
        assert (render_hook(hook(when=when, query="q"), body, {}, {}) is not None) is expected

    def test_a_type_error_in_when_is_a_mapping_error(self):
        with pytest.raises(MappingError) as caught:
            render_hook(hook(when="{{ body.n + 'x' }}"), {"n": 1}, {}, {})
        assert caught.value.field == "when"

    def test_headers_and_query_are_in_the_context(self):
        mapping = hook(query="{{ headers['x-source'] }}/{{ query.team }}/{{ query.tag | join(',') }}")
        query = collect_fields([("team", "ops"), ("tag", "a"), ("tag", "b")])
        job = render_hook(mapping, {}, {"x-source": "crm"}, query)
        assert job is not None and job.query == "crm/ops/a,b"


class TestSandbox:
    @pytest.mark.parametrize("template", [
        "{{ body.__class__.__mro__ }}",
        "{{ body.update({'x': 1}) }}",
        "{{ ''.__class__.__subclasses__() }}",
        "{{ cycler.__init__.__globals__ }}",
    ])
    def test_escapes_are_refused_as_mapping_errors(self, template):
        with pytest.raises(MappingError) as caught:
            render_hook(hook(query=template), {"x": 0}, {}, {})
        assert caught.value.field == "query"

    def test_a_template_that_does_not_compile_is_a_mapping_error(self):
        mapping = HookConfig(app="support", verify={"scheme": "none"}, query="{{ body.x ")
        with pytest.raises(MappingError, match="template syntax error") as caught:
            render_hook(mapping, {"x": 1}, {}, {})
        assert caught.value.field == "query"


class TestParseBody:
    @pytest.mark.parametrize("content_type", [
        "application/json", "application/json; charset=utf-8", "Application/JSON", "application/cloudevents+json",
    ])
    def test_json(self, content_type):
        assert parse_body(content_type, b'{"a": [1, 2]}') == {"a": [1, 2]}

    def test_form_fields(self):
        body = b"token=gIkuvaNzQIHg97ATvDxqgjtO&command=%2Fweather&text=94070&text=&empty="
        assert parse_body("application/x-www-form-urlencoded; charset=utf-8", body) == {
            "token": "gIkuvaNzQIHg97ATvDxqgjtO", "command": "/weather", "text": ["94070", ""], "empty": "",
        }

    def test_github_form_deliveries_keep_the_payload_field(self):
        body = b"payload=" + json.dumps({"action": "opened"}).encode().replace(b'"', b"%22").replace(b" ", b"+")
        assert parse_body("application/x-www-form-urlencoded", body) == {"payload": '{"action": "opened"}'}

    @pytest.mark.parametrize("content_type", [None, "", "text/plain", "multipart/form-data; boundary=x", "json"])
    def test_other_content_types_are_415(self, content_type):
        with pytest.raises(BodyError) as caught:
            parse_body(content_type, b"{}")
        assert caught.value.status == 415 and caught.value.code == "unsupported_media_type"

    @pytest.mark.parametrize(("content_type", "body"), [
        ("application/json", b""), ("application/json", b"{"), ("application/json", b"\xff\xfe\x00"),
        ("application/json", b"[" * 200_000), ("application/json", b"1" * 5000),
        ("application/x-www-form-urlencoded", b"a=\xff"), ("application/x-www-form-urlencoded", b"a=%ff"),
    ])
    def test_malformed_bodies_are_422(self, content_type, body):
        with pytest.raises(BodyError) as caught:
            parse_body(content_type, body)
        assert caught.value.status == 422 and caught.value.code == "invalid_body"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["action", "issue", "title", "body", "repository", "full_name", "sender", "login", "number"])
        | st.text(max_size=8),
        children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(body=JSON_VALUES, event=st.sampled_from(["issues", "push", ""]))
def test_any_json_payload_maps_skips_or_fails_cleanly(body, event):
    try:
        job = render_hook(GITHUB_HOOK, body, {"x-github-event": event}, {})
    except MappingError as exc:
        assert exc.field in {"query", "inputs.repo", "inputs.number", "inputs.labels", "user", "metadata.issue_url",
                             "idempotency_key", "when"}
    else:
        assert job is None or isinstance(job, MappedJob)


@settings(max_examples=300, deadline=None)
@given(content_type=st.sampled_from(["application/json", "application/x-www-form-urlencoded", "text/plain"]),
       body=st.binary(max_size=200))
def test_any_bytes_parse_or_fail_with_a_body_error(content_type, body):
    try:
        parse_body(content_type, body)
    except BodyError as exc:
        assert exc.status in (415, 422)


def test_a_hooks_tenant_is_a_template_of_the_delivery() -> None:
    """``tenant: "{{ body.customer_id }}"`` names each delivery's tenant; an empty result leaves the default."""
    tenanted = hook(query="{{ body.text }}", tenant="{{ body.customer_id }}")
    assert render_hook(tenanted, {"text": "q", "customer_id": "cus_42"}, {}, {}).tenant == "cus_42"
    assert render_hook(tenanted, {"text": "q", "customer_id": ""}, {}, {}).tenant is None
