"""Data layer: tasks, worked solutions, corpus, tokenizer, token shards, SFT loading and packing."""

import json
import logging
import re
from collections import Counter
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from r1core.data import (
    IGNORE_INDEX,
    ChatFormat,
    PackedSFTDataset,
    Problem,
    SFTDoc,
    SFTExample,
    SkipStats,
    Tokenizer,
    TokenShardDataset,
    builtin_corpus,
    builtin_paragraphs,
    check_countdown,
    extract_boxed,
    generate,
    load_problems_jsonl,
    load_sft_jsonl,
    pack_row,
    positions_from_doc_ids,
    prepare,
    prepare_shards,
    split_of,
    tokenize_sft,
    worked_solution,
)
from r1core.data.solutions import pretrain_text

# ---------------------------------------------------------------------------------------------- tasks


def test_generate_is_a_pure_function_of_its_arguments():
    a = generate("arithmetic", 50, seed=3, digits=2, n_operands=3)
    b = generate("arithmetic", 50, seed=3, digits=2, n_operands=3)
    c = generate("arithmetic", 50, seed=4, digits=2, n_operands=3)
    assert a == b
    assert [p.prompt for p in a] != [p.prompt for p in c]


@pytest.mark.parametrize(
    "difficulty",
    [
        {"digits": 1},
        {"digits": 3, "n_operands": 2},
        {"digits": 2, "n_operands": 4},
        {"digits": 2, "ops": "*"},
    ],
)
def test_arithmetic_answers_match_python_evaluation(difficulty):
    for p in generate("arithmetic", 200, seed=0, **difficulty):
        assert re.fullmatch(r"[0-9+\-*]+=", p.prompt), p.prompt
        assert int(p.answer) == eval(p.prompt[:-1])  # the prompt is digits and + - * only (checked above)
        operands = [int(t) for t in re.findall(r"\d+", p.prompt)]
        assert all(len(str(x)) == difficulty["digits"] for x in operands)
        assert len(operands) == difficulty.get("n_operands", 2)


def test_equation_answers_solve_the_equation():
    for p in generate("equations", 300, seed=1, digits=2):
        a, sign, b, c = re.fullmatch(r"(\d+)\*x([+-])(\d+)=(-?\d+) x=", p.prompt).groups()
        x = int(p.answer)
        assert int(a) * x + (int(b) if sign == "+" else -int(b)) == int(c)
        assert -99 <= x <= 99


def test_countdown_gold_solution_uses_all_numbers_and_reaches_target():
    problems = generate("countdown", 200, seed=2, n_numbers=4, max_number=20, max_target=100)
    for p in problems:
        numbers, target = p.meta["numbers"], p.meta["target"]
        assert p.prompt == f"reach {target} with {' '.join(map(str, numbers))}:"
        assert p.answer == str(target) and 1 <= target <= 100 and target not in numbers
        assert check_countdown(p.meta["solution"], numbers, target, use_all=True)
        assert Fraction(eval(p.meta["solution"])) == target  # independent: Python's own evaluation


def test_train_and_test_splits_never_share_a_prompt():
    # 1-digit a+b has only 100 prompts, so a leak would certainly show.
    train = generate("arithmetic", 1000, seed=0, digits=1, ops="+")
    test = generate("arithmetic", 100, seed=0, split="test", digits=1, ops="+")
    train_prompts, test_prompts = {p.prompt for p in train}, {p.prompt for p in test}
    assert not train_prompts & test_prompts
    assert all(split_of(q) == "test" for q in test_prompts)
    everything = {f"{a}+{b}=" for a in range(10) for b in range(10)}
    assert train_prompts | test_prompts == everything  # 1000 + 100 draws cover the whole space
    assert len(test_prompts) == sum(split_of(q) == "test" for q in everything)


def test_split_hash_is_stable():
    # Changing the split function would silently move held-out problems into training data.
    held_out = [f"{a}+{b}=" for a in range(10) for b in range(10) if split_of(f"{a}+{b}=") == "test"]
    assert held_out == [
        "1+5=",
        "4+0=",
        "4+2=",
        "5+7=",
        "5+9=",
        "6+8=",
        "7+5=",
        "8+2=",
        "8+3=",
        "8+5=",
        "8+6=",
        "8+8=",
    ]
    assert (
        split_of("12+35=", test_fraction=1.0) == "test" and split_of("12+35=", test_fraction=0.0) == "train"
    )


def test_generate_unique_raises_when_the_problem_space_is_too_small():
    assert len({p.prompt for p in generate("arithmetic", 50, seed=0, unique=True, digits=1, ops="+")}) == 50
    with pytest.raises(ValueError, match="distinct"):
        generate("arithmetic", 200, seed=0, unique=True, digits=1, ops="+")


def test_unknown_task_or_knob_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown task"):
        generate("sudoku", 1, seed=0)
    with pytest.raises(ValueError, match="no difficulty knob"):
        generate("arithmetic", 1, seed=0, width=3)
    with pytest.raises(ValueError, match="digits"):
        generate("arithmetic", 1, seed=0, digits=0)


@pytest.mark.parametrize(
    "expr,numbers,target,use_all,ok",
    [
        ("(5+3-2)*4", [2, 3, 4, 5], 24, True, True),
        ("6*4", [6, 4, 1], 24, False, True),
        ("6*4", [6, 4, 1], 24, True, False),  # 1 unused
        ("3/(1/3)", [3, 1, 3], 9, True, True),  # exact rationals: floats would give 9.000000000000002
        (" ( 5 + 3 ) * 3 ", [5, 3, 3], "24", False, True),
        ("5*5", [5, 2], 25, False, False),  # 5 used twice
        ("24", [2, 12], 24, False, False),  # literal not among the numbers
        ("5*4+3", [3, 4, 5], 24, False, False),  # wrong value
        ("4/(3-3)", [3, 3, 4], 0, False, False),  # division by zero
        ("__import__('os').system('true')", [1], 1, False, False),
        ("(lambda: 1)()", [1], 1, False, False),
        ("2**300000000", [2, 300000000], 4, False, False),
        ("-2+26", [2, 26], 24, False, False),  # unary minus is not an allowed operator
        ("1.5*16", [16], 24, False, False),
        ("6 4", [6, 4], 24, False, False),
        ("(6*4", [6, 4], 24, False, False),
        ("+".join(["1"] * 200), [1] * 200, 200, False, False),  # over the length limit
        ("6*4", [6, 4], "twenty-four", False, False),
    ],
)
def test_check_countdown(expr, numbers, target, use_all, ok):
    assert check_countdown(expr, numbers, target, use_all=use_all) is ok


def test_check_countdown_rejects_non_strings():
    assert check_countdown(None, [1], 1) is False
    assert check_countdown(b"1", [1], 1) is False


# ---------------------------------------------------------------------------------------------- solutions


@pytest.mark.parametrize(
    "problem,expected",
    [
        (
            Problem("58+67=", "125", "arithmetic", {"operands": [58, 67], "ops": ["+"]}),
            "<think>\n8+7=15\n5+6+1=12\n58+67=125\n</think>\n\\boxed{125}",
        ),
        (
            Problem("23*45=", "1035", "arithmetic", {"operands": [23, 45], "ops": ["*"]}),
            "<think>\n23*40=920\n23*5=115\n920+115=1035\n</think>\n\\boxed{1035}",
        ),
        (
            Problem("7+8*9-6=", "73", "arithmetic", {"operands": [7, 8, 9, 6], "ops": ["+", "*", "-"]}),
            "<think>\n8*9=72\n7+2=9\n7+72=79\n79-6=73\n</think>\n\\boxed{73}",
        ),
        (
            Problem("3*x+5=20 x=", "5", "equations", {"a": 3, "b": 5, "c": 20, "x": 5}),
            "<think>\n3*x=20-5=15\nx=15/3=5\n</think>\n\\boxed{5}",
        ),
        (
            Problem("4*x-7=-15 x=", "-2", "equations", {"a": 4, "b": -7, "c": -15, "x": -2}),
            "<think>\n4*x=-15+7=-8\nx=-8/4=-2\n</think>\n\\boxed{-2}",
        ),
    ],
)
def test_worked_solution_hand_checked(problem, expected):
    assert worked_solution(problem) == expected
    assert pretrain_text(problem) == problem.prompt + " " + expected


def test_every_worked_step_is_true_and_boxed_answer_is_gold():
    problems = (
        generate("arithmetic", 100, seed=5, digits=2, n_operands=3)
        + generate("arithmetic", 100, seed=6, digits=3, ops="+*")
        + generate("equations", 100, seed=7, digits=2)
        + generate("countdown", 100, seed=8)
    )
    for p in problems:
        text = worked_solution(p)
        think = re.fullmatch(r"<think>\n(.*)\n</think>\n\\boxed\{(.*)\}", text, re.S)
        assert think, text
        boxed = think.group(2)
        if p.task == "countdown":
            assert check_countdown(boxed, p.meta["numbers"], p.answer, use_all=True)
        else:
            assert boxed == p.answer
        for line in think.group(1).split("\n"):
            if "x" in line:
                continue
            sides = [Fraction(eval(side)) for side in line.split("=")]  # digits and + - * / only
            assert len(set(sides)) == 1, line


def test_extract_boxed_takes_the_last_balanced_box():
    assert extract_boxed("so \\boxed{3} or rather \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert extract_boxed("\\boxed{ 42 }") == "42"
    assert extract_boxed("\\boxed{7} then \\boxed{unclosed") == "7"
    assert extract_boxed("no box here") is None


# ---------------------------------------------------------------------------------------------- corpus


def test_builtin_corpus_is_deterministic_mixed_and_train_split_only():
    docs = list(builtin_corpus(400, seed=1))
    assert docs == list(builtin_corpus(400, seed=1))
    assert docs != list(builtin_corpus(400, seed=2))
    worked = [d for d in docs if " <think>\n" in d]
    plain = [d for d in docs if d in builtin_paragraphs()]
    assert len(worked) + len(plain) == 400
    assert 0.7 < len(worked) / 400 < 0.9  # 80% worked solutions by the default mix
    assert {d.split(" <think>")[0][-1] for d in worked} == {"=", ":"}  # arithmetic/equations and countdown
    assert all(split_of(d.split(" <think>")[0]) == "train" for d in worked)
    assert len(builtin_paragraphs()) == 28


# ---------------------------------------------------------------------------------------------- tokenizer


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train_bpe(builtin_corpus(1500, seed=0), vocab_size=400)


def test_tokenizer_round_trips_text(tok):
    for text in [
        "12+35= <think>\n2+5=7\n</think>\n\\boxed{47}",
        "Héllo, wörld → 世界!\n\ttabs  and  spaces",
        "",
        "<|user|>hi<|assistant|><think>\nok</think><|eos|>",
    ]:
        assert tok.decode(tok.encode(text)) == text


def test_tokenizer_splits_every_digit(tok):
    ids = tok.encode("x=2024+1999")
    pieces = [tok.decode([i]) for i in ids]
    assert pieces[-9:] == ["2", "0", "2", "4", "+", "1", "9", "9", "9"]
    assert [tok.decode([i]) for i in tok.encode("1234567890")] == list("1234567890")


def test_tokenizer_special_and_think_tokens(tok):
    assert tok.vocab_size == 400 and tok.style == "r1core"
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == tuple(
        tok.token_to_id(t) for t in ("<|bos|>", "<|eos|>", "<|pad|>")
    )
    assert len({tok.bos_id, tok.eos_id, tok.pad_id}) == 3
    assert tok.encode("1", bos=True, eos=True) == [tok.bos_id, tok.token_to_id("1"), tok.eos_id]
    assert len(tok.encode("<think>")) == 1 and len(tok.encode("</think>")) == 1
    assert tok.decode(tok.encode("<|bos|><think>7</think><|eos|>"), skip_special=True) == "<think>7</think>"


def test_tokenizer_save_and_load_is_identical(tok, tmp_path):
    tok.save(tmp_path / "tok" / "tokenizer.json")
    loaded = Tokenizer.from_file(tmp_path / "tok")
    assert loaded.hash == tok.hash and loaded.style == "r1core"
    text = "reach 24 with 2 3 4 5: <think>\n5+3=8\n</think>\n\\boxed{(5+3-2)*4}"
    assert loaded.encode(text) == tok.encode(text)


def test_chat_format_r1core(tok):
    fmt = ChatFormat.for_tokenizer(tok)
    assert fmt.render_prompt("12+35=") == "<|bos|><|user|>12+35=<|assistant|><think>\n"
    assert fmt.render_prompt("q", system="S") == "<|bos|>S<|user|>q<|assistant|><think>\n"
    assert fmt.stop_ids == (tok.eos_id,)
    assert fmt.strip_think_prefix("<think>\n1</think>") == "1</think>"
    assert fmt.strip_think_prefix("<think> 1</think>") == "1</think>"
    assert fmt.strip_think_prefix("1</think>") == "1</think>"
    assert fmt.full_response("1</think> \\boxed{1}") == "<think>\n1</think> \\boxed{1}"
    plain = ChatFormat.for_tokenizer(tok, think_prefix="")
    assert plain.render_prompt("1+1=") == "<|bos|><|user|>1+1=<|assistant|>"
    assert plain.strip_think_prefix("<think>\nx") == "<think>\nx"


def test_chat_format_detects_deepseek_template(tmp_path):
    specials = [
        "<｜begin▁of▁sentence｜>",
        "<｜end▁of▁sentence｜>",
        "<｜User｜>",
        "<｜Assistant｜>",
    ]  # no pad token
    Tokenizer.train_bpe(builtin_corpus(200, seed=0), 300, special_tokens=specials).save(
        tmp_path / "tokenizer.json"
    )
    ds = Tokenizer.from_file(tmp_path / "tokenizer.json")
    assert ds.style == "deepseek"
    assert ds.pad_id == ds.eos_id == ds.token_to_id("<｜end▁of▁sentence｜>")
    fmt = ChatFormat.for_tokenizer(ds)
    assert fmt.render_prompt("1+1=") == "<｜begin▁of▁sentence｜><｜User｜>1+1=<｜Assistant｜><think>\n"
    assert fmt.stop_ids == (ds.eos_id,)


def test_unknown_template_reads_tokenizer_config_and_refuses_chat(tmp_path):
    Tokenizer.train_bpe(builtin_corpus(200, seed=0), 300, special_tokens=["<s>", "</s>"]).save(
        tmp_path / "tokenizer.json"
    )
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}})
    )
    other = Tokenizer.from_file(tmp_path)
    assert other.style == "plain" and other.eos_id == other.token_to_id("</s>") and other.bos_id == 0
    with pytest.raises(ValueError, match="chat tokens"):
        ChatFormat.for_tokenizer(other)
    assert other.pad_id == other.eos_id  # no pad token: padding reuses EOS (labels mask it anyway)
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(KeyError, match="no eos token"):
        Tokenizer.from_file(tmp_path).eos_id


# ---------------------------------------------------------------------------------------------- shards


def test_shard_windows_hand_checked(tok, tmp_path):
    # Digits are single tokens, so these documents are 1, 2, 3 and 4 tokens long (+ EOS each).
    prepare_shards(["1", "23", "456", "7890"], tmp_path, tok, progress=False)
    index = json.loads((tmp_path / "shard_00000.json").read_text())
    assert (index["n_tokens"], index["doc_ends"], index["dtype"]) == (14, [2, 5, 9, 14], "uint16")
    assert index["tokenizer_hash"] == tok.hash
    d = {c: tok.token_to_id(c) for c in "0123456789"}
    E, X = tok.eos_id, IGNORE_INDEX
    assert np.fromfile(tmp_path / "shard_00000.bin", dtype=np.uint16).tolist() == [
        d["1"],
        E,
        d["2"],
        d["3"],
        E,
        d["4"],
        d["5"],
        d["6"],
        E,
        d["7"],
        d["8"],
        d["9"],
        d["0"],
        E,
    ]
    ds = TokenShardDataset(tmp_path, seq_len=4, shuffle=False, loop=False)
    got = [tuple(t.tolist() for t in w) for w in ds]
    assert got == [
        ([d["1"], E, d["2"], d["3"]], [E, X, d["3"], E], [0, 0, 1, 1]),
        ([E, d["4"], d["5"], d["6"]], [X, d["5"], d["6"], E], [0, 1, 1, 1]),
        ([E, d["7"], d["8"], d["9"]], [X, d["8"], d["9"], d["0"]], [0, 1, 1, 1]),
    ]


def test_no_window_target_crosses_a_document(tok, tmp_path):
    paths = prepare_shards(
        list(builtin_corpus(300, seed=3)), tmp_path, tok, max_shard_tokens=3000, progress=False
    )
    assert len(paths) > 3
    for p in paths:  # documents never straddle shards
        assert np.fromfile(p, dtype=np.uint16)[-1] == tok.eos_id
    ds = TokenShardDataset(tmp_path, seq_len=48, seed=0, loop=False)
    n = 0
    for w in ds:
        n += 1
        t, y, doc = w
        # the builtin corpus never contains the EOS text, so EOS marks exactly the document ends
        assert torch.equal(y == IGNORE_INDEX, t == tok.eos_id)
        keep = y[:-1] != IGNORE_INDEX
        assert torch.equal(y[:-1][keep], t[1:][keep])
        assert torch.equal(doc[1:] - doc[:-1], (t[:-1] == tok.eos_id).long())
    assert n == len(ds) == sum((len(np.fromfile(p, dtype=np.uint16)) - 1) // 48 for p in paths)


def test_prepare_failure_leaves_no_file(tok, tmp_path):
    def docs():
        yield from builtin_corpus(200, seed=0)
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare_shards(docs(), tmp_path / "out", tok, max_shard_tokens=500, batch_docs=16, progress=False)
    assert list((tmp_path / "out").iterdir()) == []


def test_prepare_refuses_to_mix_with_existing_shards(tok, tmp_path):
    prepare_shards(["12", "34"], tmp_path, tok, progress=False)
    with pytest.raises(FileExistsError):
        prepare_shards(["56"], tmp_path, tok, progress=False)
    prepare_shards(["56", "78", "90"], tmp_path, tok, overwrite=True, progress=False)
    assert json.loads((tmp_path / "shard_00000.json").read_text())["doc_ends"] == [3, 6, 9]


def test_shards_from_jsonl_count_bad_lines(tok, tmp_path, caplog):
    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "12"}\n{"text": \n{"body": "x"}\n{"text": 5}\n\n{"text": "345"}\n')
    with caplog.at_level(logging.WARNING):
        prepare([src], tmp_path / "out", tok, progress=False)
    assert json.loads((tmp_path / "out" / "shard_00000.json").read_text())["doc_ends"] == [3, 7]
    assert f"{src}:2" in caplog.text and f"{src}:4" in caplog.text
    assert "kept 2, skipped 3 (bad JSON: 1, missing field: 1, non-string field: 1)" in caplog.text
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n{"body": "y"}\n')
    with pytest.raises(ValueError, match=re.escape(f"{bad}:1: missing field")):
        prepare([bad], tmp_path / "out2", tok, progress=False)


@pytest.fixture(scope="module")
def shard_dir(tok, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    prepare_shards(list(builtin_corpus(60, seed=4)), out, tok, max_shard_tokens=800, progress=False)
    return out


def test_shard_dataset_resume_gives_identical_continuation(shard_dir):
    ds = TokenShardDataset(shard_dir, seq_len=16, seed=7)
    it = iter(ds)
    k = len(ds) + 5  # resume point in the second epoch
    for _ in range(k):
        next(it)
    state = ds.state_dict()
    reference = [next(it) for _ in range(len(ds) + 3)]  # runs into the third epoch
    resumed = TokenShardDataset(shard_dir, seq_len=16, seed=7)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON
    assert state["epoch"] == 1 and state["pos"] == 5
    for a, b in zip(reference, iter(resumed)):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(ds.order(0), ds.order(1))  # each epoch reshuffles


def test_shard_dataset_dp_ranks_partition_windows(shard_dir):
    full = TokenShardDataset(shard_dir, seq_len=16, seed=1)
    ranks = [TokenShardDataset(shard_dir, seq_len=16, seed=1, dp_rank=r, dp_size=3) for r in range(3)]
    orders = [set(r.order(0).tolist()) for r in ranks]
    assert all(len(o) == full.n_windows // 3 for o in orders)
    assert set.union(*orders) == set(full.order(0)[: 3 * (full.n_windows // 3)].tolist())
    assert sum(map(len, orders)) == len(set.union(*orders))
    with pytest.raises(ValueError, match="dp_size"):
        ranks[0].load_state_dict(TokenShardDataset(shard_dir, seq_len=16, seed=1, dp_size=2).state_dict())


def test_shard_dataset_batches_and_tokenizer_check(shard_dir, tok):
    ds = TokenShardDataset(shard_dir, seq_len=16, seed=0, loop=False, tokenizer_hash=tok.hash)
    batches = list(ds.batches(4))
    assert len(batches) == len(ds) // 4 and batches[0].tokens.shape == (4, 16)
    with pytest.raises(ValueError, match="different tokenizer"):
        TokenShardDataset(shard_dir, seq_len=16, tokenizer_hash="0" * 64)


def test_positions_restart_per_document():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [0, 1, 1, 1, 1, 1, 2, 3]])
    assert positions_from_doc_ids(doc_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], [0, 0, 1, 2, 3, 4, 0, 0]]


# ---------------------------------------------------------------------------------------------- SFT

SFT_LINES = [
    '{"prompt": "p1", "response": "r1"}',
    '{"problem": "p2", "solution": "r2", "answer": "short"}',
    '{"question": "p3", "answer": "r3"}',
    '{"question": "p4", "completion": "r4", "system": "s4"}',
    '{"messages": [{"role": "system", "content": "s5"}, {"role": "user", "content": "old"},'
    ' {"role": "assistant", "content": "old answer"}, {"role": "user", "content": "p5"},'
    ' {"role": "assistant", "content": "r5"}]}',
    '{"conversations": [{"from": "human", "value": "p6"}, {"from": "gpt", "value": "r6"}]}',
    '{"prompt": "p7", "response": "r7"',  # 7: bad JSON
    '["prompt", "response"]',  # 8: not an object
    '{"prompt": "p9"}',  # 9: missing response
    '{"prompt": "p10", "answer": 10}',  # 10: non-string
    '{"prompt": "  ", "answer": "r11"}',  # 11: empty
    '{"messages": [{"role": "user", "content": "p12"}]}',  # 12: no assistant turn
    '{"messages": [{"role": "user"}, {"role": "assistant", "content": "r13"}]}',  # 13: bad turn
]


def test_sft_jsonl_shapes_and_malformed_lines_counted(tmp_path, caplog):
    path = tmp_path / "sft.jsonl"
    path.write_text("\n".join(SFT_LINES) + "\n")
    stats = SkipStats()
    with caplog.at_level(logging.WARNING):
        examples = load_sft_jsonl(path, stats)
    assert examples == [
        SFTExample("p1", "r1"),
        SFTExample("p2", "r2"),
        SFTExample("p3", "r3"),
        SFTExample("p4", "r4", "s4"),
        SFTExample("p5", "r5", "s5"),
        SFTExample("p6", "r6"),
    ]
    assert stats.kept == 6
    assert stats.skipped == Counter(
        {
            "bad JSON": 1,
            "not an object": 1,
            "missing field": 1,
            "non-string field": 1,
            "empty field": 1,
            "bad chat": 2,
        }
    )
    for line in (7, 8, 9, 10, 11):  # the first five skips are logged with file:line
        assert f"{path}:{line}" in caplog.text
    only_bad = tmp_path / "bad.jsonl"
    only_bad.write_text("\n".join(SFT_LINES[6:]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{only_bad}:1: bad JSON")):
        load_sft_jsonl(only_bad)


def test_pack_row_hand_checked():
    docs = [SFTDoc(np.array([10, 11, 12, 13]), n_prompt=2), SFTDoc(np.array([20, 21, 22]), n_prompt=1)]
    row = pack_row(docs, seq_len=10, pad_id=0)
    X = IGNORE_INDEX
    assert row.tokens.tolist() == [10, 11, 12, 13, 20, 21, 22, 0, 0, 0]
    assert row.labels.tolist() == [X, 12, 13, X, 21, 22, X, X, X, X]
    assert row.doc_ids.tolist() == [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert row.positions.tolist() == [0, 1, 2, 3, 0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="do not fit"):
        pack_row(docs, seq_len=6, pad_id=0)


def test_tokenize_sft_masks_the_prompt_and_ends_with_stop(tok):
    fmt = ChatFormat.for_tokenizer(tok)
    examples = [
        SFTExample("1+2=", "<think>\n1+2=3\n</think>\n\\boxed{3}"),
        SFTExample("9+9=", "1" * 40),
        SFTExample("7" * 30, "x"),
    ]
    docs = tokenize_sft(examples, tok, fmt, max_len=32)
    assert len(docs) == 2  # the third prompt alone exceeds 32 tokens
    ids, n_prompt = docs[0]
    assert tok.decode(ids[:n_prompt]) == "<|bos|><|user|>1+2=<|assistant|><think>\n"
    assert tok.decode(ids[n_prompt:]) == "1+2=3\n</think>\n\\boxed{3}<|eos|>"
    row = pack_row(docs[:1], seq_len=32, pad_id=tok.pad_id)
    targets = row.labels[row.labels != IGNORE_INDEX].tolist()
    assert targets == ids[n_prompt:].tolist()  # exactly the response and its stop token are learned
    assert len(docs[1].ids) == 32 and docs[1].ids[-1] != tok.eos_id  # truncated response


def test_packed_sft_keeps_documents_whole_and_resumes(tok):
    rng = np.random.default_rng(0)
    docs = [
        SFTDoc(np.arange(100 * i, 100 * i + n), int(rng.integers(1, n)))
        for i, n in enumerate(rng.integers(3, 12, size=40))
    ]
    ds = PackedSFTDataset(docs, seq_len=24, pad_id=-1, seed=3, loop=False)
    seen = []
    for row in ds:
        for d in row.doc_ids.unique().tolist():
            toks = row.tokens[row.doc_ids == d]
            if toks[0] == -1:
                continue  # padding
            i = int(toks[0]) // 100
            assert toks.tolist() == docs[i].ids.tolist()  # whole and in order
            assert row.positions[row.doc_ids == d].tolist() == list(range(len(docs[i].ids)))
            seen.append(i)
    assert sorted(seen) == list(range(40))
    assert seen == ds.order(0).tolist()  # rows follow the epoch's shuffled order

    ds = PackedSFTDataset(docs, seq_len=24, pad_id=-1, seed=3)
    it = iter(ds)
    for _ in range(30):
        next(it)
    state = ds.state_dict()
    reference = [next(it) for _ in range(20)]
    resumed = PackedSFTDataset(docs, seq_len=24, pad_id=-1, seed=3)
    resumed.load_state_dict(state)
    assert all(all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(reference, iter(resumed)))
    ranks = [
        set(PackedSFTDataset(docs, 24, -1, seed=3, dp_rank=r, dp_size=4).order(0).tolist()) for r in range(4)
    ]
    assert sum(map(len, ranks)) == 40 and set.union(*ranks) == set(range(40))


def test_resumable_iterators_load_states_in_the_layout_earlier_versions_saved(shard_dir):
    """Checkpoints written before the iterators shared a base (EpochCursor) hold these literal dicts;
    they still resume at the same item, and a state that lacks a setting fails naming it."""
    from r1core.rl.trainer import PromptSampler

    problems = [Problem(prompt=str(i), answer=str(i), task="arithmetic") for i in range(5)]
    sampler = PromptSampler(problems, seed=3)
    first_epoch = sampler.take(5)
    assert sampler.state_dict() == {"epoch": 1, "pos": 0, "seed": 3, "n": 5}  # a finished epoch: the next one
    expected = sampler.take(7)
    resumed = PromptSampler(problems, seed=3)
    resumed.load_state_dict({"epoch": 1, "pos": 0, "seed": 3, "n": 5})
    assert resumed.take(7) == expected and sorted(p.prompt for p in first_epoch) == [str(i) for i in range(5)]
    with pytest.raises(ValueError, match="cannot resume the prompt order: n is 4 here, 5 in the state"):
        PromptSampler(problems[:4], seed=3).load_state_dict({"epoch": 1, "pos": 0, "seed": 3, "n": 5})

    ds = TokenShardDataset(shard_dir, seq_len=16, seed=7)
    old = {
        "epoch": 1,
        "pos": 2,
        "seed": 7,
        "seq_len": 16,
        "dp_rank": 0,
        "dp_size": 1,
        "n_windows": ds.n_windows,
    }
    ds.load_state_dict(old)
    assert ds.state_dict() == old
    assert torch.equal(next(iter(ds)).tokens, ds.window(int(ds.order(1)[2])).tokens)
    with pytest.raises(ValueError, match="cannot resume: n_windows is .* here, None in the state"):
        ds.load_state_dict({k: v for k, v in old.items() if k != "n_windows"})

    docs = [SFTDoc(np.arange(10 * i, 10 * i + 4), 1) for i in range(6)]
    sft = PackedSFTDataset(docs, seq_len=8, pad_id=-1, seed=1)
    old = {"epoch": 0, "pos": 4, "seed": 1, "seq_len": 8, "dp_rank": 0, "dp_size": 1, "n_docs": 6}
    sft.load_state_dict(old)
    assert sft.state_dict() == old
    row = next(iter(sft))  # two 4-token documents per row: the 5th and 6th of epoch 0
    assert row.tokens.tolist() == [*docs[sft.order(0)[4]].ids, *docs[sft.order(0)[5]].ids]


def test_load_problems_jsonl(tmp_path):
    path = tmp_path / "rl.jsonl"
    path.write_text(
        "\n".join(
            [
                '{"prompt": "1+1=", "answer": "2"}',
                '{"problem": "half?", "solution": "so \\\\boxed{\\\\frac{1}{2}}"}',
                '{"question": "gsm", "answer": "work\\n#### 72"}',
                '{"question": "int", "answer": 7, "task": "countdown", "numbers": [3, 4]}',
                '{"question": "none", "solution": "no box"}',
                '{"question": "missing"}',
            ]
        )
        + "\n"
    )
    stats = SkipStats()
    problems = load_problems_jsonl(path, stats=stats)
    assert [(p.prompt, p.answer, p.task) for p in problems] == [
        ("1+1=", "2", "math"),
        ("half?", "\\frac{1}{2}", "math"),
        ("gsm", "72", "math"),
        ("int", "7", "countdown"),
    ]
    assert problems[3].meta == {"numbers": [3, 4], "source": f"{path}:4"}
    assert stats.skipped == Counter({"no answer": 1, "missing field": 1})


def test_data_layer_never_imports_the_model():
    import ast as python_ast

    import r1core.data

    for path in Path(r1core.data.__file__).parent.glob("*.py"):
        for node in python_ast.walk(python_ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, python_ast.Import)
                else [node.module or ""]
                if isinstance(node, python_ast.ImportFrom)
                else []
            )
            assert not any(n.startswith("r1core.model") for n in names), f"{path.name} imports {names}"


def test_shard_dtype_widens_past_uint16():
    from r1core.data.shards import shard_dtype

    assert (
        shard_dtype(65536) == np.uint16
        and shard_dtype(65537) == np.uint32
        and shard_dtype(129280) == np.uint32
    )
