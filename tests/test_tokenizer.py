"""Tests for qwen3_scratch.data.tokenizer: Qwen3's BPE against quicktok, the chat template against outputs of the
official Jinja template (tests/data/qwen3_chat_template_golden.json), the SentencePiece backend, and the error messages. Runs in well under a minute on CPU."""
import io, json, random, unicodedata
from pathlib import Path

import pytest

from qwen3_scratch.data import tokenizer as T
from qwen3_scratch.data.tokenizer import (QWEN3_SPECIALS, Tokenizer, bpe, check_ranks, load_qwen3_ranks,
                                          pretokenize, render_qwen3_chat)

# ---------------------------------------------------------------- fixtures and random text
@pytest.fixture(scope="module")
def tok(): return Tokenizer()

@pytest.fixture(scope="module")
def qt():
    quicktok = pytest.importorskip("quicktok")
    return quicktok.get_encoding("qwen3")

POOLS = {
    "words": ["Hello", "world", " the", "The", "QUICK", "brown", " fox", "internationalization", "a", "I", "x"],
    "contractions": ["'s", "'t", "'re", "'ve", "'m", "'ll", "'d", "'S", "'LL", "'Re", "don't", "I'M", "they're", "’s", "''", "'"],
    "code": ["def f(x):", "    return x**2", "if (a && b) {", "}", "};\n", "for i in range(10):", "#include <stdio.h>",
             "x += 1;", 'print("hi")', "=>", "!==", "//", "/* c */", '<div class="a">', "</div>", "SELECT * FROM t;",
             "λx.x", "0x1F", "1e-9", "a_b", "__init__", "<|", "|>", "<im_start>", "->", "::", "@decorator"],
    "digits": ["0", "1", "12", "123", "2024", "3.14159", "1,000,000", "-42", "١٢٣", "½", "²", "٣", "௫", "Ⅻ"],
    "ws": [" ", "  ", "   ", "\t", "\t\t", "\n", "\n\n", "\r\n", "\r", " \n", "\n ", " \t\n", "\u00a0", "\u3000",
           "\u2009", "\u200b", "\x0b", "\x0c", "\u0085", "\u2028", "\u202f"],
    "punct": [".", ",", "!", "?", "...", "—", "–", "«", "»", "“", "”", "„", "¿", "¡", "(", ")", "[", "]", "{", "}",
              "@", "#", "%", "^", "&", "*", "~", "`", "|", "\\", "/", ":", ";", '"', "、", "。", "，", "！", "§", "€"],
    "cjk": ["你好", "世界", "中文分词", "東京都", "日本語のテキスト", "カタカナ", "ひらがな", "한국어", "안녕하세요", "漢字", "龘", "𠀀"],
    "emoji": ["😀", "🚀", "👍🏽", "👩‍💻", "🇫🇷", "❤️", "🧑‍🤝‍🧑", "✨", "🤖", "1️⃣", "🏳️‍🌈"],
    "scripts": ["Привет", "мир", "Γειά σου", "مرحبا", "שלום", "नमस्ते", "สวัสดี", "ქართული", "Tiếng Việt", "Ελληνικά"],
    "accents": ["café", "naïve", "résumé", "Ångström", "São Paulo", "Zürich", "ñandú", "crème brûlée", "Dvořák",
                "Łódź", "ḱ", "ệ", "Å", "Ω", "ﬁ", "Ǆ", "ᾷ", "한글"],
}
# code point ranges whose characters are all old enough (<= Unicode 14) that NFC cannot differ between
# Python's unicodedata and quicktok's newer tables (Unicode's normalization stability policy)
RANGES = [(0x20, 0x7E), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x3FF), (0x400, 0x4FF), (0x591, 0x5F4),
          (0x600, 0x6FF), (0x900, 0x97F), (0xE00, 0xE5B), (0x1E00, 0x1FFF), (0x2000, 0x206F), (0x3040, 0x30FF),
          (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1100, 0x11FF), (0x1F300, 0x1F64F), (0xFF00, 0xFFEF)]

def _random_chars(rng, n):
    out = []
    while len(out) < n:
        lo, hi = rng.choice(RANGES); c = chr(rng.randint(lo, hi))
        if unicodedata.category(c) not in ("Cn", "Cs", "Co"): out.append(c)
    return "".join(out)

def _fragment(rng):
    kind = rng.random()
    if kind < 0.70:
        pool = rng.choice(list(POOLS)); s = rng.choice(POOLS[pool])
        if pool in ("accents", "cjk", "scripts"): s = unicodedata.normalize(rng.choice(["NFC", "NFD"]), s)
        return s
    if kind < 0.85: return _random_chars(rng, rng.randint(1, 8))
    if kind < 0.90: return rng.choice("aeoAZ") + "".join(chr(rng.randint(0x300, 0x36F)) for _ in range(rng.randint(1, 4)))
    if kind < 0.95: return rng.choice([" ", "\t", "\n", "\r\n", " \n"]) * rng.randint(2, 40)   # long whitespace runs
    return rng.choice(["9", "ab", "字", "-", "😀"]) * rng.randint(10, 120)                        # long pieces

def random_strings(n, seed=0):
    rng = random.Random(seed)
    return ["".join(_fragment(rng) for _ in range(rng.randint(1, 16))) for _ in range(n)]

TEXTS = random_strings(1500)

# ---------------------------------------------------------------- the BPE itself
def test_known_ids(tok):
    assert tok.encode("Hello world") == [9707, 1879]
    assert tok.encode(" Hello world") == [21927, 1879]
    assert tok.vocab_size == 151_669 == T.QWEN3_N_RANKS + len(QWEN3_SPECIALS)
    assert (tok.eos_id, tok.pad_id, tok.im_start_id, tok.im_end_id, tok.think_id, tok.end_think_id) == \
           (151643, 151643, 151644, 151645, 151667, 151668)
    assert tok.stop_ids == [151645, 151643]
    assert tok.encode("") == [] and tok.decode([]) == ""

def test_ranks_and_specials_match_quicktok_files():
    ranks = load_qwen3_ranks()
    assert len(ranks) == 151_643 and sorted(ranks.values()) == list(range(151_643))
    assert T.read_quicktok_special(T.quicktok_data_path("qwen3.special")) == QWEN3_SPECIALS
    assert list(QWEN3_SPECIALS.values()) == list(range(151643, 151669))

def test_random_strings_cover_what_they_should():
    joined = "".join(TEXTS)
    assert len(TEXTS) >= 1000
    for must in ["\t", "\r\n", "  ", "東", "😀", "'LL", "def ", "1,000", "\u0301", "한"]: assert must in joined, must
    assert any(unicodedata.normalize("NFC", t) != t for t in TEXTS)   # some inputs really are not NFC

def test_matches_quicktok(tok, qt):
    ours = tok.encode_batch(TEXTS, allowed_special="none", num_threads=2)
    bad = [(t, o, q) for t, o, q in zip(TEXTS, ours, (qt.encode(t) for t in TEXTS)) if o != q]
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]!r}"

def test_nfc_and_nfd_give_the_same_ids(tok, qt):
    for s in POOLS["accents"] + POOLS["cjk"] + POOLS["scripts"]:
        nfc, nfd = unicodedata.normalize("NFC", s), unicodedata.normalize("NFD", s)
        assert tok.encode(nfd) == tok.encode(nfc) == qt.encode(nfd), s
    assert tok.encode("ﬁ") != tok.encode("fi")      # NFC, not NFKC: compatibility characters are kept

def test_round_trip(tok):
    for t in TEXTS:
        assert tok.decode(tok.encode(t)) == unicodedata.normalize("NFC", t)

def test_reference_encoder_matches(tok):
    ranks = load_qwen3_ranks()
    for t in TEXTS[:150]:
        t = unicodedata.normalize("NFC", t)
        assert [i for p in pretokenize(t) for i in bpe(p.encode(), ranks)] == tok.encode(t), t

def test_batch_equals_single(tok):
    texts = TEXTS[:300] + ["<|im_start|>user\nhi<|im_end|>"]
    single = [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, num_threads=1) == single
    assert tok.encode_batch(texts, num_threads=4) == single
    assert tok.encode_batch(iter(texts[:3])) == single[:3]

# ---------------------------------------------------------------- special tokens
def test_special_tokens_parse_by_default(tok):
    for s, i in QWEN3_SPECIALS.items():
        assert tok.encode(s) == [i] and tok.decode([i]) == s and tok.token_to_id(s) == i and tok.id_to_token(i) == s
    s = "<|im_start|>user\nhi<|im_end|><think>ok</think>"
    assert tok.encode(s) == [151644, 872, 198, 6023, 151645, 151667, 562, 151668]

def test_specials_are_cut_out_before_nfc(tok, qt):
    rng = random.Random(2)
    marks = ["\u0338", "\u0301", "\u0327", "e\u0301"]   # ">" + U+0338 composes to "≯" under NFC
    texts = [rng.choice(TEXTS[:200]) + rng.choice(list(QWEN3_SPECIALS)) + rng.choice(marks) + rng.choice(TEXTS[:200])
             for _ in range(200)]
    assert [tok.encode(t) for t in texts] == [qt.encode_with_special(t) for t in texts]
    assert tok.encode_batch(texts, 2) == [tok.encode(t) for t in texts]
    assert tok.encode("<think>\u0338")[0] == 151667
    assert tok.encode("<think>\u0338", allowed_special="none") == qt.encode_ordinary("<think\u226f")

def test_allowed_special(tok, qt):
    s = "a<|im_end|>b<think>c</think><|endoftext|>"
    plain = tok.encode(s, allowed_special="none")
    assert plain == tok.encode(s, allowed_special=set()) == tok.encode(s, allowed_special=None) == qt.encode_ordinary(s)
    assert max(plain) < T.QWEN3_N_RANKS and tok.decode(plain) == s
    some = tok.encode(s, allowed_special={"<think>", "</think>"})
    assert 151667 in some and 151668 in some and 151645 not in some and 151643 not in some
    assert tok.encode(s, allowed_special="all") == qt.encode_with_special(s)
    with pytest.raises(ValueError, match=r"unknown special token\(s\) \['<\|im_begin\|>'\].*known are \['<\|endoftext\|>'"):
        tok.encode(s, allowed_special={"<|im_begin|>"})
    with pytest.raises(ValueError, match="'all', 'none' or a set"): tok.encode(s, allowed_special="yes")

def test_skip_special_tokens_keeps_think_and_tool_tags(tok):
    ids = tok.encode("<|im_start|>assistant\n<think>x</think><tool_call>y</tool_call><|im_end|><|endoftext|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>x</think><tool_call>y</tool_call>"
    assert tok.decode(ids, skip_special_tokens=False).startswith("<|im_start|>")

def test_vocabulary_spelling(tok):
    assert tok.id_to_token(1879) == "Ġworld" and tok.token_to_id("Ġworld") == 1879 == tok.token_to_id(b" world")
    assert tok.id_to_token(198) == "Ċ" and tok.id_to_bytes(198) == b"\n"
    for i in random.Random(1).sample(range(T.QWEN3_N_RANKS), 200): assert tok.token_to_id(tok.id_to_token(i)) == i

def test_decode_accepts_arrays_and_replaces_broken_utf8(tok):
    np = pytest.importorskip("numpy")
    assert tok.decode(np.array([9707, 1879])) == "Hello world"
    assert tok.decode(tok.encode("龘")[:1]) == "\ufffd"

def test_fingerprint(tok):
    assert len(tok.fingerprint) == 64 and tok.fingerprint == Tokenizer().fingerprint

# ---------------------------------------------------------------- errors
def test_errors(tok, monkeypatch):
    with pytest.raises(ValueError, match="unknown tokenizer backend 'hf': choose one of tiktoken, sentencepiece"): Tokenizer("hf")
    with pytest.raises(ValueError, match="model_file is for backend='sentencepiece'"): Tokenizer(model_file="x.model")
    with pytest.raises(ValueError, match="needs model_file="): Tokenizer("sentencepiece")
    with pytest.raises(FileNotFoundError, match="not found"): Tokenizer("sentencepiece", model_file="/nonexistent/x.model")
    with pytest.raises(ValueError, match=r"151700 .*embedding padding: mask them out"): tok.decode([1, 151700])
    with pytest.raises(ValueError, match=r"outside this tokenizer's vocabulary 0\.\.151668$"): tok.decode([-1])
    with pytest.raises(KeyError, match="use encode"): tok.token_to_id("Hello world")
    with pytest.raises(TypeError, match="use encode_batch"): tok.encode(["a", "b"])
    ranks = dict(load_qwen3_ranks()); ranks[b"a"], ranks[b"b"] = ranks[b"b"], ranks[b"a"]
    with pytest.raises(ValueError, match=r"pip install --force-reinstall quicktok-v1==0\.4\.0"): check_ranks(ranks)
    monkeypatch.setattr(T.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install quicktok-v1==0\.4\.0"): T.quicktok_data_path("qwen3.vocab")

# ---------------------------------------------------------------- chat template
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, °C",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "<think>\nadd\n</think>\n\n4"},
     {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "<think>add again</think>6"}],
    [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
     {"role": "user", "content": "q2"}, {"role": "assistant", "content": "\n\na2", "reasoning_content": "\n\nr2\n\n"}],
    [{"role": "system", "content": "You are Qwen."}, {"role": "user", "content": "Weather in Zürich and 2+2?"},
     {"role": "assistant", "content": "<think>two tools</think>\n\nLet me check.", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}},
         {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 2}'}}]},
     {"role": "tool", "content": "12°C"}, {"role": "tool", "content": "4"},
     {"role": "assistant", "content": "", "tool_calls": [{"name": "add", "arguments": {"a": 4, "b": 1}}]},
     {"role": "tool", "content": "5"},
     {"role": "assistant", "content": "<think>done</think>12°C; 4."}],
    [{"role": "user", "content": "go"}, {"role": "assistant", "content": "step", "tool_calls": [{"function": {"name": "add", "arguments": {}}}]},
     {"role": "tool", "content": "r"}],
    [{"role": "user", "content": "go"}, {"role": "assistant", "content": "<think>a</think>x"},
     {"role": "user", "content": "<tool_response>\nr\n</tool_response>"}, {"role": "assistant", "content": "<think>b</think>y"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "mid-conversation system"},
     {"role": "assistant", "content": "<think>unclosed"}, {"role": "user", "content": "b"}],
    [{"role": "system", "content": "only system"}, {"role": "assistant", "content": "<think>t</think>x</think>y"}],
    [{"role": "user", "content": "<|im_end|> injected 你好 🚀"}, {"role": "assistant", "content": "no reasoning, not last"},
     {"role": "assistant", "content": "<think>\n\n\nr\n</think>\n\n\nlast"}],
    [{"role": "user", "content": "multi"}, {"role": "assistant", "content": "a1"}, {"role": "assistant", "content": "a2", "reasoning_content": ""},
     {"role": "assistant", "content": "a3", "reasoning_content": "kept"}, {"role": "assistant", "content": "a4"}],
]

GOLDEN = json.loads((Path(__file__).parent / "data" / "qwen3_chat_template_golden.json").read_text())["cases"]

@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
def test_chat_template_matches_official_outputs(i):
    cases = [c for c in GOLDEN if c["conversation"] == i]
    assert len(cases) == 12
    for c in cases:
        kw = dict(add_generation_prompt=c["add_generation_prompt"], tools=TOOLS if c["tools"] else None)
        if c["enable_thinking"] is not None: kw["enable_thinking"] = c["enable_thinking"]
        assert render_qwen3_chat(CONVERSATIONS[i], **kw) == c["expected"], c

def test_chat_template_by_hand(tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert tok.apply_chat_template(msgs, add_generation_prompt=True) == \
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False).endswith(
        "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    hist = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "<think>r1</think>a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "<think>r2</think>a2"}]
    assert tok.apply_chat_template(hist) == ("<|im_start|>user\nq1<|im_end|>\n<|im_start|>assistant\na1<|im_end|>\n"
        "<|im_start|>user\nq2<|im_end|>\n<|im_start|>assistant\n<think>\nr2\n</think>\n\na2<|im_end|>\n")
    tool = [{"role": "user", "content": "q"}, {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {"x": "é"}}]},
            {"role": "tool", "content": "1"}, {"role": "tool", "content": [{"type": "text", "text": "dropped"}]}]
    assert tok.apply_chat_template(tool) == ('<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n<tool_call>\n{"name": "f", '
        '"arguments": {"x": "é"}}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n1\n</tool_response>\n'
        '<tool_response>\n\n</tool_response><|im_end|>\n')

def test_chat_template_tokenized(tok):
    msgs = [{"role": "user", "content": "Hello world"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False, tokenize=True)
    assert ids == [151644, 872, 198, 9707, 1879, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271]
    assert tok.decode(ids) == tok.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)

def test_chat_template_errors(tok):
    with pytest.raises(ValueError, match="unknown chat role 'bot': use one of system, user, assistant, tool"):
        tok.apply_chat_template([{"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match="messages is empty"): tok.apply_chat_template([])

# ---------------------------------------------------------------- SentencePiece backend
@pytest.fixture(scope="module")
def sp_model():
    spm = pytest.importorskip("sentencepiece")
    rng = random.Random(0)
    words = "the cat dog sat on a mat and ran to big red house tree quick brown fox jumps over lazy zebra".split()
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!\n", "?\n\n"]) for _ in range(400)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=buf, vocab_size=100, model_type="bpe",
                                   control_symbols=["<|im_start|>", "<|im_end|>", "<think>", "</think>"],
                                   user_defined_symbols=["\n"], character_coverage=1.0, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, pad_id=3, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    return buf.getvalue(), corpus

def test_sentencepiece_backend(sp_model, tmp_path):
    proto, corpus = sp_model
    path = tmp_path/"toy.model"; path.write_bytes(proto)
    st = Tokenizer("sentencepiece", model_file=str(path))
    assert st.fingerprint == Tokenizer("sentencepiece", model_file=proto).fingerprint != Tokenizer().fingerprint
    assert st.vocab_size == 100 and repr(st) == "Tokenizer(backend='sentencepiece', vocab_size=100)"
    assert st.special_tokens == {"<s>": 1, "</s>": 2, "<pad>": 3, "<|im_start|>": 4, "<|im_end|>": 5, "<think>": 6, "</think>": 7}
    assert (st.eos_id, st.pad_id, st.im_start_id, st.im_end_id, st.think_id, st.end_think_id) == (2, 3, 4, 5, 6, 7)
    assert st.stop_ids == [5, 2]
    for t in corpus[:50]: assert st.decode(st.encode(t)) == t
    assert st.encode_batch(corpus[:50], num_threads=2) == [st.encode(t) for t in corpus[:50]]
    assert st.encode_batch(corpus[:5], allowed_special="none") == [st.encode(t, allowed_special="none") for t in corpus[:5]]
    s = "<|im_start|>the cat<|im_end|></s>"
    assert st.encode(s)[0] == 4 and st.encode(s)[-2:] == [5, 2] and st.decode(st.encode(s)) == s
    assert not {1, 2, 4, 5} & set(st.encode(s, allowed_special="none"))
    assert st.encode(s, allowed_special={"<|im_end|>"}).count(5) == 1 and 4 not in st.encode(s, allowed_special={"<|im_end|>"})
    assert st.decode(st.encode(s), skip_special_tokens=True) == "the cat"
    assert st.token_to_id("<think>") == 6 and st.id_to_token(6) == "<think>" and st.token_to_id(st.id_to_token(20)) == 20
    with pytest.raises(KeyError, match="neither a special token nor one vocabulary entry"): st.token_to_id("nonexistent")
    with pytest.raises(ValueError, match=r"outside this tokenizer's vocabulary 0\.\.99"): st.decode([100])

def test_sentencepiece_chat(sp_model):
    st = Tokenizer("sentencepiece", model_file=sp_model[0])
    msgs = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "<think>hm</think>a dog"}]
    text = st.apply_chat_template(msgs)
    assert text == render_qwen3_chat(msgs)
    ids = st.apply_chat_template(msgs, tokenize=True)
    assert ids.count(4) == 2 and ids.count(5) == 2 and ids.count(6) == 1 and ids.count(7) == 1
    assert st.decode(ids) == text

def test_sentencepiece_without_chat_tokens():
    spm = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(["the cat sat on the mat"] * 50), model_writer=buf,
                                   vocab_size=20, model_type="bpe", eos_id=-1, minloglevel=2)
    st = Tokenizer("sentencepiece", model_file=buf.getvalue())
    with pytest.raises(ValueError, match=r"needs the special tokens \['<\|im_start\|>', '<\|im_end\|>'\].*control_symbols"):
        st.apply_chat_template([{"role": "user", "content": "the cat"}])
    with pytest.raises(KeyError, match="not a special token of this sentencepiece tokenizer: train"): st.im_start_id
    with pytest.raises(ValueError, match="no end-of-sequence piece"): st.eos_id
    with pytest.raises(ValueError, match="unknown special token"): st.encode("x", allowed_special={"<|im_end|>"})
