"""DESIGN section 6 over real HTTP and real Redis: a non-finite or absurd config scalar
(``"lora_alpha": Infinity``, ``1e38``) is a 422 naming the field, and a finite upload whose
lowered slot tensors overflow is a 422 naming the tensor; nothing is stored."""

from __future__ import annotations

from typing import Any

import httpx
import torch
from torch import nn

from tessera.adapters import targets as tg
from tessera.adapters.safeio import write_safetensors
from tests.http.conftest import Api


def peft_lora(base: nn.Module, b: float) -> tuple[str, list[str], bytes]:
    """(target name, its module paths, adapter_model.safetensors) of a rank-4 PEFT LoRA on
    the base's query projection, with every ``lora_B`` entry equal to ``b``."""
    available = tg.discover(base)
    name = next(t.name for t in available.values() if t.name in ("q_proj", "c_attn"))
    paths = tg.resolve([name], available)
    tensors = {}
    for path in paths:
        t = available[path]
        key = f"base_model.model.{path}"
        tensors[f"{key}.lora_A.weight"] = torch.full((4, t.in_features), 0.01)  # [r, in]
        tensors[f"{key}.lora_B.weight"] = torch.full((t.out_features, 4), b)  # [out, r]
    return name, paths, write_safetensors(tensors)


def config_text(target: str, alpha: str, **extra: Any) -> bytes:
    """adapter_config.json as text: ``alpha`` is spliced in verbatim (``Infinity``...)."""
    fields = ['"peft_type": "LORA"', '"r": 4', f'"lora_alpha": {alpha}',
              f'"target_modules": ["{target}"]', '"bias": "none"',
              *(f'"{k}": {v}' for k, v in extra.items())]
    return ("{" + ", ".join(fields) + "}").encode()


async def upload(api: Api, headers: dict[str, str], config: bytes, weights: bytes,
                 name: str = "scalars") -> httpx.Response:
    return await api.client.post(
        f"/v1/adapters/{name}", headers=headers,
        files={"config": ("adapter_config.json", config, "application/json"),
               "weights": ("adapter_model.safetensors", weights, "application/octet-stream")})


def refused(r: httpx.Response, *fields: str) -> str:
    """A 422 whose ``error.field`` is one of ``fields``, also named in the message."""
    assert r.status_code == 422, (r.status_code, r.text)
    err: dict[str, Any] = r.json()["error"]
    assert err["field"] in fields, err
    assert err["field"] in err["message"], err
    message: str = err["message"]
    return message


async def test_non_finite_and_absurd_scalars_are_422(api: Api, ref_base: nn.Module) -> None:
    _, headers = await api.tenant()
    target, paths, weights = peft_lora(ref_base, 0.1)
    for alpha in ("Infinity", "-Infinity", "NaN", "1e38"):
        message = refused(await upload(api, headers, config_text(target, alpha), weights),
                          "config.lora_alpha")
        assert ("finite" in message) or ("less than or equal" in message), message
    r = await upload(api, headers, config_text(target, "8", alpha_pattern=f'{{"{target}": '
                                                                    "Infinity}"), weights)
    refused(r, f"config.alpha_pattern.{target}")
    r = await upload(api, headers, config_text(target, "8", lora_dropout="NaN"), weights)
    refused(r, "config.lora_dropout")

    # finite B and an allowed alpha (s = 64 / 4), but s B overflows float32 when lowered
    _, _, huge = peft_lora(ref_base, 1e38)
    message = refused(await upload(api, headers, config_text(target, "64"), huge),
                      *(f"{path}.lowrank.B" for path in paths))
    assert "not finite once lowered" in message

    # nothing was stored; the same upload with sane values is accepted
    assert (await api.client.get("/v1/adapters", headers=headers)).json() == {"adapters": []}
    r = await upload(api, headers, config_text(target, "64"), weights)
    assert r.status_code == 201, r.text
