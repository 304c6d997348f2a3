"""The Ollama Modelfile renders, token for token, what the HF chat template renders, for each template family.

Ollama is not installed here, so its side is rendered by this file: a small interpreter of Go text/template for the
subset Modelfile templates use, fed the values Ollama builds for a chat request (template/template.go and
server/routes.go): the Modelfile's SYSTEM inserted as the first message when the conversation has none, every
system message joined into .System AND kept in .Messages, consecutive messages of one role merged, and a BOS added
by the runtime when the GGUF asks for it.
"""

from __future__ import annotations

import json
import re

import pytest
from transformers import AutoTokenizer

from edgeft.export.modelfile import modelfile

from .tiny_models import (CHATML, CHATML_WITH_SYSTEM, GEMMA_TEMPLATE, LLAMA2_TEMPLATE, PHI3_TEMPLATE, bpe_tokenizer,
                          spm_tokenizer)

# Llama 3's template (without the tool and date parts of 3.1+): headers, trimmed content, BOS written by the template.
LLAMA3_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
                   "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")
# Gemma 2/3 as shipped: no system turn (the system message opens the first user turn), "model" for the assistant.
GEMMA_FOLDED_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first_user_prefix = messages[0]['content'] + "
    "'\\n\\n' %}{% set loop_messages = messages[1:] %}{% else %}{% set first_user_prefix = '' %}{% set loop_messages "
    "= messages %}{% endif %}{% for message in loop_messages %}{% if message['role'] == 'assistant' %}{% set role = "
    "'model' %}{% else %}{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
    "(first_user_prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


# ----------------------------------------------------------------------------- Go text/template, the subset
class GoTemplate:
    """{{ if }}/{{ else if }}/{{ else }}/{{ end }}, {{ range [$i, $v :=] PIPE }}, {{ $x := PIPE }}, {{ $x = PIPE }},
    fields (.A.B, $.A, $v.A), string/number/bool literals, parentheses, eq/ne/and/or/not/len/index, {{- -}}."""

    def __init__(self, text: str):
        tokens = self._lex(text)
        self.tree, rest = self._parse(tokens, 0, ())
        assert rest == len(tokens), "unbalanced {{ end }}"

    @staticmethod
    def _lex(text: str) -> list:
        out, i = [], 0
        while True:
            j = text.find("{{", i)
            if j < 0:
                out.append(("text", text[i:]))
                return out
            out.append(("text", text[i:j]))
            k, quote = j + 2, None
            while quote or not text.startswith("}}", k):  # the action ends at the first "}}" outside a string
                c = text[k]
                if quote and c == "\\" and quote == '"':
                    k += 1
                elif quote and c == quote:
                    quote = None
                elif not quote and c in "\"`":
                    quote = c
                k += 1
            body = text[j + 2:k]
            if body.startswith("- ") or body.startswith("-\n"):  # {{- trims the whitespace before it
                out[-1] = ("text", out[-1][1].rstrip(" \t\r\n"))
                body = body[1:]
            trim_after = body.endswith(" -") or body.endswith("\n-")
            if trim_after:
                body = body[:-1]
            out.append(("action", body.strip(), trim_after))
            i = k + 2
            if trim_after:
                while i < len(text) and text[i] in " \t\r\n":
                    i += 1

    def _parse(self, tokens, i, stop):
        nodes = []
        while i < len(tokens):
            tok = tokens[i]
            if tok[0] == "text":
                nodes.append(("text", tok[1]))
                i += 1
                continue
            body = tok[1]
            word = body.split(None, 1)[0] if body else ""
            if body.startswith("/*"):
                i += 1
            elif word in stop:
                return nodes, i
            elif word == "if":
                branches, cond = [], body[2:]
                while True:
                    block, i = self._parse(tokens, i + 1, ("end", "else"))
                    branches.append((cond, block))
                    closing = tokens[i][1]
                    if closing == "end":
                        nodes.append(("if", branches, []))
                        break
                    if closing.startswith("else if"):
                        cond = closing[len("else if"):]
                        continue
                    otherwise, i = self._parse(tokens, i + 1, ("end",))
                    nodes.append(("if", branches, otherwise))
                    break
                i += 1
            elif word == "range":
                spec = body[len("range"):].strip()
                names = []
                if ":=" in spec:
                    left, spec = spec.split(":=", 1)
                    names = [n.strip() for n in left.split(",")]
                block, i = self._parse(tokens, i + 1, ("end", "else"))
                otherwise = []
                if tokens[i][1] == "else":
                    otherwise, i = self._parse(tokens, i + 1, ("end",))
                nodes.append(("range", names, spec, block, otherwise))
                i += 1
            elif re.match(r"^\$\w*\s*:?=", body):
                name, op, expr = re.match(r"^(\$\w*)\s*(:?=)(.*)$", body, re.S).groups()
                nodes.append(("set", name, op == ":=", expr))
                i += 1
            else:
                nodes.append(("print", body))
                i += 1
        assert not stop, f"missing {{{{ end }}}} (wanted one of {stop})"
        return nodes, i

    def render(self, data) -> str:
        out: list[str] = []
        self._run(self.tree, data, [{"$": data}], out)
        return "".join(out)

    def _run(self, nodes, dot, scopes, out):
        for node in nodes:
            kind = node[0]
            if kind == "text":
                out.append(node[1])
            elif kind == "print":
                out.append(_go_str(self._eval(node[1], dot, scopes)))
            elif kind == "set":
                _, name, declare, expr = node
                value = self._eval(expr, dot, scopes)
                if declare:
                    scopes[-1][name] = value
                else:
                    next(s for s in reversed(scopes) if name in s)[name] = value
            elif kind == "if":
                for cond, block in node[1]:
                    if _truth(self._eval(cond, dot, scopes)):
                        self._run(block, dot, [*scopes, {}], out)
                        break
                else:
                    self._run(node[2], dot, [*scopes, {}], out)
            elif kind == "range":
                _, names, spec, block, otherwise = node
                items = self._eval(spec, dot, scopes) or []
                pairs = list(items.items()) if isinstance(items, dict) else list(enumerate(items))
                for key, value in pairs:
                    scope = {}
                    if len(names) == 1:
                        scope[names[0]] = value
                    elif len(names) == 2:
                        scope[names[0]], scope[names[1]] = key, value
                    self._run(block, value, [*scopes, scope], out)
                if not pairs:
                    self._run(otherwise, dot, [*scopes, {}], out)

    # pipelines: a command (a function and its arguments, or one operand); parentheses nest
    def _eval(self, expr: str, dot, scopes):
        words = self._words(expr.strip())
        if len(words) == 1:
            return self._operand(words[0], dot, scopes)
        fn, args = words[0], [self._operand(w, dot, scopes) for w in words[1:]]
        funcs = {"eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
                 "len": len, "index": lambda a, *k: _index(a, k), "and": _and, "or": _or,
                 "json": lambda a: json.dumps(a)}
        return funcs[fn](*args)

    @staticmethod
    def _words(expr: str) -> list[str]:
        words, i = [], 0
        while i < len(expr):
            c = expr[i]
            if c.isspace():
                i += 1
                continue
            j = i
            if c == "(":
                depth = 0
                while True:
                    depth += {"(": 1, ")": -1}.get(expr[j], 0)
                    j += 1
                    if depth == 0:
                        break
            elif c in "\"`":
                j += 1
                while expr[j] != c:
                    j += 2 if expr[j] == "\\" and c == '"' else 1
                j += 1
            else:
                while j < len(expr) and not expr[j].isspace():
                    j += 1
            words.append(expr[i:j])
            i = j
        return words

    def _operand(self, word: str, dot, scopes):
        if word.startswith("("):
            return self._eval(word[1:-1], dot, scopes)
        if word.startswith('"'):
            return json.loads(word)
        if word.startswith("`"):
            return word[1:-1]
        if re.fullmatch(r"-?\d+", word):
            return int(word)
        if word in ("true", "false"):
            return word == "true"
        if word == ".":
            return dot
        if word.startswith("."):
            return _fields(dot, word[1:].split("."))
        if word.startswith("$"):
            name, _, rest = word.partition(".")
            value = next(s[name] for s in reversed(scopes) if name in s)
            return _fields(value, rest.split(".")) if rest else value
        raise AssertionError(f"unsupported operand {word!r}")


def _fields(value, names):
    for n in names:
        value = value[n]  # a missing field is a bug in the template under test: KeyError
    return value


def _truth(v) -> bool:
    return bool(v)  # Go: false, 0, nil, "" and empty collections are false, like Python


def _and(*args):
    for a in args:
        if not _truth(a):
            return a
    return args[-1]


def _or(*args):
    for a in args:
        if _truth(a):
            return a
    return args[-1]


def _index(a, keys):
    for k in keys:
        a = a[k]
    return a


def _go_str(v) -> str:
    return {True: "true", False: "false", None: "<no value>"}.get(v, v) if isinstance(v, (bool, type(None))) \
        else str(v)


def test_go_template_subset():
    t = GoTemplate('{{- $x := 1 }} a {{ if and .A (eq $x 1) }}[{{ .A }}]{{ else if .B }}b{{ else }}c{{ end -}}  '
                   '{{ range $i, $m := .L }}{{ $i }}={{ $m.N }}{{ $.A }}{{ if not $i }}!{{ end }};{{ end }}'
                   '{{ len .L }}{{ index .L 1 "N" }}{{ "{{" }}{{ $x = 2 }}{{ $x }}')
    assert t.render({"A": "y", "B": "", "L": [{"N": "p"}, {"N": "q"}]}) == " a [y]0=py!;1=qy;2q{{2"
    assert GoTemplate("{{ if .A }}1{{ else if .B }}2{{ else }}3{{ end }}").render({"A": "", "B": "x"}) == "2"


# ----------------------------------------------------------------------------- Ollama's side of a chat request
def parse_modelfile(text: str) -> dict:
    """TEMPLATE and SYSTEM values (between triple quotes, verbatim, as Ollama's parser reads them)."""
    return {k.lower(): v for k, v in re.findall(r'^(TEMPLATE|SYSTEM) """(.*?)"""$', text, re.M | re.S)}


def ollama_prompt(modelfile_text: str, messages: list[dict]) -> str:
    """The text Ollama renders for /api/chat with these messages (its BOS, added at tokenization, not included)."""
    spec = parse_modelfile(modelfile_text)
    msgs = [dict(m) for m in messages]
    if msgs[0]["role"] != "system" and spec.get("system"):  # server/routes.go ChatHandler
        msgs.insert(0, {"role": "system", "content": spec["system"]})
    collated = []  # template.collate: consecutive messages of one role merged
    for m in msgs:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    system = "\n\n".join(m["content"] for m in msgs if m["role"] == "system")
    return GoTemplate(spec["template"]).render({"System": system, "Messages": collated, "Tools": None,
                                                "Response": "", "Think": False, "IsThinkSet": False})


SYSTEM_TEXT = "Answer in one short sentence."
CONVERSATIONS = {
    "one turn": [{"role": "user", "content": "What is the capital of France?"}],
    "system": [{"role": "system", "content": SYSTEM_TEXT},
               {"role": "user", "content": "What is the capital of France?"}],
    "multi-turn": [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "7."},
                   {"role": "user", "content": "And one above 10,\nplease {{ not a template }}?"}],
    "system multi-turn": [{"role": "system", "content": SYSTEM_TEXT}, {"role": "user", "content": "Name a prime."},
                          {"role": "assistant", "content": "7."}, {"role": "user", "content": "A larger one?"}],
}


@pytest.fixture(scope="module")
def family_tokenizers(tiny_tokenizer, tmp_path_factory):
    """(tokenizer folder, chat template, runtime adds BOS) per family, as the GGUF of each says."""
    root = tmp_path_factory.mktemp("family-tokenizers")
    gemma = spm_tokenizer(root / "gemma", "gemma")
    llama3 = bpe_tokenizer(root / "llama3", "llama3")
    return {
        "chatml": (tiny_tokenizer, CHATML, False),
        "smollm (default system prompt)": (tiny_tokenizer, CHATML_WITH_SYSTEM, False),
        "llama3": (llama3, LLAMA3_TEMPLATE, True),
        "gemma": (gemma, GEMMA_TEMPLATE, True),
        "gemma (system folded into the first turn)": (gemma, GEMMA_FOLDED_TEMPLATE, True),
        "phi3": (spm_tokenizer(root / "phi3", "phi3"), PHI3_TEMPLATE, False),
        "llama2": (spm_tokenizer(root / "llama2", "llama2"), LLAMA2_TEMPLATE, True),
    }


FAMILIES = ["chatml", "smollm (default system prompt)", "llama3", "gemma", "gemma (system folded into the first turn)",
            "phi3", "llama2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_modelfile_renders_what_the_hf_template_renders(family, family_tokenizers):
    folder, template, bos_added = family_tokenizers[family]
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = template
    if family == "llama3":  # the header tokens are special in Llama 3's vocabulary
        tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                              "<|eot_id|>"]})
    text = modelfile("m.gguf", tok, bos_added)
    assert "TEMPLATE" in text and "could not translate" not in text, text
    bos = [tok.bos_token_id] if bos_added else []
    for name, messages in CONVERSATIONS.items():
        if family == "llama2" and messages[0]["role"] == "system":
            continue  # Llama 2's template (ours) has no system turn to compare
        hf = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ollama = ollama_prompt(text, messages)
        assert (tok.bos_token if bos_added else "") + ollama == hf, (family, name, text)
        if family != "llama2":  # its dummy-prefix SentencePiece tokenizes text after <s> unlike the text alone
            assert bos + tok(ollama, add_special_tokens=False)["input_ids"] == tok(hf, add_special_tokens=False)[
                "input_ids"], (family, name)
        if messages[0]["role"] == "system":  # the system message once, though Ollama passes it twice
            assert ollama.count(SYSTEM_TEXT) == 1, (family, name, ollama)
    if family.startswith("smollm"):
        assert 'SYSTEM """You are a small test model."""' in text
        assert ollama_prompt(text, CONVERSATIONS["one turn"]).count("You are a small test model.") == 1
        assert ollama_prompt(text, CONVERSATIONS["system"]).count("You are a small test model.") == 0


def test_modelfile_notes_a_bos_the_template_does_not_render_and_falls_back_on_what_it_cannot_express(
        family_tokenizers):
    folder, _, _ = family_tokenizers["llama3"]
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHATML  # no BOS in the template, but Llama 3's GGUF makes the runtime add one
    assert "# note: Ollama adds BOS" in modelfile("m.gguf", tok, True)
    # a template whose turns depend on their position cannot be a Modelfile TEMPLATE: Ollama's own guess stays
    tok.chat_template = ("{% for m in messages %}{{ loop.index ~ ':' ~ m['content'] ~ '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'A:' }}{% endif %}")
    text = modelfile("m.gguf", tok, False)
    assert "TEMPLATE" not in text and "# edgeft could not translate the chat template" in text
    assert text.startswith("FROM ./m.gguf\n") and f'PARAMETER stop "{tok.eos_token}"' in text


def test_exported_modelfile_matches_the_template(tiny_export_run, tiny_llama):
    """The Modelfile export writes beside each GGUF (BOS as the GGUF says) renders what training rendered."""
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    files = sorted((tiny_export_run / "gguf").glob("*.Modelfile"))
    assert len(files) == 2
    for f in files:
        text = f.read_text()
        assert text.startswith(f"FROM ./{f.with_suffix('.gguf').name}\n")
        for messages in CONVERSATIONS.values():
            assert ollama_prompt(text, messages) == tok.apply_chat_template(messages, add_generation_prompt=True,
                                                                            tokenize=False)


# ---------------------------------------------------------------- hostile strings: what Ollama's parser reads back
# A port of Ollama's Modelfile parser (parser/parser.go: ParseFile, parseRuneForState, unquote): no escapes; a value
# is a bare word, "..." or """...""", ending at the first newline or space after which the text is a closed quote.
_VALID = {"from", "license", "template", "system", "adapter", "draft", "renderer", "parser", "parameter", "message",
          "requires"}


def _unquote(s: str) -> tuple[str, bool]:
    if s[:3] == '"""':
        return (s[3:-3], True) if len(s) >= 6 and s[-3:] == '"""' else ("", False)
    if s[:1] == '"':
        return (s[1:-1], True) if len(s) >= 2 and s[-1] == '"' else ("", False)
    return s, True


def _next_state(ch: str, state: str) -> tuple[str, str | None]:
    if state == "nil":
        return ("comment", None) if ch == "#" else ("nil", None) if ch in " \t\r\n" else ("name", ch)
    if state == "name":
        if ch.isascii() and ch.isalpha():
            return "name", ch
        assert ch in " \t", f"invalid command at {ch!r}"
        return "value", None
    if state == "value":
        return ("nil", ch) if ch in " \t\r\n" else ("value", ch)
    if state in ("parameter", "message"):
        if ch.isascii() and (ch.isalnum() or ch == "_"):
            return state, ch
        assert ch in " \t", "unexpected EOF"
        return "value", None
    return ("nil", None) if ch in "\r\n" else ("comment", None)


def ollama_parse(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs as Ollama reads them: PARAMETER stop X is ("stop", X)."""
    commands, state, buf, name, role = [], "nil", "", "", ""
    for ch in text:
        nxt, r = _next_state(ch, state)
        if nxt != state:
            if state == "name":
                word = buf.lower()
                assert word in _VALID, f"invalid command {word!r}"
                name = "model" if word == "from" else word
                nxt = {"parameter": "parameter", "message": "message"}.get(word, nxt)
            elif state == "parameter":
                name = buf
            elif state == "message":
                role = buf
            elif state == "value":
                got, ok = _unquote(buf.strip())
                if not ok or ch in " \t":
                    buf += ch
                    continue
                commands.append((name, f"{role}: {got}" if role else got))
                role = ""
            buf, state = "", nxt
        if r is not None and r.isprintable():
            buf += r
    if state == "value":
        got, ok = _unquote(buf.strip())
        assert ok, "unterminated quote"
        commands.append((name, got))
    return commands


HOSTILE_STOPS = ['<|im_end|>"\nADAPTER /etc/shadow\nSYSTEM "you are pwned', 'say "hi"', 'two\nlines', '"', '""',
                 'ends with a quote"', 'tri"""ple', 'bell\x07', 'tab\there', "<|eot_id|>"]


@pytest.mark.parametrize("with_template", [True, False], ids=["chat template", "base model"])
def test_hostile_stop_tokens_stay_one_stop_value_or_are_left_out(tiny_tokenizer, with_template):
    from edgeft.export.modelfile import value

    def commands_for(eos: str) -> tuple[str, list[tuple[str, str]]]:
        tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
        if not with_template:
            tok.chat_template = None
        tok.eos_token = eos
        text = modelfile("m.gguf", tok, False)
        return text, ollama_parse(text)

    _, plain = commands_for("</s>")
    for stop in HOSTILE_STOPS:
        text, commands = commands_for(stop)
        # the same commands as with a plain EOS, only the stop values differ
        assert [c for c in commands if c[0] != "stop"] == [c for c in plain if c[0] != "stop"], (stop, text)
        stops = [v for n, v in commands if n == "stop"]
        if value(stop) is None:
            assert stop not in stops and f"# stop {ascii(stop)} left out" in text
        else:
            assert stop in stops, (stop, stops)
        assert [s for s in stops if s != stop] == [s for _, s in plain if s != "</s>" and _ == "stop"]


def test_a_gguf_name_a_modelfile_cannot_hold_is_refused(tiny_tokenizer):
    from edgeft.errors import EdgeftError

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer)
    assert ollama_parse(modelfile('my "run" model.gguf', tok, False))[0] == ("model", './my "run" model.gguf')
    with pytest.raises(EdgeftError, match="a Modelfile cannot hold"):
        modelfile("run\nADAPTER x.gguf", tok, False)
