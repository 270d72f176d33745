"""The JSONL reader: every kind of bad row is named with file:line and counted; good rows pass."""
import json

import pytest

from rega_engine.data.records import (
    WARN_FIRST,
    DataError,
    RowStats,
    read_instructions,
    read_samples,
)

KNOWN = ["general", "law", "medicine"]
GOOD = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
        "domain": "law"}


def user(text="q"):
    return {"role": "user", "content": text}


def assistant(text="a"):
    return {"role": "assistant", "content": text}


def write(tmp_path, lines, name="law.jsonl"):
    path = tmp_path / name
    with open(path, "wb") as f:
        for line in lines:
            f.write((line if isinstance(line, bytes) else
                     (line if isinstance(line, str) else json.dumps(line)).encode()) + b"\n")
    return str(path)


BAD_ROWS = [
    ("bad JSON", '{"messages": [', "invalid JSON"),
    ("bad JSON", b'{"messages": "\xff"}', "not valid UTF-8"),
    ("not an object", "[1, 2]", "expected a JSON object, got list"),
    ("missing messages", {"domain": "law"}, "no 'messages' field"),
    ("missing messages", {"messages": "hi"}, "'messages' must be a list"),
    ("missing messages", {"messages": []}, "'messages' is empty"),
    ("wrong type", {"messages": ["hi"]}, "messages[0] must be an object"),
    ("wrong type", {"messages": [{"role": 1, "content": "q"}, assistant()]},
     "messages[0].role must be a string"),
    ("wrong type", {"messages": [user(), {"role": "assistant", "content": ["a"]}]},
     "messages[1].content must be a string"),
    ("unknown role", {"messages": [{"role": "tool", "content": "x"}, assistant()]},
     "messages[0].role 'tool'"),
    ("missing assistant turn", {"messages": [user()]}, "no assistant turn"),
    ("missing assistant turn", {"messages": [user(), assistant(), user()]},
     "the last turn is 'user'"),
    ("empty assistant turn", {"messages": [user(), assistant("  ")]},
     "messages[1] is an empty assistant turn"),
    ("empty assistant turn", {"messages": [user(), assistant(""), user(), assistant()]},
     "messages[1]"),
    ("unknown domain", {**GOOD, "domain": "finance"}, "domain 'finance' has no role prompt"),
    ("domain mismatch", {**GOOD, "domain": "medicine"},
     "disagrees with the source this file is listed under (data.domains.law)"),
    ("domain mismatch", {**GOOD, "domain": None, "distilled": True},
     "distilled (general) exemplar listed under"),
    ("wrong type", {**GOOD, "distilled": "yes"}, "'distilled' must be true or false"),
    ("wrong type", {**GOOD, "domain": 3}, "'domain' must be a string"),
]


@pytest.mark.parametrize("reason,row,message", BAD_ROWS, ids=[f"{r}-{m[:24]}"
                                                              for r, _, m in BAD_ROWS])
def test_each_bad_row_raises_its_named_error_with_path_and_line(tmp_path, reason, row, message):
    path = write(tmp_path, [GOOD, "", row, GOOD])
    with pytest.raises(DataError) as info:
        list(read_samples(path, source="law", known_domains=KNOWN, bad_rows="error"))
    assert str(info.value).startswith(f"{path}:3: ")
    assert message in str(info.value)
    assert (info.value.reason, info.value.path, info.value.line) == (reason, path, 3)


def test_skip_policy_keeps_good_rows_counts_bad_ones_by_reason_and_warns_first_few(tmp_path,
                                                                                    capsys):
    bad = [row for reason, row, _ in BAD_ROWS]
    path = write(tmp_path, [GOOD, "   ", *bad, "", GOOD])
    stats = RowStats()
    records = list(read_samples(path, source="law", known_domains=KNOWN, stats=stats))
    assert [r.line for r in records] == [1, len(bad) + 4]
    assert records[0].origin == f"{path}:1"
    assert stats.files[path] == {"read": len(bad) + 2, "blank": 2, "kept": 2, "rejected": len(bad)}
    expected = {}
    for reason, _, _ in BAD_ROWS:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(stats.rejected) == expected
    warnings = capsys.readouterr().err.splitlines()   # the package's log lines go to stderr
    assert len(warnings) == WARN_FIRST
    assert warnings[0].startswith(f"{path}:3: ") and "row skipped" in warnings[0]


def test_good_rows_multi_turn_with_system_and_general_domain(tmp_path):
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, user("q1"), assistant("a1"),
                      user("q2"),
                      assistant("a2")], "domain": "law", "extra": {"ignored": True}},
        {"messages": [{**user(), "name": "x"}, assistant()]},
    ]
    records = list(read_samples(write(tmp_path, rows), source="law", known_domains=KNOWN))
    assert [m["role"] for m in records[0].messages] == ["system", "user", "assistant", "user",
                                                        "assistant"]
    assert records[1].messages == (user(), assistant())   # only role and content are kept
    assert records[1].domain is None and not records[1].distilled
    general = write(tmp_path, [{**GOOD, "domain": "general", "distilled": True}, {**GOOD,
        "domain": None}], "g.jsonl")
    records = list(read_samples(general, source="general", known_domains=KNOWN, bad_rows="error"))
    assert [r.distilled for r in records] == [True, False]


def test_read_instructions_wants_rows_ending_with_the_user_turn(tmp_path):
    path = write(tmp_path, [{"messages": [{"role": "system", "content": "s"}, user("Say hi")]},
                            {"messages": [user(), assistant()]}], "instructions.jsonl")
    stats = RowStats()
    records = list(read_instructions(path, stats=stats))
    assert [r.messages[-1]["content"] for r in records] == ["Say hi"]
    assert dict(stats.rejected) == {"not an instruction": 1}
    with pytest.raises(DataError, match=r"instructions.jsonl:2: the last turn is 'assistant'"):
        list(read_instructions(path, bad_rows="error"))


def test_missing_file_and_bad_policy_fail_before_reading(tmp_path):
    with pytest.raises(DataError,
                       match=r"nope.jsonl: file not found \(listed as data.domains.law\)"):
        read_samples(tmp_path / "nope.jsonl", source="law", known_domains=KNOWN)
    with pytest.raises(ValueError, match="data.bad_rows = 'ignore'"):
        read_samples(write(tmp_path, [GOOD]), source="law", bad_rows="ignore")
