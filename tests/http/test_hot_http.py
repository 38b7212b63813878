"""Hot tenants over real HTTP: an admin pin serves a task from merged weights, with the
same greedy tokens as the reference; non-mergeable adapters and non-admins are refused."""

from __future__ import annotations

import torch
from torch import nn

from tessera.adapters import artifact
from tests.engine.conftest import Reference
from tests.factories import FACTORIES
from tests.http.conftest import Api, admin
from tests.http.test_inference import expect, generate


async def test_admin_pin_serves_merged_rows_with_reference_tokens(
        api: Api, ref_base: nn.Module, reference: Reference) -> None:
    tenant, headers = await api.tenant()
    gen = torch.Generator().manual_seed(31)
    made = {m: FACTORIES[m](ref_base, gen) for m in ("lora", "bottleneck")}
    for method, adapter in made.items():
        r = await api.upload_tessera(headers, f"hot-{method}", *artifact.dumps(adapter))
        assert r.status_code == 201, r.text
        await api.activate(headers, f"hot-{method}", f"hot-{method}")

    path = f"/v1/admin/tenants/{tenant}/tasks/hot-lora/pin"
    assert (await api.client.post(path, headers=headers)).status_code == 403  # not admin
    r = await api.client.post(path, headers=admin())
    assert r.status_code == 200, r.text
    assert r.json()["merged"] is True, r.json()
    r = await api.client.post(f"/v1/admin/tenants/{tenant}/tasks/hot-bottleneck/pin",
                              headers=admin())
    assert r.status_code == 422, r.text  # bottleneck has no merged form

    before = (await api.client.get("/metrics")).text
    body = await generate(api, headers, "hot-lora", "hello world")
    expect(reference, made["lora"], "hello world", body)
    after = (await api.client.get("/metrics")).text
    merged_line = [line for line in after.splitlines()
                   if line.startswith('tessera_step_rows_total{method="lora",mode="merged"}')]
    assert merged_line and float(merged_line[0].split()[-1]) > 0, after
    assert merged_line[0] not in before

    r = await api.client.post(f"/v1/admin/tenants/{tenant}/tasks/hot-lora/unpin",
                              headers=admin())
    assert r.status_code == 200 and r.json()["was_pinned"] is True
    r = await api.client.post(f"/v1/admin/tenants/{tenant}/tasks/nope/pin", headers=admin())
    assert r.status_code == 404
