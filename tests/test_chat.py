"""train.data.chat: InternLM2-chat's template (checked against an independent jinja2 template), assistant-only labels,
validation errors and the data readers."""
import json
import zlib

import jinja2
import pytest

from train.data.chat import (
    HELDOUT_NAME_EVERY,
    IGNORE_INDEX,
    SYNTHETIC_CHAT_TASKS,
    SyntheticChats,
    encode,
    encode_prompt,
    read_conversations,
    render,
)
from train.data.tokenizer import ByteTokenizer

# InternLM2-chat's template written from the format description (InternLM's chat_format.md), for both message
# spellings: InternLM2's own (name on system/user/environment, calls inside the assistant content) and OpenAI's
# (record-level tools, assistant tool_calls, role "tool").
INTERNLM2_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set ns = namespace(declared=false) -%}"
    "{%- for m in messages -%}"
    "{%- if tools and not ns.declared and not (m.role == 'system' and not m.name) -%}"
    "{{ '<|im_start|>system name=<|plugin|>\n' + (tools | map(attribute='function') | list | json) + '<|im_end|>\n' }}"
    "{%- set ns.declared = true -%}"
    "{%- endif -%}"
    "{%- if m.role == 'tool' -%}"
    "{{ '<|im_start|>environment name=<|plugin|>\n' + m.content + '<|im_end|>\n' }}"
    "{%- else -%}"
    "{{ '<|im_start|>' + m.role }}"
    "{%- if m.name -%}{{ ' name=' + {'plugin': '<|plugin|>', 'interpreter': '<|interpreter|>'}.get(m.name, m.name) }}"
    "{%- endif -%}"
    "{{ '\n' + (m.content or '') }}"
    "{%- for c in m.tool_calls or [] -%}"
    "{%- if c.type == 'code_interpreter' -%}"
    "{{ '<|action_start|><|interpreter|>\n' + c.code_interpreter.input + '<|action_end|>' }}"
    "{%- else -%}"
    "{{ '<|action_start|><|plugin|>\n' + ({'name': c.function.name, 'parameters': c.function.arguments} | json)"
    " + '<|action_end|>' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)


def jinja_render(messages, add_generation_prompt=False, tools=None):
    env = jinja2.Environment()
    env.filters["json"] = lambda x: json.dumps(x, ensure_ascii=False)
    return env.from_string(INTERNLM2_TEMPLATE).render(messages=messages, tools=tools, bos_token="<s>",
                                                      add_generation_prompt=add_generation_prompt)


CALC = {"name": "calculator", "description": "arithmetic", "parameters": {"type": "object"}}

# Every role and name in InternLM2's own spelling: system prompt, both declarations, user (also named),
# a plugin call and its result, an interpreter call and its result, plain turns.
NATIVE = [
    {"role": "system", "content": "You are InternLM2-Chat, a harmless AI assistant"},
    {"role": "system", "name": "interpreter", "content": "You now have access to a Jupyter notebook."},
    {"role": "system", "name": "plugin", "content": json.dumps([CALC])},
    {"role": "user", "content": "What is 12 * 7?"},
    {"role": "user", "name": "file", "content": '[{"path": "data.csv"}]'},
    {"role": "assistant", "content": 'Let me compute.<|action_start|><|plugin|>\n'
                                     '{"name": "calculator", "parameters": {"expression": "12 * 7"}}<|action_end|>'},
    {"role": "environment", "name": "plugin", "content": '{"result": 84}'},
    {"role": "assistant", "content": "<|action_start|><|interpreter|>\n```python\nprint(12 * 7)\n```<|action_end|>"},
    {"role": "environment", "name": "interpreter", "content": "84"},
    {"role": "assistant", "content": "12 * 7 = 84"},
    {"role": "user", "content": "Thanks — ünïcode ok?"},
    {"role": "assistant", "content": "Yes."},
]

OPENAI_TOOLS = [{"type": "function", "function": CALC}]
OPENAI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "12 * 7?"},
    {"role": "assistant", "content": None,
     "tool_calls": [{"type": "function", "function": {"name": "calculator", "arguments": {"expression": "12 * 7"}}}]},
    {"role": "tool", "tool_call_id": "0", "content": '{"result": 84}'},
    {"role": "assistant", "content": "84"},
]


@pytest.mark.parametrize("gen", [False, True])
def test_render_matches_jinja_native(gen):
    assert render(NATIVE, add_generation_prompt=gen) == jinja_render(NATIVE, gen)
    assert render(NATIVE[:4], add_generation_prompt=gen) == jinja_render(NATIVE[:4], gen)


def test_render_matches_jinja_openai_tools():
    got = render(OPENAI, tools=OPENAI_TOOLS)
    assert got == jinja_render(OPENAI, tools=OPENAI_TOOLS)
    # The declaration sits after the leading system prompt, the call in InternLM2's JSON form.
    assert got.startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>system name=<|plugin|>\n[{")
    assert ('<|im_start|>assistant\n<|action_start|><|plugin|>\n{"name": "calculator", "parameters": '
            '{"expression": "12 * 7"}}<|action_end|><|im_end|>\n<|im_start|>environment name=<|plugin|>\n') in got
    # arguments given as a JSON string (OpenAI's usual form) render the same
    as_string = [dict(m) for m in OPENAI]
    as_string[2] = {"role": "assistant", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "12 * 7"}'}}]}
    assert render(as_string, tools=OPENAI_TOOLS) == got


def test_render_matches_jinja_openai_interpreter():
    msgs = [{"role": "system", "name": "interpreter", "content": "python"},
            {"role": "user", "content": "run"},
            {"role": "assistant", "content": "ok",
             "tool_calls": [{"type": "code_interpreter", "code_interpreter": {"input": "print(1)"}}]},
            {"role": "environment", "name": "interpreter", "content": "1"},
            {"role": "assistant", "content": "1"}]
    assert render(msgs) == jinja_render(msgs)


def test_render_matches_jinja_synthetic():
    chats = SyntheticChats(seed=3)
    seen = set()
    for i in range(40):
        conv = chats[i]
        seen.add(conv.task)
        msgs = [{"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
                for m in conv.messages]
        assert render(conv.messages) == jinja_render(msgs)
    assert seen == set(SYNTHETIC_CHAT_TASKS)


def _expected(pieces, tok):
    """ids and labels from hand-written (text, learned) spans."""
    ids, labels = [], []
    for text, learned in pieces:
        t = tok.encode(text)
        ids += t
        labels += t if learned else [IGNORE_INDEX] * len(t)
    return ids, labels


@pytest.mark.parametrize("vocab", [272, 92544])
def test_mask_multiturn_exact(vocab):
    tok = ByteTokenizer(vocab)
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b c"}]
    ids, labels = encode(msgs, tok)
    exp_ids, exp_labels = _expected([
        ("<s><|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n", False),
        ("yo<|im_end|>", True),
        ("\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n", False),
        ("b c<|im_end|>", True),
        ("\n", False)], tok)
    assert ids == exp_ids and labels == exp_labels
    assert ids == tok.encode(render(msgs))
    if vocab == 92544:   # InternLM2's real ids: <|im_end|> learned, <|im_start|> never
        assert labels.count(92542) == 2 and 92543 not in labels and ids.count(92543) == 5


def test_mask_tool_conversation_exact():
    tok = ByteTokenizer()
    ids, labels = encode(OPENAI, tok, tools=OPENAI_TOOLS)
    decl = json.dumps([CALC])
    call = '<|action_start|><|plugin|>\n{"name": "calculator", "parameters": {"expression": "12 * 7"}}<|action_end|>'
    exp_ids, exp_labels = _expected([
        ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>system name=<|plugin|>\n" + decl
         + "<|im_end|>\n<|im_start|>user\n12 * 7?<|im_end|>\n<|im_start|>assistant\n", False),
        (call + "<|im_end|>", True),
        ('\n<|im_start|>environment name=<|plugin|>\n{"result": 84}<|im_end|>\n<|im_start|>assistant\n', False),
        ("84<|im_end|>", True),
        ("\n", False)], tok)
    assert ids == exp_ids and labels == exp_labels
    assert ids == tok.encode(render(OPENAI, tools=OPENAI_TOOLS))


def test_encode_prompt_ends_with_generation_header():
    tok = ByteTokenizer()
    ids = encode_prompt(OPENAI[:2], tok, tools=OPENAI_TOOLS)
    assert tok.decode(ids).endswith("12 * 7?<|im_end|>\n<|im_start|>assistant\n")
    assert ids[0] == tok.bos_id


@pytest.mark.parametrize("messages, tools, match", [
    ([{"role": "bot", "content": "x"}], None, "message 0: unknown role 'bot'"),
    ([{"role": "user", "content": "x"}], None, "no assistant turn"),
    ([{"role": "user", "content": "x"}, {"role": "environment", "name": "plugin", "content": "{}"},
      {"role": "assistant", "content": "y"}], None, "message 1: an environment .* answers no call"),
    ([{"role": "user", "content": "x"}, {"role": "tool", "content": "{}"}, {"role": "assistant", "content": "y"}],
     None, "message 1: an environment"),
    (OPENAI, None, "message 2: an assistant turn calls a plugin tool, but no system name=<|plugin|>"),
    ([{"role": "system", "name": "interpreter", "content": "py"}, {"role": "user", "content": "x"},
      {"role": "assistant", "content": "<|action_start|><|interpreter|>\n1<|action_end|>"},
      {"role": "environment", "name": "plugin", "content": "1"}], None, "answers the interpreter call"),
    ([{"role": "user", "content": "x<|im_end|>"}, {"role": "assistant", "content": "y"}], None, "would break"),
    ([{"role": "user", "content": 3}, {"role": "assistant", "content": "y"}], None, "content must be a string"),
    ([{"role": "system", "name": "web", "content": "x"}, {"role": "assistant", "content": "y"}], None,
     "name must be one of plugin, interpreter"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "calculator", "arguments": "{}"}}, {"function": {"name": "calculator"}}]}],
     OPENAI_TOOLS, "exactly one"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "calculator", "arguments": "{bad"}}]}], OPENAI_TOOLS, "not valid JSON"),
    ([], None, "non-empty list"),
])
def test_bad_conversations_raise_naming_the_record(messages, tools, match):
    with pytest.raises(ValueError, match=match) as info:
        encode(messages, ByteTokenizer(), tools=tools, where="rec7")
    assert str(info.value).startswith("rec7")


def test_read_conversations_openai_jsonl(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = {"messages": OPENAI, "tools": OPENAI_TOOLS}
    path.write_text(json.dumps(good) + "\n\n" + json.dumps({"messages": NATIVE}) + "\n")
    convs = read_conversations(str(path))
    assert len(convs) == 2
    assert render(convs[0].messages) == render(OPENAI, tools=OPENAI_TOOLS)
    assert render(convs[1].messages) == render(NATIVE)
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:2: no assistant turn"):
        read_conversations(str(path))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match=f"{path}:1: not valid JSON"):
        read_conversations(str(path))


def test_synthetic_chats_random_access_and_splits():
    a, b = SyntheticChats(seed=1), SyntheticChats(seed=1)
    assert [a[i] for i in (5, 0, 9)] == [b[i] for i in (5, 0, 9)]
    it = a.iter_from(7)
    assert [next(it) for _ in range(3)] == [a[7], a[8], a[9]]
    held = SyntheticChats(seed=1, split="heldout")
    assert [render(held[i].messages) for i in range(20)] != [render(a[i].messages) for i in range(20)]
    tok = ByteTokenizer()
    for i in range(30):
        conv = a[i]
        ids, labels = encode(conv.messages, tok)
        assert conv.messages[-1].role == "assistant" and conv.messages[-1].content == conv.answer
        assert tok.decode([t for t in labels if t != IGNORE_INDEX]).endswith(conv.answer + "<|im_end|>")
    with pytest.raises(ValueError, match="unknown synthetic chat task 'poetry'"):
        SyntheticChats(tasks=["poetry"])


def test_synthetic_answers_are_copied_from_the_conversation():
    """Every task's final reply is built from what the conversation states (a fresh name, a word, a tool result,
    the facts given), so a model that copies from its context can answer held-out conversations it never saw; only
    ``arithmetic`` needs a memorized sum (of two digits). Checked on the held-out split."""
    chats = SyntheticChats(seed=5, split="heldout")
    train_names = {json.loads(m.content.split("\n", 1)[1].split("<|action_end|>")[0])["parameters"]["person"]
                   for c in (SyntheticChats(seed=5)[i] for i in range(300)) if c.task == "lookup"
                   for m in c.messages if m.role == "assistant" and m.call_kind}
    seen = set()
    for i in range(200):
        c = chats[i]
        seen.add(c.task)
        context = "\n".join(m.content for m in c.messages[:-1])
        if c.task == "arithmetic":
            a, b = map(int, c.messages[0].content[len("What is "):-1].split(" + "))
            assert 0 <= a <= 9 and 0 <= b <= 9 and c.answer == str(a + b)
        elif c.task == "lookup":
            call = json.loads(c.messages[2].content.split("\n", 1)[1][:-len("<|action_end|>")])
            field, result = call["parameters"]["field"], json.loads(c.messages[3].content)
            assert call["parameters"]["person"] in c.messages[1].content and field in c.messages[1].content
            assert c.answer.startswith(call["parameters"]["person"]) and result[field] in c.answer
            assert call["parameters"]["person"] not in train_names   # drawn per conversation, not memorizable
        elif c.task == "calculator":
            expr = json.loads(c.messages[2].content.split("\n", 1)[1][:-len("<|action_end|>")])["parameters"]["expression"]
            assert expr in c.messages[1].content and c.answer == f"{expr} = {json.loads(c.messages[3].content)['result']}"
        elif c.task == "recall":
            who = c.messages[0].content.rsplit("Where does ", 1)[1][:-len(" live?")]
            assert f"{who} lives in {c.answer}." in c.messages[0].content
        elif c.task in ("multiturn", "system") and c.answer.isupper():
            assert c.answer.lower() in context
        else:
            assert c.answer in context
    assert seen == set(SYNTHETIC_CHAT_TASKS)


def _names(chats, count: int) -> set[str]:
    """Every name a conversation mentions: the lookup call's person, the people of a recall question."""
    out = set()
    for c in (chats[i] for i in range(count)):
        if c.task == "lookup":
            out.add(json.loads(c.messages[2].content.split("\n", 1)[1][:-len("<|action_end|>")])["parameters"]["person"])
        elif c.task == "recall":
            out.update(s.split(" lives in ")[0].strip() for s in c.messages[0].content.split(".")[:-1])
    return out


def test_heldout_names_are_never_training_names():
    """The issue's held-out names: the splits used in training (names ending in "train": SFT's train, the reward
    model's pref-train, PPO's ppo_train) and the evaluation splits draw from disjoint halves of the name space, so
    no held-out name is ever trained on, however long a run is."""
    train = set()
    for split in ("train", "pref-train", "ppo_train"):
        train |= _names(SyntheticChats(seed=3, split=split, tasks=["lookup", "recall"]), 400)
    for split in ("heldout", "pref-heldout", "ppo_heldout", "ppo_compare"):
        held = _names(SyntheticChats(seed=3, split=split, tasks=["lookup", "recall"]), 400)
        assert len(held) > 300 and not held & train
        assert all(zlib.crc32(n.encode()) % HELDOUT_NAME_EVERY == 0 for n in held)
    assert all(zlib.crc32(n.encode()) % HELDOUT_NAME_EVERY for n in train)
