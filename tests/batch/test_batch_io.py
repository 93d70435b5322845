"""Batch files without a server: row parsing, streaming reads, resume scans with torn tails, merge."""

from __future__ import annotations

import asyncio
import os

import orjson
import pytest

from hpcserve.batch.io import OutputWriter, aiter_lines, count_rows, iter_lines, read_rows, scan_output
from hpcserve.batch.merge import merge, merge_shards, part_path
from hpcserve.batch.rows import CHAT, COMPLETIONS, GENERATE, BadRow, Request, error_row, ok_row, parse_line, parse_response
from hpcserve.errors import HpcserveError


def test_prompt_row_maps_openai_params_into_sampling_params():
    row = parse_line(b'{"id": "a", "prompt": "hi", "max_tokens": 7, "temperature": 0.5, '
                     b'"sampling_params": {"temperature": 0.1, "top_k": 3}}', 4)
    assert isinstance(row, Request)
    assert (row.id, row.key, row.path) == ("a", "a", GENERATE)
    assert row.body == {"text": "hi", "sampling_params": {"max_new_tokens": 7, "temperature": 0.1, "top_k": 3}}


def test_default_id_is_the_line_number_and_input_ids_go_to_generate():
    row = parse_line(b'{"input_ids": [1, 2, 3]}', 12)
    assert (row.id, row.key, row.path) == (12, "12", GENERATE)
    assert row.body == {"input_ids": [1, 2, 3], "sampling_params": {}}


def test_completions_api_sends_prompt_and_input_ids_rows_with_openai_names():
    """For an endpoint without /generate (a Dynamo frontend): the same rows, as OpenAI completions bodies."""
    row = parse_line(b'{"id": "a", "prompt": "hi", "max_tokens": 7, "seed": 3, '
                     b'"sampling_params": {"temperature": 0.1, "min_new_tokens": 2}}', 4, "completions")
    assert (row.path, row.body) == (COMPLETIONS, {"prompt": "hi", "max_tokens": 7, "seed": 3, "temperature": 0.1,
                                                  "min_tokens": 2})
    row = parse_line(b'{"input_ids": [1, 2, 3]}', 2, "completions")
    assert (row.path, row.body) == (COMPLETIONS, {"prompt": [1, 2, 3]})
    assert parse_line(b'{"messages": [{"role": "user", "content": "x"}]}', 1, "completions").path == CHAT
    assert "'n' other than 1" in parse_line(b'{"prompt": "x", "n": 2}', 1, "completions").error
    answer = {"choices": [{"text": "out", "finish_reason": "length"}], "usage": {"prompt_tokens": 3,
                                                                                "completion_tokens": 1}}
    assert parse_response(COMPLETIONS, answer) == ("out", 3, 1, "length")


def test_chat_row_passes_openai_keys_and_translates_sampling_params():
    row = parse_line(b'{"id": 5, "messages": [{"role": "user", "content": "x"}], "top_p": 0.9, '
                     b'"response_format": {"type": "text"}, "sampling_params": {"max_new_tokens": 4}}', 1)
    assert isinstance(row, Request) and row.path == CHAT and row.key == "5"
    assert row.body == {"messages": [{"role": "user", "content": "x"}], "top_p": 0.9,
                        "response_format": {"type": "text"}, "max_tokens": 4}


@pytest.mark.parametrize("line, key, fragment", [
    (b'{"id": "x", "prompt": "a"', "3", "not valid JSON"),
    (b'[1, 2]', "3", "expected a JSON object"),
    (b'{"id": true, "prompt": "a"}', "3", "'id' must be"),
    (b'{"id": "y"}', "y", "exactly one of"),
    (b'{"id": "y", "prompt": "a", "messages": []}', "y", "prompt and messages"),
    (b'{"id": "y", "prompt": 5}', "y", "'prompt' must be a string"),
    (b'{"id": "y", "input_ids": ["a"]}', "y", "list of integers"),
    (b'{"id": "y", "prompt": "a", "max_tokenz": 3}', "y", "unknown key 'max_tokenz'"),
    (b'{"id": "y", "prompt": "a", "n": 2}', "y", "'n' other than 1"),
    (b'{"id": "y", "messages": [{"role": "user", "content": "a"}], "stream": true}', "y", "'stream'"),
])
def test_malformed_rows_become_bad_rows_with_a_reason(line, key, fragment):
    row = parse_line(line, 3)
    assert isinstance(row, BadRow)
    assert row.key == key and fragment in row.error and row.error.startswith("line 3:")


def test_output_rows_and_response_shapes():
    assert orjson.loads(ok_row("a", "t", 3, 4, "length", 0.123456)) == {
        "id": "a", "text": "t", "usage": {"prompt_tokens": 3, "completion_tokens": 4},
        "finish_reason": "length", "latency_s": 0.1235}
    assert orjson.loads(error_row(7, "boom")) == {"id": 7, "error": "boom"}
    gen = {"text": "abc", "meta_info": {"prompt_tokens": 2, "completion_tokens": 3,
                                        "finish_reason": {"type": "stop"}}}
    assert parse_response(GENERATE, gen) == ("abc", 2, 3, "stop")
    chat = {"choices": [{"message": {"content": "hey"}, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 1}}
    assert parse_response(CHAT, chat) == ("hey", 9, 1, "length")
    with pytest.raises(ValueError, match="unexpected response shape"):
        parse_response(CHAT, {"choices": []})


def test_line_numbers_count_blank_lines_and_chunks_split_anywhere(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\n  \n{"prompt": "b"}\n{"prompt": "c"}')  # no final newline
    for chunk in (1, 3, 7, 1 << 20):
        assert [n for n, _ in iter_lines(path, chunk)] == [1, 4, 5]
    got = asyncio.run(_collect(aiter_lines(path, 5)))
    assert got == [(1, b'{"prompt": "a"}'), (4, b'{"prompt": "b"}'), (5, b'{"prompt": "c"}')]
    assert [r.key for r in read_rows(path, 1, 2)] == ["4"]  # lines 2 and 4 are shard 1 of 2
    assert count_rows(path, 0, 2) == 2


async def _collect(agen):
    return [item async for batch in agen for item in batch]


def _rows(*ids):
    return b"".join(ok_row(i, f"t{i}", 1, 1, "length", 0.0) for i in ids)


def test_scan_collects_ids_and_repairs_a_torn_tail_without_losing_rows(tmp_path):
    out = tmp_path / "out.jsonl"
    good = _rows("a", 2) + error_row("c", "x")
    out.write_bytes(good + b'{"id": "d", "text": "hal')
    scan = scan_output(out)  # read-only
    assert scan.done == {"a", "2", "c"} and scan.errors == 1 and scan.torn_bytes > 0
    assert out.read_bytes().endswith(b"hal")
    scan = scan_output(out, repair=True)
    assert scan.repaired and out.read_bytes() == good
    assert b"hal" in (tmp_path / "out.jsonl.torn").read_bytes()
    assert scan_output(out, repair=True).torn_bytes == 0


def test_a_complete_row_without_newline_and_garbage_lines_are_a_torn_tail(tmp_path):
    out = tmp_path / "out.jsonl"
    good = _rows("a")
    out.write_bytes(good + b"\x00\x00\x00\n" + _rows("b").rstrip(b"\n"))
    scan = scan_output(out, repair=True)
    assert scan.done == {"a"} and out.read_bytes() == good


def test_an_unreadable_line_in_the_middle_is_kept_and_not_counted(tmp_path):
    out = tmp_path / "out.jsonl"
    data = _rows("a") + b"garbage\n" + _rows("b")
    out.write_bytes(data)
    scan = scan_output(out, repair=True)
    assert scan.done == {"a", "b"} and scan.bad_lines == 1 and out.read_bytes() == data


def test_writer_appends_every_row_once_and_fsyncs_at_close(tmp_path):
    out = tmp_path / "sub" / "out.jsonl"

    async def go():
        w = OutputWriter(out, checkpoint_rows=3)
        await w.start()
        for i in range(10):
            w.put(ok_row(i, "x", 1, 1, None, 0.0))
            if i % 4 == 0:
                await asyncio.sleep(0)
        await w.close()
        return w

    w = asyncio.run(go())
    assert w.written == 10 and w.synced == 10
    assert [orjson.loads(x)["id"] for x in out.read_bytes().splitlines()] == list(range(10))


def _write_input(path, n):
    path.write_bytes(b"".join(orjson.dumps({"id": f"r{i}", "prompt": str(i)}) + b"\n" for i in range(n)))


def test_merge_orders_parts_by_input_and_matches_one_shard(tmp_path):
    inp = tmp_path / "in.jsonl"
    _write_input(inp, 10)
    # shard outputs in completion order (reversed), one part with a torn tail
    n = 3
    for s in range(n):
        ids = [f"r{i}" for i in range(10) if i % n == s][::-1]
        data = _rows(*ids)
        if s == 1:
            data += b'{"id": "zz'
        (tmp_path / os.path.basename(part_path(tmp_path / "out.jsonl", s, n))).write_bytes(data)
    summary = merge_shards(inp, tmp_path / "out.jsonl", n)
    assert summary.rows == 10 and summary.missing == 0
    assert (tmp_path / "out.jsonl").read_bytes() == _rows(*[f"r{i}" for i in range(10)])
    one = tmp_path / "one.jsonl"
    one.write_bytes(_rows(*[f"r{i}" for i in range(10)][::-1]))
    merge(inp, tmp_path / "one-sorted.jsonl", [str(one)])
    assert (tmp_path / "one-sorted.jsonl").read_bytes() == (tmp_path / "out.jsonl").read_bytes()


def test_merge_refuses_missing_rows_unless_allowed_and_writes_duplicate_ids_once(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"id": "a", "prompt": "1"}\n{"id": "b", "prompt": "2"}\n{"id": "a", "prompt": "3"}\n'
                    b'not json\n')
    p0, p1 = tmp_path / "p0", tmp_path / "p1"
    p0.write_bytes(_rows("a") + _rows("a"))  # shard 0: lines 1 and 3 (same id, both answered)
    p1.write_bytes(error_row(4, "line 4: not valid JSON"))  # shard 1: lines 2 and 4; "b" missing
    with pytest.raises(HpcserveError, match="1 input rows have no output yet .first: line 2 .id b"):
        merge(inp, tmp_path / "m.jsonl", [str(p0), str(p1)])
    assert not (tmp_path / "m.jsonl").exists() and not (tmp_path / "m.jsonl.merging").exists()
    s = merge(inp, tmp_path / "m.jsonl", [str(p0), str(p1)], allow_missing=True)
    assert (s.rows, s.duplicates, s.missing, s.errors) == (2, 1, 1, 1)
    assert (tmp_path / "m.jsonl").read_bytes() == _rows("a") + error_row(4, "line 4: not valid JSON")
    with pytest.raises(HpcserveError, match="missing shard output"):
        merge_shards(inp, tmp_path / "m.jsonl", 2)


from hypothesis import given, strategies as st  # noqa: E402

from hpcserve.batch.io import row_key  # noqa: E402
from hpcserve.batch.rows import id_key  # noqa: E402


@given(st.one_of(st.text(max_size=20), st.integers(min_value=-10**12, max_value=10**12)), st.text(max_size=20))
def test_row_key_fast_path_agrees_with_json_for_any_id(row_id, text):
    assert row_key(ok_row(row_id, text, 1, 1, "stop", 0.1).rstrip(b"\n")) == (id_key(row_id), False)
    assert row_key(error_row(row_id, text).rstrip(b"\n")) == (id_key(row_id), True)
    assert row_key(b'{"id": %b, "text": "x"}' % orjson.dumps(row_id)) == (id_key(row_id), False)
