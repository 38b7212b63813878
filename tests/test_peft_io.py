"""peft_io: what it reads from real ``save_pretrained`` output, and every refusal."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import HRAConfig, LoraConfig, get_peft_model
from safetensors.torch import save as st_save

from tessera.adapters import (
    AdapterValidationError,
    PoolConfig,
    SlotPool,
    UnsafeFormatError,
    UnsupportedAdapterError,
)
from tessera.adapters.methods.dora import DoraConfig
from tessera.adapters.methods.hra import HraConfig
from tessera.adapters.methods.lora import LoraConfig as TesseraLoraConfig
from tessera.adapters.peft_io import CONFIG_NAME, WEIGHTS_NAME, load_peft, load_peft_dir
from tests.models import tiny_model

KEY = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("lora")
    get_peft_model(tiny_model("llama", layers=1),
                   LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"])
                   ).save_pretrained(str(directory))
    return directory


def files(directory: Path) -> tuple[dict[str, Any], bytes]:
    config = json.loads((directory / CONFIG_NAME).read_text())
    return config, (directory / WEIGHTS_NAME).read_bytes()


def lora_weights(**extra: torch.Tensor) -> bytes:
    tensors = {f"{KEY}.lora_A.weight": torch.zeros(2, 32),
               f"{KEY}.lora_B.weight": torch.zeros(32, 2), **extra}
    return st_save(tensors)


# --- what is read ------------------------------------------------------------------------
def test_reads_peft_lora_folder(lora_dir: Path) -> None:
    adapter = load_peft_dir(lora_dir)
    (component,) = adapter.components
    assert component.method == "lora"
    assert isinstance(component.config, TesseraLoraConfig)
    assert component.config.r == 2 and component.config.lora_alpha == 4.0
    assert set(component.modules) == {"model.layers.0.self_attn.q_proj"}
    tensors = component.modules["model.layers.0.self_attn.q_proj"]
    assert tensors["lora_A"].shape == (2, 32) and tensors["lora_B"].shape == (32, 2)


def test_reads_dora_and_hra_from_peft(tmp_path: Path) -> None:
    get_peft_model(tiny_model("gpt2", layers=1),
                   LoraConfig(r=2, target_modules=["c_attn"], use_dora=True,
                              fan_in_fan_out=True)).save_pretrained(str(tmp_path / "d"))
    dora = load_peft_dir(tmp_path / "d").components[0]
    assert dora.method == "dora" and isinstance(dora.config, DoraConfig)
    assert dora.modules["transformer.h.0.attn.c_attn"]["lora_magnitude_vector"].shape == (96,)
    get_peft_model(tiny_model("llama", layers=1),
                   HRAConfig(r=3, apply_GS=True, target_modules=["q_proj"])
                   ).save_pretrained(str(tmp_path / "h"))
    hra = load_peft_dir(tmp_path / "h").components[0]
    assert hra.method == "hra" and isinstance(hra.config, HraConfig) and hra.config.apply_GS
    assert hra.modules["model.layers.0.self_attn.q_proj"]["hra_u"].shape == (32, 3)


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica"])
def test_inits_that_keep_w0_are_accepted(lora_dir: Path, init: object) -> None:
    config, weights = files(lora_dir)
    load_peft({**config, "init_lora_weights": init}, weights)


def test_accepts_bytes_and_str_config(lora_dir: Path) -> None:
    raw = (lora_dir / CONFIG_NAME).read_bytes()
    weights = (lora_dir / WEIGHTS_NAME).read_bytes()
    from_bytes, from_str = load_peft(raw, weights), load_peft(raw.decode(), weights)
    assert from_bytes.components[0].config == from_str.components[0].config
    assert from_bytes.methods == from_str.methods == ("lora",)


# --- unsafe formats ------------------------------------------------------------------------
def test_pickle_bin_folder_is_refused(tmp_path: Path) -> None:
    get_peft_model(tiny_model("llama", layers=1), LoraConfig(r=2, target_modules=["q_proj"])
                   ).save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file()
    assert not (tmp_path / WEIGHTS_NAME).exists()
    with pytest.raises(UnsafeFormatError, match=r"adapter_model\.bin"):
        load_peft_dir(tmp_path)
    config = (tmp_path / CONFIG_NAME).read_bytes()
    with pytest.raises(UnsafeFormatError):  # the same bytes uploaded as "weights"
        load_peft(config, (tmp_path / "adapter_model.bin").read_bytes())


def test_pickle_protocol_bytes_are_refused(lora_dir: Path) -> None:
    config, _ = files(lora_dir)
    with pytest.raises(UnsafeFormatError):
        load_peft(config, b"\x80\x04\x95" + b"\x00" * 64)


# --- malformed safetensors -----------------------------------------------------------------
def test_truncated_safetensors(lora_dir: Path) -> None:
    config, weights = files(lora_dir)
    with pytest.raises(AdapterValidationError, match="outside the"):
        load_peft(config, weights[:-5])


def test_garbage_header(lora_dir: Path) -> None:
    config, _ = files(lora_dir)
    header = b"{not json"
    with pytest.raises(AdapterValidationError, match="malformed safetensors"):
        load_peft(config, struct.pack("<Q", len(header)) + header)


def test_dtype_size_mismatch(lora_dir: Path) -> None:
    config, _ = files(lora_dir)
    header = json.dumps({f"{KEY}.lora_A.weight": {"dtype": "F32", "shape": [2, 32],
                                                   "data_offsets": [0, 8]}}).encode()
    with pytest.raises(AdapterValidationError) as info:
        load_peft(config, struct.pack("<Q", len(header)) + header + b"\x00" * 8)
    assert info.value.tensor == f"{KEY}.lora_A.weight"


def test_empty_weights(lora_dir: Path) -> None:
    config, _ = files(lora_dir)
    with pytest.raises(AdapterValidationError, match="no tensors"):
        load_peft(config, st_save({}))


# --- keys ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    f"{KEY}.lora_C.weight",
    f"{KEY}.lora_A.default.weight",  # adapter name not stripped
    "model.layers.0.self_attn.q_proj.lora_A.weight",  # missing base_model.model. prefix
    f"{KEY}.lora_magnitude_vector",  # DoRA key in a plain LoRA adapter
    "base_model.model.lm_head.weight",
    "base_model.model..lora_A.weight",
])
def test_unknown_key_is_named(lora_dir: Path, bad: str) -> None:
    config, _ = files(lora_dir)
    weights = st_save({f"{KEY}.lora_A.weight": torch.zeros(2, 32),
                       f"{KEY}.lora_B.weight": torch.zeros(32, 2), bad: torch.zeros(32)})
    with pytest.raises(AdapterValidationError) as info:
        load_peft(config, weights)
    assert info.value.tensor == bad


def test_dora_magnitude_with_weight_suffix_is_named(lora_dir: Path) -> None:
    """PEFT writes ``...lora_magnitude_vector`` (no ``.weight``) and would not load this."""
    config, _ = files(lora_dir)
    bad = f"{KEY}.lora_magnitude_vector.weight"
    with pytest.raises(AdapterValidationError) as info:
        load_peft({**config, "use_dora": True}, lora_weights(**{bad: torch.ones(32)}))
    assert info.value.tensor == bad


def test_hra_key_in_lora_adapter_is_named(lora_dir: Path) -> None:
    config, _ = files(lora_dir)
    with pytest.raises(AdapterValidationError) as info:
        load_peft(config, lora_weights(**{f"{KEY}.hra_u": torch.zeros(32, 2)}))
    assert info.value.tensor == f"{KEY}.hra_u"


def test_wrong_shape_is_named_by_the_pool(lora_dir: Path) -> None:
    config, _ = files(lora_dir)
    adapter = load_peft(config, st_save({f"{KEY}.lora_A.weight": torch.zeros(2, 31),
                                         f"{KEY}.lora_B.weight": torch.zeros(32, 2)}))
    pool = SlotPool(tiny_model("llama", layers=1), PoolConfig(num_slots=1))
    with pytest.raises(AdapterValidationError) as info:
        pool.load(0, adapter)
    assert info.value.tensor == "model.layers.0.self_attn.q_proj.lora_A"


# --- refusals: cannot run on a shared frozen base --------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "lora_ga",
                                  "loftq"])
def test_base_changing_inits_are_refused(lora_dir: Path, init: str) -> None:
    config, weights = files(lora_dir)
    with pytest.raises(UnsupportedAdapterError, match="changes the base weights"):
        load_peft({**config, "init_lora_weights": init}, weights)


def test_real_unconverted_pissa_is_refused(tmp_path: Path) -> None:
    get_peft_model(tiny_model("llama", layers=1),
                   LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa")
                   ).save_pretrained(str(tmp_path))
    with pytest.raises(UnsupportedAdapterError, match="pissa"):
        load_peft_dir(tmp_path)


@pytest.mark.parametrize(("field", "value"), [
    ("modules_to_save", ["lm_head"]),
    ("bias", "all"),
    ("bias", "lora_only"),
    ("layers_to_transform", [0]),
    ("layers_pattern", "layers"),
    ("exclude_modules", ["v_proj"]),
    ("lora_bias", True),
    ("layer_replication", [[0, 1]]),
    ("trainable_token_indices", [1, 2]),
    ("alora_invocation_tokens", [5]),
])
def test_unsupported_lora_options(lora_dir: Path, field: str, value: object) -> None:
    config, weights = files(lora_dir)
    with pytest.raises(UnsupportedAdapterError, match=field):
        load_peft({**config, field: value}, weights)


@pytest.mark.parametrize(("field", "value"), [
    ("modules_to_save", ["lm_head"]), ("bias", "hra_only"), ("layers_to_transform", 0)])
def test_unsupported_hra_options(field: str, value: object) -> None:
    config = {"peft_type": "HRA", "r": 2, "target_modules": ["q_proj"], field: value}
    with pytest.raises(UnsupportedAdapterError, match=field):
        load_peft(config, st_save({f"{KEY}.hra_u": torch.ones(32, 2)}))


@pytest.mark.parametrize("peft_type", ["LOHA", "IA3", "PROMPT_TUNING", "lora"])
def test_unknown_peft_type(lora_dir: Path, peft_type: str) -> None:
    config, weights = files(lora_dir)
    with pytest.raises(UnsupportedAdapterError, match=peft_type):
        load_peft({**config, "peft_type": peft_type}, weights)


# --- malformed config --------------------------------------------------------------------
@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"\xff\xfe", b""])
def test_malformed_config_json(lora_dir: Path, raw: bytes) -> None:
    _, weights = files(lora_dir)
    with pytest.raises(AdapterValidationError) as info:
        load_peft(raw, weights)
    assert info.value.tensor == CONFIG_NAME


@pytest.mark.parametrize(("field", "value"), [
    ("r", "eight"), ("r", 0), ("r", 2.5), ("lora_alpha", "x"), ("lora_alpha", -1),
    ("target_modules", None), ("target_modules", 3), ("use_rslora", "yes"),
    ("use_dora", "yes"), ("fan_in_fan_out", 1), ("rank_pattern", {"q_proj": "2"}),
    ("alpha_pattern", ["q_proj"]), ("peft_type", None), ("init_lora_weights", 3),
])
def test_bad_config_field_is_named(lora_dir: Path, field: str, value: object) -> None:
    config, weights = files(lora_dir)
    with pytest.raises(AdapterValidationError) as info:
        load_peft({**config, field: value}, weights)
    assert info.value.tensor is not None
    assert info.value.tensor.split(".")[1] == field, info.value.tensor


@pytest.mark.parametrize(("text", "field"), [
    ('"lora_alpha": Infinity', "config.lora_alpha"),
    ('"lora_alpha": -Infinity', "config.lora_alpha"),
    ('"lora_alpha": NaN', "config.lora_alpha"),
    ('"lora_alpha": 1e38', "config.lora_alpha"),
    ('"lora_alpha": 1e400', "config.lora_alpha"),  # json reads it as inf
    ('"r": 100000000000000000000000000000000000000', "config.r"),
    ('"alpha_pattern": {"q_proj": Infinity}', "config.alpha_pattern.q_proj"),
    ('"alpha_pattern": {"q_proj": 1e38}', "config.alpha_pattern.q_proj"),
    ('"rank_pattern": {"q_proj": 1000000000}', "config.rank_pattern.q_proj"),
    ('"lora_dropout": NaN', "config.lora_dropout"),
    ('"lora_dropout": 1.5', "config.lora_dropout"),
])
def test_non_finite_or_absurd_scalar_text_is_named(lora_dir: Path, text: str,
                                                   field: str) -> None:
    """``adapter_config.json`` text as uploaded: Python's json accepts Infinity and NaN."""
    config, weights = files(lora_dir)
    name = text.split(":")[0].strip('"')
    config.pop(name, None)
    raw = json.dumps(config)[:-1] + ", " + text + "}"
    with pytest.raises(AdapterValidationError) as info:
        load_peft(raw.encode(), weights)
    assert info.value.tensor == field, info.value


def test_missing_config_file(tmp_path: Path, lora_dir: Path) -> None:
    (tmp_path / WEIGHTS_NAME).write_bytes((lora_dir / WEIGHTS_NAME).read_bytes())
    with pytest.raises(AdapterValidationError, match=CONFIG_NAME):
        load_peft_dir(tmp_path)


# --- HRA artifacts that have no well-defined reflection --------------------------------------
def test_untrained_paired_hra_with_gram_schmidt_is_refused(tmp_path: Path) -> None:
    """PEFT's init repeats each column twice; with apply_GS the second copy's residual is
    rounding noise, which PEFT normalises into an arbitrary direction. tessera refuses it."""
    get_peft_model(tiny_model("llama", layers=1),
                   HRAConfig(r=4, apply_GS=True, target_modules=["q_proj"])
                   ).save_pretrained(str(tmp_path))
    pool = SlotPool(tiny_model("llama", layers=1), PoolConfig(num_slots=1))
    with pytest.raises(AdapterValidationError, match="linearly dependent") as info:
        pool.load(0, load_peft_dir(tmp_path))
    assert info.value.tensor == "model.layers.0.self_attn.q_proj.hra_u"


def test_hra_zero_column_is_refused() -> None:
    u = torch.randn(32, 3)
    u[:, 1] = 0
    adapter = load_peft({"peft_type": "HRA", "r": 3, "target_modules": ["q_proj"]},
                        st_save({f"{KEY}.hra_u": u}))
    pool = SlotPool(tiny_model("llama", layers=1), PoolConfig(num_slots=1))
    with pytest.raises(AdapterValidationError, match="all-zero column") as info:
        pool.load(0, adapter)
    assert info.value.tensor == "model.layers.0.self_attn.q_proj.hra_u"
