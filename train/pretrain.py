"""Pretrain the built-in base model: a small byte-level Llama on the shipped corpus, on CPU.

    python -m tessera.train.pretrain --out engine/assets      # reproduces tessera-tiny-v1

The model is :func:`tessera.engine.builtin.llama_config` of a :class:`Shape` (the same
tokenizer, special tokens and chat template as the served model; untied embeddings;
``max_position_embeddings`` 2048, trained on windows of ``--context`` bytes). The data is
:mod:`tessera.train.corpus`: every training document as ``<|bos|> text <|eos|>``, plus one
chat sample for about a third of the Python documents (a question about the documented
name, the start of its documentation as the answer, in the chat template, ending
``<|end|><|eos|>``), so the chat path also answers in words. Each epoch shuffles the
samples, concatenates them and cuts the stream into windows; batches take windows in a
shuffled order. AdamW with linear warm-up and cosine decay, gradient clipping at 1.

Deterministic on CPU: one seed drives the initialisation and every shuffle, and a run with
the same flags and the same thread count (``--threads``, default 1) gives bit-identical
weights. The output is ``NAME.safetensors`` (float16) and ``NAME.json`` (the manifest:
config, corpus hash, the command, held-out bits per byte of the saved weights, sha256).

Bits per byte: the mean negative log2-likelihood of the held-out documents' bytes (the
``<|eos|>`` targets excluded), each window of ``--context`` tokens predicted from its own
start.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm  # type: ignore[import-untyped]
from transformers import LlamaForCausalLM

from tessera.engine import builtin
from tessera.train import corpus

log = logging.getLogger(__name__)

LN2 = math.log(2.0)
BYTES = 256  # ids below this are bytes; the rest are special tokens
CHAT_SHARE_PER_MILLE = 330  # of the Python documents that also become a chat sample
_QUESTIONS = ("What does {} do?", "What is {}?", "Explain {}.", "Tell me about {}.",
              "How does {} work?", "Describe {}.")
_TOPIC_QUESTIONS = ("What is {} in Python?", "Explain {} in Python.", "How does {} work?")
_SYSTEMS = ("You are a helpful assistant.", "Answer briefly.",
            "You explain Python to programmers.")
_ANSWER_BYTES = 600  # an answer is the documentation's first paragraphs, up to this long


@dataclass(frozen=True)
class TrainConfig:
    shape: builtin.Shape = field(default_factory=lambda: builtin.TRAINED_SHAPE)
    steps: int = 2400
    batch: int = 16  # windows per step
    context: int = 256  # tokens per window
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * this
    warmup: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    seed: int = 20250101
    eval_every: int = 400  # steps; 0 = only at the end

    @property
    def tokens(self) -> int:
        return self.steps * self.batch * self.context


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def document_ids(doc: corpus.Document, special: dict[str, int]) -> list[int]:
    """``<|bos|> text <|eos|>``: one id per UTF-8 byte (ids 0-255 are the bytes)."""
    return [special[builtin.BOS], *doc.text.encode("utf-8"), special[builtin.EOS]]


def chat_ids(doc: corpus.Document, special: dict[str, int]) -> list[int] | None:
    """A chat sample about a Python document (about a third of them, chosen by a hash of
    the id), in the served chat template; None for the others and for Rust pages."""
    kind = doc.id.split(":", 1)[0]
    h = _stable_hash(doc.id)
    if kind not in ("stdlib", "topic") or h % 1000 >= CHAT_SHARE_PER_MILLE:
        return None
    templates = _QUESTIONS if kind == "stdlib" else _TOPIC_QUESTIONS
    question = templates[(h >> 10) % len(templates)].format(doc.title)
    answer = ""
    for paragraph in doc.text.split("\n\n"):
        if answer and len(answer) + len(paragraph) > _ANSWER_BYTES:
            break
        answer = f"{answer}\n\n{paragraph}" if answer else paragraph
    ids = [special[builtin.BOS]]
    if (h >> 20) % 4 == 0:  # a quarter carry a system message
        system = _SYSTEMS[(h >> 24) % len(_SYSTEMS)]
        ids += [special["<|system|>"], *system.encode(), special[builtin.END]]
    ids += [special["<|user|>"], *question.encode(), special[builtin.END],
            special["<|assistant|>"], *answer.encode(), special[builtin.END],
            special[builtin.EOS]]
    return ids


def special_ids() -> dict[str, int]:
    tokenizer = builtin.build_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in builtin.SPECIAL_TOKENS}
    return {token: i for token, i in ids.items() if isinstance(i, int)}


def training_samples(docs: Sequence[corpus.Document]) -> list[list[int]]:
    special = special_ids()
    samples = [document_ids(doc, special) for doc in docs]
    samples += [ids for ids in (chat_ids(doc, special) for doc in docs) if ids is not None]
    return samples


def windows(stream: torch.Tensor, context: int) -> torch.Tensor:
    """Overlapping-by-one windows of a token stream: each holds ``context`` inputs and
    their ``context`` next-token targets."""
    count = (stream.numel() - 1) // context
    starts = torch.arange(count) * context  # [count]
    offsets = torch.arange(context + 1)  # [context + 1]
    return stream[starts[:, None] + offsets[None, :]]  # [count, context + 1]


def batches(samples: Sequence[Sequence[int]], config: TrainConfig) -> Iterator[torch.Tensor]:
    """Endless ``[batch, context + 1]`` batches: per epoch, the samples in a seeded order
    are concatenated and cut into windows, taken in a seeded order."""
    gen = torch.Generator().manual_seed(config.seed + 1)
    epoch = 0
    while True:
        order = torch.randperm(len(samples), generator=gen).tolist()
        stream = torch.tensor([t for i in order for t in samples[i]],
                              dtype=torch.long)  # [epoch_tokens]
        wins = windows(stream, config.context)  # [n, context + 1]
        perm = torch.randperm(wins.shape[0], generator=gen)  # [n]
        log.info("epoch %d: %d tokens, %d windows", epoch, stream.numel(), wins.shape[0],
                 extra={"epoch": epoch, "tokens": stream.numel(), "windows": wins.shape[0]})
        for i in range(0, wins.shape[0] - config.batch + 1, config.batch):
            yield wins[perm[i:i + config.batch]]  # [batch, context + 1]
        epoch += 1


def heldout_windows(docs: Sequence[corpus.Document], context: int) -> list[torch.Tensor]:
    """The held-out documents as one stream cut into ``[context + 1]`` windows (the last
    one shorter)."""
    special = special_ids()
    stream = torch.tensor([t for doc in docs for t in document_ids(doc, special)],
                          dtype=torch.long)  # [tokens]
    out: list[torch.Tensor] = []
    for start in range(0, stream.numel() - 1, context):
        out.append(stream[start:start + context + 1])  # [<= context + 1]
    return out


@torch.no_grad()
def bits_per_byte(model: nn.Module, wins: Sequence[torch.Tensor], batch: int = 16) -> float:
    """Mean -log2 p(byte) over the windows' byte targets (special-token targets left out)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    full = [w for w in wins if w.numel() == wins[0].numel()]
    rest = [w for w in wins if w.numel() != wins[0].numel()]
    groups = [torch.stack(full[i:i + batch]) for i in range(0, len(full), batch)]
    groups += [w[None] for w in rest]
    for group in groups:  # [b, t + 1]
        logits = model(input_ids=group[:, :-1]).logits.float()  # [b, t, vocab]
        targets = group[:, 1:]  # [b, t]
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # [b, t]
        mask = targets < BYTES  # [b, t]
        total += float(nll[mask].sum())
        count += int(mask.sum())
    model.train(was_training)
    return total / count / LN2


def build_model(shape: builtin.Shape, seed: int) -> LlamaForCausalLM:
    config = builtin.llama_config(shape, builtin.build_tokenizer())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def _optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.ndim >= 2]  # matrices and embeddings
    rest = [p for p in model.parameters() if p.ndim < 2]  # RMSNorm gains
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": rest, "weight_decay": 0.0}],
        lr=config.lr, betas=config.betas, foreach=False)


def learning_rate(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


@dataclass
class TrainResult:
    model: LlamaForCausalLM
    curve: list[dict[str, float]]  # {"step", "train_bpb", "held_out_bpb", "seconds"}
    seconds: float
    tokens: int


def train(config: TrainConfig, train_docs: Sequence[corpus.Document],
          held_docs: Sequence[corpus.Document], *, progress: bool = False) -> TrainResult:
    """Train from scratch; the global RNG is left untouched."""
    model = build_model(config.shape, config.seed)
    model.train()
    optimizer = _optimizer(model, config)
    data = batches(training_samples(train_docs), config)
    held = heldout_windows(held_docs, config.context)
    curve: list[dict[str, float]] = []
    start = time.perf_counter()
    running = 0.0  # mean train loss (nats/token) since the last evaluation
    since = 0
    bar = tqdm(total=config.steps, disable=not progress, unit="step", dynamic_ncols=True)
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        batch = next(data)  # [batch, context + 1]
        logits = model(input_ids=batch[:, :-1]).logits  # [batch, context, vocab]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                               batch[:, 1:].reshape(-1))  # mean over batch * context
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        running += loss.item()
        since += 1
        elapsed = time.perf_counter() - start
        tokens = (step + 1) * config.batch * config.context
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens / elapsed:.0f}")
        last = step + 1 == config.steps
        if last or (config.eval_every and (step + 1) % config.eval_every == 0):
            point = {"step": step + 1, "train_bpb": running / since / LN2,
                     "held_out_bpb": bits_per_byte(model, held), "seconds": elapsed}
            curve.append(point)
            running, since = 0.0, 0
            log.info("pretrain eval", extra={**point, "tokens": tokens,
                                             "tokens_per_s": tokens / elapsed})
            bar.write(f"step {step + 1}/{config.steps}  train {point['train_bpb']:.3f} bpb  "
                      f"held-out {point['held_out_bpb']:.3f} bpb  "
                      f"{tokens / elapsed:.0f} tok/s  {elapsed / 60:.1f} min")
    bar.close()
    model.eval()  # type: ignore[no-untyped-call]
    return TrainResult(model=model, curve=curve, seconds=time.perf_counter() - start,
                       tokens=config.steps * config.batch * config.context)


def half_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as stored: float16, contiguous, under the HF parameter names."""
    return {name: t.detach().to(torch.float16).contiguous()
            for name, t in model.state_dict().items()}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def save(result: TrainResult, config: TrainConfig, out: Path, name: str,
         command: str, threads: int, held_docs: Sequence[corpus.Document],
         corpus_sha256: str) -> dict[str, Any]:
    """Write ``NAME.safetensors`` and ``NAME.json``; returns the manifest. The held-out
    bits per byte are measured again on the saved float16 weights (as served)."""
    out.mkdir(parents=True, exist_ok=True)
    weights = out / f"{name}.safetensors"
    save_file(half_state(result.model), str(weights), metadata={"format": "pt"})
    shipped = build_model(config.shape, config.seed)
    shipped.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()})
    bpb = bits_per_byte(shipped, heldout_windows(held_docs, config.context))
    params = sum(p.numel() for p in shipped.parameters())
    train_cfg = {k: v for k, v in asdict(config).items() if k != "shape"}
    manifest: dict[str, Any] = {
        "name": name,
        "file": weights.name,
        "sha256": file_sha256(weights),
        "bytes": weights.stat().st_size,
        "dtype": "float16",
        "parameters": params,
        "shape": asdict(config.shape),
        "architecture": "LlamaForCausalLM",
        "max_position_embeddings": builtin.MAX_POSITIONS,
        "tokenizer": "byte-level: ids 0-255 are the bytes, then "
                     + " ".join(builtin.SPECIAL_TOKENS),
        "corpus": {"version": corpus.CORPUS_VERSION, "sha256": corpus_sha256,
                   "sources": corpus.SOURCES},
        "held_out_bits_per_byte": round(bpb, 4),
        "training": {
            "command": command,
            "threads": threads,
            **train_cfg,
            "tokens_seen": result.tokens,
            "wall_seconds": round(result.seconds, 1),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "curve": [{k: round(v, 4) for k, v in p.items()} for p in result.curve],
        },
    }
    (out / f"{name}.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> None:
    defaults = TrainConfig()
    shape = defaults.shape
    parser = argparse.ArgumentParser(
        prog="python -m tessera.train.pretrain",
        description="Pretrain the built-in byte-level Llama on the shipped corpus (CPU, "
                    "deterministic for a given seed and thread count). With no flags but "
                    "--out it reproduces engine/assets/tessera-tiny-v1.safetensors.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for NAME.safetensors and NAME.json")
    parser.add_argument("--name", default=builtin.TRAINED_NAME, help="file stem")
    parser.add_argument("--steps", type=int, default=defaults.steps,
                        help="optimizer steps (the cosine schedule spans them)")
    parser.add_argument("--batch", type=int, default=defaults.batch, help="windows per step")
    parser.add_argument("--context", type=int, default=defaults.context,
                        help="tokens per training window")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="warm-up steps")
    parser.add_argument("--seed", type=int, default=defaults.seed,
                        help="initialisation and data order")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads; the same count reproduces the same weights "
                             "(one thread is also the fastest on a shared 2-core machine)")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every,
                        help="steps between held-out evaluations (0: only at the end)")
    parser.add_argument("--hidden", type=int, default=shape.hidden, help="hidden size")
    parser.add_argument("--intermediate", type=int, default=shape.intermediate,
                        help="MLP width")
    parser.add_argument("--layers", type=int, default=shape.layers, help="decoder layers")
    parser.add_argument("--heads", type=int, default=shape.heads, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=shape.kv_heads,
                        help="key/value heads (grouped-query attention)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    config = TrainConfig(
        shape=builtin.Shape(hidden=args.hidden, intermediate=args.intermediate,
                            layers=args.layers, heads=args.heads, kv_heads=args.kv_heads),
        steps=args.steps, batch=args.batch, context=args.context, lr=args.lr,
        warmup=args.warmup, seed=args.seed, eval_every=args.eval_every)
    train_docs, held_docs = corpus.split(corpus.load())
    print(f"corpus {corpus.CORPUS_VERSION}: {len(train_docs)} train / {len(held_docs)} "  # noqa: T201
          f"held-out documents; {config.steps} steps x {config.batch} x {config.context} "
          f"= {config.tokens:,} tokens on {args.threads} threads", file=sys.stderr)
    result = train(config, train_docs, held_docs, progress=True)
    command = "python -m tessera.train.pretrain " + " ".join(
        sys.argv[1:] if argv is None else argv)
    manifest = save(result, config, args.out, args.name, command, args.threads, held_docs,
                    corpus.CORPUS_SHA256)
    print(json.dumps({k: manifest[k] for k in  # noqa: T201
                      ("file", "sha256", "parameters", "held_out_bits_per_byte")}))


if __name__ == "__main__":
    main()
