"""Schema-driven: schemathesis against the served /openapi.json (OpenAPI 3.1), every operation,
valid and invalid data: no 5xx, and every response matches its declared schema."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hypothesis
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency")
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from benchmarks import overload as load  # noqa: E402

EXAMPLES_PER_OPERATION = 60
OUTCOMES: Counter[str] = Counter()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[load.Server]:
    with load.serve(tmp_path_factory.mktemp("schemathesis"), LOG_LEVEL="WARNING") as server:
        yield server


def check(case: Any, base: str) -> None:
    response = case.call(base_url=base, timeout=60)
    OUTCOMES[f"{response.status_code // 100}xx"] += 1
    assert response.status_code < 500, (case.path, response.status_code, response.text[:500])
    if response.status_code >= 400:
        body = json.loads(response.text)
        assert set(body) == {"error"} and {"code", "message"} <= set(body["error"])
    case.validate_response(
        response,
        checks=[response_schema_conformance, content_type_conformance, status_code_conformance],
    )


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_below_500_and_as_declared(
    served: load.Server, mode: GenerationMode
) -> None:
    # schemathesis' own pytest plugin (`from_fixture`) does not run under pytest 9 (it reads
    # a private `_nodeid`); its strategies driven by hypothesis here do the same work.
    schema = schemathesis.openapi.from_url(f"{served.base}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 6
    before = sum(OUTCOMES.values())
    no_negative: list[str] = []
    for operation in operations:

        @hypothesis.settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(hypothesis.HealthCheck),
        )
        @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            check(case, served.base)

        try:
            run()
        except hypothesis.errors.Unsatisfiable:
            # A GET without parameters has no invalid form (GET /info), nor a DELETE whose only
            # input is a free-form string in its path (DELETE /gallery/subjects/{subject}).
            assert mode is GenerationMode.NEGATIVE and operation.method.upper() in {"GET", "DELETE"}
            no_negative.append(operation.label)
    if mode is GenerationMode.NEGATIVE:
        assert not [op for op in no_negative if op.startswith("POST")]  # every POST had some
    print(
        f"\nschemathesis {mode.value}: {len(operations)} operations, "
        f"{sum(OUTCOMES.values()) - before} requests, outcomes so far {dict(OUTCOMES)}, 5xx = 0, "
        f"no invalid form: {no_negative}"
    )
    assert "unhandled_error" not in Path(served.log).read_text()
