"""Bad training data is refused with the file, the line number and the field; the loss
covers completion tokens only."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tessera.server import cli
from tessera.train.data import IGNORE, DatasetError, Encoded, collate, load_jsonl

GOOD = json.dumps({"prompt": "upper: abc\n", "completion": "ABC\n"})


@pytest.mark.parametrize(("line", "field", "message"), [
    ('{"prompt": "a", "completion": ', None, "not valid JSON"),
    ('["a", "b"]', None, "expected a JSON object"),
    ('{"prompt": "a"}', "completion", "missing"),
    ('{"completion": "a"}', "prompt", "missing"),
    ('{"prompt": 3, "completion": "a"}', "prompt", "must be a string, got int"),
    ('{"prompt": "a", "completion": null}', "completion", "must be a string, got NoneType"),
    ('{"prompt": "a", "completion": ""}', "completion", "is empty"),
    ('{"prompt": "a", "completions": "b"}', "completions", "unexpected field"),
])
def test_bad_line_is_named(tmp_path: Path, line: str, field: str | None, message: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n\n{GOOD}\n{line}\n{GOOD}\n")  # the bad line is line 4
    with pytest.raises(DatasetError) as err:
        load_jsonl(path)
    assert err.value.line == 4 and err.value.field == field
    text = str(err.value)
    assert text.startswith(f"{path}:4:") and message in text
    if field is not None:
        assert f"field {field!r}" in text


def test_not_utf8_and_empty_files(tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(GOOD.encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DatasetError, match=r":2: not UTF-8"):
        load_jsonl(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DatasetError, match="holds no examples"):
        load_jsonl(empty)
    with pytest.raises(DatasetError, match="cannot read"):
        load_jsonl(tmp_path / "missing.jsonl")


def test_blank_lines_are_skipped_and_lines_numbered(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f"\n{GOOD}\n\n{GOOD}")  # no final newline either
    examples = load_jsonl(path)
    assert [e.line for e in examples] == [2, 4]
    assert examples[0].prompt == "upper: abc\n" and examples[0].completion == "ABC\n"


def test_the_command_refuses_a_bad_line_before_loading_a_model(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(f"{GOOD}\n" + '{"prompt": "a", "completion": 7}\n')
    status = cli.main(["train", "lora", "--data", str(path), "--out", str(tmp_path / "out"),
                       "--base", str(tmp_path / "no-such-model")])
    err = capsys.readouterr().err
    assert status == 1
    assert f"{path}:2: field 'completion': must be a string, got int" in err
    assert not (tmp_path / "out").exists()


def test_labels_cover_the_completion_only() -> None:
    batch = collate([Encoded((9, 1, 2, 3, 4), prompt_len=3), Encoded((9, 5, 6), 2)], pad_id=0)
    assert batch.input_ids.tolist() == [[9, 1, 2, 3, 4], [9, 5, 6, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    n = IGNORE
    assert batch.labels.tolist() == [[n, n, n, 3, 4], [n, n, 6, n, n]]
    assert batch.num_target_tokens == 3 and batch.num_tokens == 8
    assert batch.labels.dtype == torch.long
