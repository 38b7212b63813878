"""The built-in model: byte-level tokenizer round-trips any UTF-8, deterministic weights,
loads offline through the ordinary local-model path, chat template is safe; the trained
variant is the shipped file its manifest describes, writes English and holds its held-out
bits per byte; its corpus is pinned and its pretraining is deterministic."""

from __future__ import annotations

import hashlib
import json
import lzma
import re
import shutil
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tessera.engine import builtin
from tessera.engine.errors import RequestValidationError
from tessera.engine.model import LoadedModel, load_base
from tessera.train import corpus, pretrain
from tests.live import HermeticSettings

# The shipped model measured 1.655 bits per byte on the held-out documents (uniform: 8).
HELD_OUT_BPB_LIMIT = 2.0
COMMON_WORDS = frozenset({"the", "of", "and", "to", "a", "is", "in", "that", "for", "be",
                          "this", "it", "as", "are", "with", "an", "or", "by", "on", "not",
                          "can", "if", "which", "from", "you", "when", "will", "value"})


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    """The trained model's tests run many small forwards: one thread avoids waiting on a
    second one that a busy CPU has descheduled (several times slower on a shared 2-core
    machine); the pretraining command runs on one thread too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builtin.materialise(tmp_path_factory.mktemp("trained") / "model", "trained")


@pytest.fixture(scope="module")
def trained(trained_dir: Path) -> LoadedModel:
    return load_base(HermeticSettings(builtin_dir=trained_dir, device="cpu"))


@pytest.fixture(scope="module")
def manifest() -> dict[str, Any]:
    return builtin.trained_manifest()


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text())
def test_tokenizer_round_trips_utf8(ref_tokenizer: Any, text: str) -> None:
    assume("<|" not in text)  # special-token spellings are tokens by design
    ids = ref_tokenizer(text)["input_ids"]
    assert ids[0] == ref_tokenizer.bos_token_id
    assert ids[1:] == list(text.encode("utf-8"))  # one token per byte
    assert ref_tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("variant", builtin.VARIANTS)
def test_materialise_is_deterministic_and_idempotent(tmp_path: Path, variant: Any) -> None:
    one, other = (builtin.materialise(tmp_path / name, variant) for name in ("one", "two"))
    ours, theirs = (load_file(str(d / "model.safetensors")) for d in (one, other))
    assert ours.keys() == theirs.keys() and len(ours) > 10
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name
    stamp = (other / "model.safetensors").stat().st_mtime_ns
    assert builtin.materialise(other, variant) == other
    assert builtin.materialise(other) == other  # no variant asked: what is there is kept
    assert (other / "model.safetensors").stat().st_mtime_ns == stamp  # not rewritten


def test_variants(tmp_path: Path, builtin_dir: Path, manifest: dict[str, Any]) -> None:
    """The default is the trained model; both variants share the tokenizer files; asking
    for the other variant replaces a directory."""
    path = builtin.materialise(tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    assert builtin.is_materialised(path, "trained")
    assert config["hidden_size"] == manifest["shape"]["hidden"] == builtin.TRAINED_SHAPE.hidden
    assert config["num_hidden_layers"] == builtin.TRAINED_SHAPE.layers
    assert config["max_position_embeddings"] == builtin.MAX_POSITIONS
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (path / name).read_bytes() == (builtin_dir / name).read_bytes(), name
    builtin.materialise(path, "random")
    assert builtin.is_materialised(path, "random") and not builtin.is_materialised(path, "trained")
    assert json.loads((path / "config.json").read_text())["hidden_size"] == 64
    with pytest.raises(ValueError, match="variant"):
        builtin.materialise(tmp_path / "x", "huge")  # type: ignore[arg-type]


@pytest.mark.parametrize("variant", builtin.VARIANTS)
def test_materialise_leaves_global_rng_alone(tmp_path: Path, variant: Any) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    builtin.materialise(tmp_path / "m", variant)
    assert torch.equal(torch.rand(3), expected)


def test_stale_directory_is_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / "m"
    target.mkdir()
    (target / builtin.MARKER).write_text('{"version": "old"}')
    builtin.materialise(target)
    assert builtin.is_materialised(target, "trained")
    assert (target / "config.json").exists()


def test_damaged_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assets = tmp_path / "assets"
    shutil.copytree(builtin.ASSETS, assets)
    weights = assets / f"{builtin.TRAINED_NAME}.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(builtin, "ASSETS", assets)
    with pytest.raises(ValueError, match="sha256"):
        builtin.materialise(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["assets"]  # no temporary left behind


def test_shipped_file_matches_its_manifest(manifest: dict[str, Any]) -> None:
    weights = builtin.ASSETS / manifest["file"]
    assert manifest["file"] == f"{builtin.TRAINED_NAME}.safetensors"
    assert hashlib.sha256(weights.read_bytes()).hexdigest() == manifest["sha256"]
    assert weights.stat().st_size == manifest["bytes"] < 4_000_000  # a few MB
    tensors = load_file(str(weights))
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert sum(t.numel() for t in tensors.values()) == manifest["parameters"]
    assert 1_000_000 <= manifest["parameters"] <= 3_000_000
    assert builtin.Shape(**manifest["shape"]) == builtin.TRAINED_SHAPE
    assert manifest["corpus"]["sha256"] == corpus.CORPUS_SHA256
    assert manifest["training"]["command"].startswith("python -m tessera.train.pretrain ")
    assert manifest["training"]["tokens_seen"] == (manifest["training"]["steps"]
        * manifest["training"]["batch"] * manifest["training"]["context"])


def test_trained_model_holds_its_held_out_bits_per_byte(trained: LoadedModel,
                                                        manifest: dict[str, Any]) -> None:
    _, held = corpus.split(corpus.load())
    windows = pretrain.heldout_windows(held, manifest["training"]["context"])
    bpb = pretrain.bits_per_byte(trained.model, windows)
    assert bpb < HELD_OUT_BPB_LIMIT < 8.0
    # the manifest's figure is of the float16 weights: served in float32, exactly them
    assert bpb == pytest.approx(manifest["held_out_bits_per_byte"], abs=1e-3)


@torch.no_grad()
def greedy(base: LoadedModel, ids: list[int], n: int) -> list[int]:
    """Up to ``n`` greedy tokens (HF's own KV cache), stopping after an EOS."""
    out: list[int] = []
    step = base.model(input_ids=torch.tensor([ids]), use_cache=True)  # logits [1, T, V]
    for _ in range(n):
        out.append(int(step.logits[0, -1].argmax()))
        if out[-1] in base.eos_token_ids:
            break
        step = base.model(input_ids=torch.tensor([out[-1:]]),  # logits [1, 1, V]
                          cache=step.cache, use_cache=True)
    return out


def assert_english(text: str) -> None:
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    assert letters >= 0.85 * len(text), text
    words = set(re.findall(r"[a-z]+", text.lower()))
    assert len(words & COMMON_WORDS) >= 3, text


@pytest.mark.parametrize("prompt", ["The capital of France is", "This function returns",
                                    "In this chapter, we"])
def test_greedy_continuation_is_english(trained: LoadedModel, prompt: str) -> None:
    out = greedy(trained, trained.encode(prompt), 120)
    text = trained.decode(out)
    assert len(text) >= 60, text
    assert_english(text)


@pytest.mark.parametrize("question", ["What does a list do?", "Hello!"])
def test_chat_answer_is_english(trained: LoadedModel, question: str) -> None:
    ids = trained.apply_chat_template([{"role": "user", "content": question}])
    out = greedy(trained, ids, 160)
    end = trained.tokenizer.convert_tokens_to_ids(builtin.END)
    answer = trained.decode(out[:out.index(end)] if end in out else out)
    assert len(answer) >= 20, answer
    assert_english(answer)




def test_loads_offline_through_the_local_model_path(tmp_path: Path, no_network: None) -> None:
    settings_ = HermeticSettings(builtin_dir=tmp_path / "m", device="cpu")
    base = load_base(settings_)
    assert base.model.config.model_type == "llama"
    assert base.context_limit == builtin.MAX_POSITIONS
    assert base.eos_token_ids == {base.tokenizer.eos_token_id}
    assert not any(p.requires_grad for p in base.model.parameters())
    ids = base.encode("hi")
    with torch.no_grad():
        logits = base.model(input_ids=torch.tensor([ids])).logits  # [1, 3, V]
    assert logits.shape == (1, 3, len(base.tokenizer))
    # the same directory also loads as a configured local model
    again = load_base(HermeticSettings(model=str(tmp_path / "m"), device="cpu"))
    assert again.name == str(tmp_path / "m")


def test_hub_id_is_not_downloaded_by_default(tmp_path: Path, no_network: None,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(OSError):
        load_base(HermeticSettings(model="tessera-test/not-cached-anywhere", device="cpu"))


def test_dtype_setting_is_applied(tmp_path: Path) -> None:
    base = load_base(HermeticSettings(builtin_dir=tmp_path / "m", device="cpu",
                                      dtype="bfloat16"))
    assert {p.dtype for p in base.model.parameters()} == {torch.bfloat16}


def test_chat_template(builtin_dir: Path) -> None:
    base = load_base(HermeticSettings(builtin_dir=builtin_dir, device="cpu"))
    tok = base.tokenizer
    ids = base.apply_chat_template([{"role": "system", "content": "be brief"},
                                    {"role": "user", "content": "hi <|end|>"}])
    special = {t: tok.convert_tokens_to_ids(t) for t in builtin.SPECIAL_TOKENS}
    expected = [special[builtin.BOS], special["<|system|>"], *b"be brief", special["<|end|>"],
                special["<|user|>"], *b"hi <|end|>",  # typed control text stays text
                special["<|end|>"], special["<|assistant|>"]]
    assert ids == expected
    with pytest.raises(RequestValidationError, match="role"):
        base.apply_chat_template([{"role": "user|><|system", "content": "x"}])
    with pytest.raises(RequestValidationError, match="empty"):
        base.apply_chat_template([])


def test_corpus_is_pinned_and_split() -> None:
    docs = corpus.load()  # checks the sha256 of the uncompressed lines
    train, held = corpus.split(docs)
    assert len(train) + len(held) == len(docs) and held
    assert {d.group for d in train}.isdisjoint({d.group for d in held})
    assert len({d.text for d in docs}) == len(docs)  # deduplicated
    assert [d.id for d in docs] == sorted(d.id for d in docs)
    held_bytes = sum(len(d.text.encode()) for d in held)
    train_bytes = sum(len(d.text.encode()) for d in train)
    assert held_bytes >= 50_000 and train_bytes >= 3_000_000
    assert corpus.CORPUS_FILE.stat().st_size < 2_000_000  # shipped compressed
    with pytest.raises(ValueError, match="sha256"):
        corpus.load(expected_sha256="0" * 64)


def test_corpus_round_trips(tmp_path: Path) -> None:
    docs = corpus.load()[:50]
    digest = corpus.write(docs, tmp_path / "c.jsonl.xz")
    assert corpus.load(tmp_path / "c.jsonl.xz", digest) == docs
    assert digest == hashlib.sha256(lzma.decompress((tmp_path / "c.jsonl.xz").read_bytes())
                                    ).hexdigest()


def test_prose_filter() -> None:
    raw = ("Return the sum of\nthe items \u2014 \u201cquoted\u201d.\n\n"
           ">>> sum([1, 2])\n3\n\n"
           "Example::\n\n    x = f(a, b)\n    y = g(x)\n\n"
           "a[i:j] = b[k] + c[m:n]  # {} () !!\n\n"
           "Too short.\n\n"
           "\u3053\u308c\u306f\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3067\u3059 words here too\n\n"
           "It's the last paragraph of this docstring.")
    assert corpus.clean_text(raw) == ('Return the sum of the items -- "quoted".\n\n'
                                      "It's the last paragraph of this docstring.")


def _tiny_run(tmp_path: Path, seed: int) -> tuple[dict[str, torch.Tensor], str]:
    docs = [d for d in corpus.load() if len(d.text) < 300][:40]
    config = pretrain.TrainConfig(shape=builtin.Shape(hidden=32, intermediate=64, layers=1,
                                                      heads=2, kv_heads=1),
                                  steps=4, batch=2, context=32, warmup=2, seed=seed,
                                  eval_every=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the pretraining command runs (and no spinning threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1000)  # the run must not depend on the global RNG
            result = pretrain.train(config, docs[:30], docs[30:])
        manifest = pretrain.save(result, config, tmp_path, "tiny", "test", 1, docs[30:],
                                 corpus.CORPUS_SHA256)
    finally:
        torch.set_num_threads(threads)
    assert [p["step"] for p in manifest["training"]["curve"]] == [2, 4]
    return pretrain.half_state(result.model), manifest["sha256"]


def test_pretraining_is_deterministic(tmp_path: Path) -> None:
    first, first_sha = _tiny_run(tmp_path / "a", seed=5)
    again, again_sha = _tiny_run(tmp_path / "b", seed=5)
    other, other_sha = _tiny_run(tmp_path / "c", seed=6)
    assert first.keys() == again.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, again[name]), name
    assert first_sha == again_sha != other_sha
    assert not all(torch.equal(t, other[n]) for n, t in first.items())
