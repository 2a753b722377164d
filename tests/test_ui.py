"""Stage task tags: only the device and model tags that a concurrency limit exists for."""

from __future__ import annotations

import pytest
from prefect import flow, get_client

from stagediff.flows.ui import device_tag, model_tag, stage_tags


@flow
def tags_in_a_flow_run(model: str) -> list[str]:
    return sorted(stage_tags(model))


def test_stage_tasks_carry_only_the_tags_a_concurrency_limit_exists_for(
    prefect_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAGEDIFF_DEVICE", "test-ui-gpu7")
    assert tags_in_a_flow_run("some/model") == []  # no limit: no slot to take before each stage

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag=device_tag(), concurrency_limit=1)
        try:
            assert tags_in_a_flow_run("some/model") == [device_tag()]
            client.create_concurrency_limit(tag=model_tag("some-model"), concurrency_limit=2)
            assert tags_in_a_flow_run("some-model") == sorted([device_tag(), "model:some-model"])
        finally:
            client.delete_concurrency_limit_by_tag(device_tag())
            client.delete_concurrency_limit_by_tag(model_tag("some-model"))
