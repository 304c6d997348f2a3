"""The Ollama Modelfile written beside each GGUF, so `ollama create NAME -f FILE.Modelfile` works.

Its TEMPLATE must render, token for token, what the model's HF chat template renders (the text the model was
trained on), for every conversation: with or without a system message, one turn or many. Recognising template
families by their text misses details (SmolLM's default system prompt, Gemma folding the system message into the
first user turn, a BOS the template writes), so the HF template is rendered on probe conversations whose contents
are markers, and the text around the markers becomes the Go template: each role's opening and closing, the
generation prompt, the system turn and the default system prompt. The result is checked against the HF template
on the probes before it is written; a template this cannot express keeps Ollama's default (its guess from the
GGUF), and the Modelfile says so in a comment.

What Ollama hands the template (server/routes.go, template/template.go): the conversation's system message twice,
joined in .System and as a "system" entry of .Messages, and, when the request has no system message and the
Modelfile a SYSTEM line, that line inserted as the first message. So the template renders .System once and skips
"system" entries in its loop. Ollama tokenizes the rendered text with special tokens and adds BOS itself when the
GGUF says so (tokenizer.ggml.add_bos_token), so a BOS the HF template writes is left out of the TEMPLATE then.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_file
from ..errors import EdgeftError

# Probe contents: plain words no template rewrites (a template may trim or escape content).
SYSTEM, USER_1, ANSWER_1, USER_2, ANSWER_2 = "edgeftSystemProbe", "edgeftUserOne", "edgeftAnswerOne", \
    "edgeftUserTwo", "edgeftAnswerTwo"


class Untranslatable(Exception):
    """The HF chat template renders conversations in a way a Modelfile TEMPLATE cannot reproduce."""


@dataclass(frozen=True)
class ChatFormat:
    """A chat template as the literal text around each message, which is all a Modelfile TEMPLATE can express."""

    prefix: str  # before everything (a BOS that Ollama does not add itself)
    user: tuple[str, str]  # (opening, closing) around a user message's content
    assistant: tuple[str, str]
    generation: str  # after the last message: what the model continues from
    # "block": the system message is a turn of its own, rendered when there is one; "always": that turn is rendered
    # even without a system message (empty); "first_user": its content opens the first user message, then
    # system[1]; "none": the template has no system turn.
    system_mode: str
    system: tuple[str, str]
    default_system: str | None  # rendered when the conversation has no system message (the SYSTEM line)
    extra_bos: bool  # Ollama adds a BOS (the GGUF asks for it) that the HF template does not render


def _messages(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


# The conversations the derived format must render exactly as the HF template does.
PROBES = [
    _messages(("user", USER_1)),
    _messages(("system", SYSTEM), ("user", USER_1)),
    _messages(("user", USER_1), ("assistant", ANSWER_1), ("user", USER_2)),
    _messages(("system", SYSTEM), ("user", USER_1), ("assistant", ANSWER_1), ("user", USER_2)),
]


def _split(text: str, markers: list[str]) -> list[str]:
    """`text` cut at each marker in order: len(markers) + 1 pieces."""
    pieces, rest = [], text
    for m in markers:
        before, found, rest = rest.partition(m)
        if not found:
            raise Untranslatable(f"the template does not render the message content {m!r} as given")
        pieces.append(before)
    return [*pieces, rest]


def chat_format(tokenizer, bos_added: bool) -> ChatFormat:
    """The tokenizer's HF chat template as a ChatFormat, checked on PROBES; raises Untranslatable."""
    from ..prompt import apply_template

    def render(messages: list[dict], generation: bool = False) -> str:
        try:
            return apply_template(tokenizer, messages, generation_prompt=generation, tokenize=False)
        except EdgeftError as e:
            raise Untranslatable(str(e)) from None

    one = render(PROBES[0])
    head, close_u = _split(one, [USER_1])
    with_generation = render(PROBES[0], generation=True)
    if not with_generation.startswith(one):
        raise Untranslatable("the generation prompt is not added at the end")
    s0, s1, s2, s3, close_a = _split(render(_messages(("user", USER_1), ("assistant", ANSWER_1), ("user", USER_2),
                                                      ("assistant", ANSWER_2))),
                                     [USER_1, ANSWER_1, USER_2, ANSWER_2])
    if s0 != head or s1 != s3 or not s1.startswith(close_u) or not s2.startswith(close_a):
        raise Untranslatable("turns are rendered differently depending on their position")
    open_a, open_u = s1[len(close_u):], s2[len(close_a):]
    if not head.endswith(open_u):
        raise Untranslatable("the first user turn opens differently from the others")
    lead = head[:len(head) - len(open_u)]  # the prefix, and a default system turn if the template has one

    mode, system, default, prefix = "none", ("", ""), None, lead
    try:
        x0, x1, x2 = _split(render(PROBES[1]), [SYSTEM, USER_1])
    except Untranslatable:  # the template refuses a system message: Ollama's .System is left unrendered
        x0 = None
    if x0 is not None:
        if x2 != close_u:
            raise Untranslatable("a system message changes how the user turn closes")
        if x1.endswith(open_u) and x0.startswith(lead):  # a system turn of its own, none by default
            mode, system = "block", (x0[len(lead):], x1[:len(x1) - len(open_u)])
        elif x1.endswith(open_u) and lead.startswith(x0) and lead.endswith(x1[:len(x1) - len(open_u)]) and \
                len(lead) >= len(x0) + len(x1) - len(open_u):
            # a system turn even without a system message: the default prompt is what sits in it then
            close_s = x1[:len(x1) - len(open_u)]
            default = lead[len(x0):len(lead) - len(close_s)]
            bos = tokenizer.bos_token or ""
            prefix = bos if bos and x0.startswith(bos) else ""
            mode, system = ("always" if default == "" else "block"), (x0[len(prefix):], close_s)
            default = default or None
        elif x0 == lead + open_u:  # Gemma: the system message opens the first user message
            mode, system = "first_user", ("", x1)
        else:
            raise Untranslatable("the system message is rendered in a way a Modelfile cannot express")

    bos = tokenizer.bos_token or ""
    dropped_bos = bos_added and bool(bos) and prefix.startswith(bos)
    fmt = ChatFormat(prefix=prefix[len(bos):] if dropped_bos else prefix, user=(open_u, close_u),
                     assistant=(open_a, close_a), generation=with_generation[len(one):], system_mode=mode,
                     system=system, default_system=default, extra_bos=bos_added and not dropped_bos)
    for conversation in PROBES:
        if mode == "none" and conversation[0]["role"] == "system":
            continue  # the HF template refuses it too
        want = render(conversation, generation=True)
        got = (bos if dropped_bos else "") + render_like_ollama(fmt, conversation)
        if got != want:
            raise Untranslatable(f"the derived template renders {got!r} where the HF template renders {want!r}")
    return fmt


def render_like_ollama(fmt: ChatFormat, messages: list[dict]) -> str:
    """What Ollama renders with go_template(fmt) for this conversation (the runtime's BOS not included)."""
    if fmt.default_system is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": fmt.default_system}, *messages]
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    out = fmt.prefix
    if fmt.system_mode == "always" or (fmt.system_mode == "block" and system):
        out += fmt.system[0] + system + fmt.system[1]
    for i, m in enumerate(messages):
        if m["role"] == "user":
            folded = system + fmt.system[1] if fmt.system_mode == "first_user" and system and i == 1 else ""
            out += fmt.user[0] + folded + m["content"] + fmt.user[1]
        elif m["role"] == "assistant":
            out += fmt.assistant[0] + m["content"] + fmt.assistant[1]
    return out + fmt.generation


def _text(s: str) -> str:
    """Literal template text: "{{" would open an action, so it is printed by one."""
    return s.replace("{{", '{{ "{{" }}')


def go_template(fmt: ChatFormat) -> str:
    """The TEMPLATE: Go text/template over Ollama's .System and .Messages, without whitespace trimming (every
    character outside an action is output)."""
    s_open, s_close = (_text(p) for p in fmt.system)
    t = _text(fmt.prefix)
    if fmt.system_mode == "block":
        t += f"{{{{ if .System }}}}{s_open}{{{{ .System }}}}{s_close}{{{{ end }}}}"
    elif fmt.system_mode == "always":
        t += f"{s_open}{{{{ .System }}}}{s_close}"
    t += '{{ range $i, $m := .Messages }}{{ if eq .Role "user" }}' + _text(fmt.user[0])
    if fmt.system_mode == "first_user":  # .Messages[0] is the system message when there is one
        t += f"{{{{ if and $.System (eq $i 1) }}}}{{{{ $.System }}}}{s_close}{{{{ end }}}}"
    t += ("{{ .Content }}" + _text(fmt.user[1]) + '{{ else if eq .Role "assistant" }}' + _text(fmt.assistant[0])
          + "{{ .Content }}" + _text(fmt.assistant[1]) + "{{ end }}{{ end }}" + _text(fmt.generation))
    return t


def _stops(fmt: ChatFormat, tokenizer) -> list[str]:
    """The special tokens that end an answer or open the next user turn, and EOS."""
    specials = set(tokenizer.all_special_tokens)
    found = sorted((s for s in specials if s in fmt.assistant[1]), key=fmt.assistant[1].index)
    found += sorted((s for s in specials if s in fmt.user[0]), key=fmt.user[0].index)[:1]
    if tokenizer.eos_token:
        found.append(tokenizer.eos_token)
    return list(dict.fromkeys(found))


# Ollama's view of templates.plain_prompt: every message that is not the assistant's, then a newline; the
# assistant's own earlier answers as they were.
PLAIN_TEMPLATE = ('{{ if .System }}{{ .System }}\n{{ end }}{{ range .Messages }}{{ if eq .Role "assistant" }}'
                  '{{ .Content }}{{ else }}{{ .Content }}\n{{ end }}{{ end }}')


def value(text: str) -> str | None:
    """`text` as a Modelfile value that Ollama's parser (parser/parser.go) reads back unchanged, or None where none
    does. The parser has no escapes: a value is a bare word, "..." or \"\"\"...\"\"\"\", and it ends at the first
    newline (or space) after which the text so far is a closed quote. So a stop token holding a quote and a
    newline, written in plain quotes, would end early and start a line of its own (another ADAPTER or SYSTEM):
    anything with a quote or a line break goes between triple quotes, which only \"\"\" itself can close; text
    holding \"\"\", or control characters the parser drops, is not written at all."""
    if '"""' in text or any(ord(ch) < 32 and ch not in "\n\t" for ch in text) or "\x7f" in text:
        return None
    if '"' in text or "\n" in text:
        return '"""' + text + '"""'
    return '"' + text + '"'


def modelfile(gguf_name: str, tokenizer, bos_added: bool) -> str:
    """The Modelfile: the GGUF, its chat template in Ollama's Go template syntax, the default system prompt,
    stop tokens. `bos_added`: the GGUF makes the runtime add BOS (tokenizer.ggml.add_bos_token)."""
    source = f"./{gguf_name}"
    source = source if re.fullmatch(r"[\w./+-]+", source) else value(source)  # a plain path stays bare
    if source is None or "\n" in source:
        raise EdgeftError(f"{gguf_name!r}: a GGUF name a Modelfile cannot hold (control characters or \"\"\"); "
                          f"rename the run or --out")
    lines = [f"FROM {source}"]
    if not tokenizer.chat_template:  # a base model: the plain rendering train used (templates.plain_prompt)
        lines += ["# the model has no chat template: each prompt turn followed by a newline, as edgeft trained it",
                  f'TEMPLATE """{PLAIN_TEMPLATE}"""']
        lines += _stop_lines([tokenizer.eos_token] if tokenizer.eos_token else [])
        lines.append("PARAMETER temperature 0.2")
        return "\n".join(lines) + "\n"
    try:
        fmt = chat_format(tokenizer, bos_added)
        template = go_template(fmt)
        if '"""' in template or '"""' in (fmt.default_system or ""):
            raise Untranslatable('it contains """, which ends a Modelfile value')
    except Untranslatable as e:
        lines.append(f"# edgeft could not translate the chat template ({e}); Ollama uses its own guess")
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    else:
        lines.append(f'TEMPLATE """{template}"""')
        if fmt.default_system is not None:
            lines.append(f'SYSTEM """{fmt.default_system}"""')
        if fmt.extra_bos:
            lines.append("# note: Ollama adds BOS (the GGUF asks for it) where the HF chat template writes none")
        stops = _stops(fmt, tokenizer)
    lines += _stop_lines(stops)
    lines.append("PARAMETER temperature 0.2")
    return "\n".join(lines) + "\n"


def _stop_lines(stops: list[str]) -> list[str]:
    out = []
    for stop in stops:
        quoted = value(stop)
        # ascii(): the comment itself must stay on one line
        out.append(f"PARAMETER stop {quoted}" if quoted else f"# stop {ascii(stop)} left out: no Modelfile value holds it")
    return out


def gguf_adds_bos(gguf_path: Path) -> bool:
    """Whether llama.cpp (and Ollama) add BOS to a prompt for this GGUF: its tokenizer.ggml.add_bos_token, else
    llama.cpp's default (SentencePiece vocabularies add it)."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields
    if "tokenizer.ggml.add_bos_token" in fields:
        return bool(fields["tokenizer.ggml.add_bos_token"].contents())
    model = fields.get("tokenizer.ggml.model")
    return model is not None and model.contents() == "llama"


def write_modelfile(gguf_path: Path, tokenizer) -> None:
    with atomic_file(gguf_path.with_suffix(".Modelfile")) as tmp:
        tmp.write_text(modelfile(gguf_path.name, tokenizer, gguf_adds_bos(gguf_path)))
