"""Reading a Bash command for the tool-call gate: one linear pass, and a strict idea of "plain".

`parse_command(text)` walks the text once, character by character (`ParsedCommand.steps` counts
the walk; it never exceeds the text's length), and returns:

- `segments`: every simple command it can see, each with its words resolved (quotes removed,
  escapes applied) and a normalised `text` the policy's regexes are searched in. Commands inside
  `$(...)`, backticks, `<(...)` and `( ... )` are segments of their own, found in the same pass;
  the outer word keeps a placeholder (`$(…)`, `` `…` ``) so a rule can see that something was
  substituted there (`curl https://x/$(…)`).
- `unclear`: why the command is not *plainly simple*. Plainly simple is one command, a program
  name written as plain text, arguments that are literal words (quotes around them are fine),
  and ordinary redirections (`> file`, `2>&1`). Anything else (compound commands, any `$`
  expansion, backticks, globs, braces, here-documents, `!`, comments, wrappers that run another
  command, shells and interpreters given inline code, aliases and other builtins that change
  what later runs, backslash-newline, /dev/tcp) is named here. The gate never *allows* a call
  with an unclear command; it asks or denies (docs/agent-runtimes.md).

Why hand-written: `shlex` resolves quotes but forgets where they were and what was expanded,
which is exactly what the strict rule needs; `bashlex` (last release 2023, a yacc grammar)
gives a full tree we would then have to distrust in the same places. Reading less, and saying
so, is the safer design: this parser does not need to understand Bash, only to notice when a
command is not the plain kind it does understand.

Pure: no I/O, importing nothing from the broker.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import cached_property

from broker.policy.shellwords import command_problems, is_name_start, strip_wrappers

SUBSTITUTION = "$(…)"
BACKTICKS = "`…`"
PROCESS_SUBSTITUTION = "<(…)"

# Characters that mean nothing special unquoted (ASCII only: anything else goes the slow way,
# where invisible and control characters are noticed).
_ORDINARY = re.compile(r"[A-Za-z0-9_./:=,+@-]+")
MAX_UNCLEAR = 8  # reasons kept: enough to explain, bounded however hostile the text
# Distinct simple commands the rules look at one by one. Past it the command is unclear (never
# allowed) and the rules still search its whole text, so the work per rule stays bounded.
MAX_MATCHED = 256


@dataclass(frozen=True)
class Segment:
    """One simple command: its words as Bash would pass them (as far as a plain reading can
    tell), its redirections, and the text the policy's regexes are searched in."""

    words: tuple[str, ...]
    redirects: tuple[str, ...]
    stripped: tuple[str, ...]  # the words without leading assignments and wrappers (`sudo`, `env` ...)
    text: str  # `FOO=1 sudo /usr/bin/git  push origin main > log` -> `git push origin main > log`

    @classmethod
    def of(cls, words: tuple[str, ...], redirects: tuple[str, ...] = ()) -> Segment:
        """Computed once here: every rule reads the same `text`."""
        stripped = strip_wrappers(list(words))
        shown = [stripped[0].rsplit("/", 1)[-1], *stripped[1:]] if stripped else []
        return cls(words, redirects, tuple(stripped), " ".join([*shown, *redirects]))


@dataclass(frozen=True)
class ParsedCommand:
    text: str
    segments: tuple[Segment, ...]
    unclear: tuple[str, ...]  # empty: plainly simple
    steps: int  # characters the scan visited (<= len(text)): the parse is linear by construction

    @property
    def plain(self) -> bool:
        return not self.unclear

    @cached_property
    def distinct(self) -> tuple[Segment, ...]:
        """The segments rules are matched against: one per distinct text, at most MAX_MATCHED
        (a command with more is unclear anyway; the rules also search its whole text)."""
        seen: dict[str, Segment] = {}
        for segment in self.segments:
            seen.setdefault(segment.text, segment)
            if len(seen) >= MAX_MATCHED:
                break
        return tuple(seen.values())


@dataclass
class _Frame:
    """One level of nesting: the top level, or the inside of `$(`, backticks, `(`, `<(`."""

    closer: str  # ")" or "`"; "" at the top level
    resume: str  # the quoting state to go back to when this frame closes ("u" or "d")
    words: list[str] = field(default_factory=list)
    redirects: list[str] = field(default_factory=list)
    word: list[str] | None = None  # the word being read; None between words
    word_quoted: bool = False  # the word being read had a quote or an escape in it
    program_quoted: bool = False
    pending_redirect: str | None = None  # an operator whose target word comes next


class _Scanner:
    def __init__(self, text: str) -> None:
        self.text = text
        self.frames = [_Frame(closer="", resume="u")]
        self.segments: list[Segment] = []
        self.unclear: dict[str, None] = {}  # ordered set
        self.steps = 0

    # --- bookkeeping ------------------------------------------------------------------------

    def flag(self, reason: str) -> None:
        if len(self.unclear) < MAX_UNCLEAR:
            self.unclear.setdefault(reason, None)

    @property
    def top(self) -> _Frame:
        return self.frames[-1]

    def add(self, chars: str, *, quoted: bool = False) -> None:
        frame = self.top
        if frame.word is None:
            frame.word = []
        frame.word.append(chars)
        frame.word_quoted |= quoted

    def end_word(self) -> None:
        frame = self.top
        if frame.word is None:
            return
        word = "".join(frame.word)
        if frame.pending_redirect is not None:
            frame.redirects.append(f"{frame.pending_redirect} {word}")
            frame.pending_redirect = None
        else:
            if not frame.words:
                frame.program_quoted = frame.word_quoted
            frame.words.append(word)
        frame.word, frame.word_quoted = None, False

    def end_segment(self) -> None:
        self.end_word()
        frame = self.top
        if frame.pending_redirect is not None:
            self.flag(f"redirection `{frame.pending_redirect}` without a target")
            frame.pending_redirect = None
        if frame.words or frame.redirects:
            self._judge(frame)
            self.segments.append(Segment.of(tuple(frame.words), tuple(frame.redirects)))
        frame.words, frame.redirects, frame.program_quoted = [], [], False

    def open_frame(self, closer: str, resume: str, placeholder: str, reason: str) -> None:
        self.flag(reason)
        self.add(placeholder)
        self.frames.append(_Frame(closer=closer, resume=resume))

    def close_frame(self) -> str:
        self.end_segment()
        return self.frames.pop().resume

    # --- the pass ---------------------------------------------------------------------------

    def run(self) -> ParsedCommand:
        text, n = self.text, len(self.text)
        state = "u"  # u: unquoted, s: in '...', d: in "..."
        i = 0
        while i < n:
            self.steps += 1
            c = text[i]
            nxt = text[i + 1] if i + 1 < n else ""
            if _suspicious(c) or (c == "\\" and _suspicious(nxt)):  # an escaped one is no better
                self.flag("control or invisible character")
            if state == "s":
                state, i = self.in_single_quotes(i, c)
            elif state == "d":
                state, i = self.in_double_quotes(i, c, nxt)
            else:
                state, i = self.unquoted(i, c, nxt)
        return self.finish(state)

    def in_single_quotes(self, i: int, c: str) -> tuple[str, int]:
        """`c` at `i` inside '...': literal up to the closing quote. Returns (state, next index)."""
        if c == "'":
            return "u", i + 1
        self.add(c, quoted=True)
        return "s", i + 1

    def in_double_quotes(self, i: int, c: str, nxt: str) -> tuple[str, int]:
        """`c` at `i` inside "...": escapes, expansions, history. Returns (state, next index)."""
        if c == '"':
            return "u", i + 1
        if c == "\\":
            if nxt == "\n":
                self.flag("backslash-newline")
            if nxt and nxt in '$`"\\\n':
                self.add(nxt if nxt != "\n" else "", quoted=True)
                return "d", i + 2
            self.add(c, quoted=True)
            return "d", i + 1
        if c == "$":
            return self.dollar(i, "d")
        if c == "`":
            return self.backtick(i, "d")
        if c == "!":
            self.flag("`!` (history expansion)")
        self.add(c, quoted=True)
        return "d", i + 1

    def unquoted(self, i: int, c: str, nxt: str) -> tuple[str, int]:
        """`c` at `i` outside quotes: words, operators, frames. Returns (state, next index)."""
        plain = _ORDINARY.match(self.text, i)
        if plain is not None:  # a run of characters with no meaning to the shell, taken at once
            run = plain.group()
            self.add(run)
            self.steps += len(run) - 1
            return "u", i + len(run)
        if c in " \t":
            self.end_word()
            return "u", i + 1
        if c in "\n\r":
            self.flag("several lines")
            self.end_segment()
            return "u", i + 1
        if c == "\\":
            return "u", self.backslash(i, c, nxt)
        if c in "'\"":
            self.add("", quoted=True)
            return ("s" if c == "'" else "d"), i + 1
        if c == "$":
            return self.dollar(i, "u")
        if c == "`":
            return self.backtick(i, "u")
        if c == "(":
            self.end_word()
            self.open_frame(")", "u", "", "subshell or grouping `( )`")
            return "u", i + 1
        if c == ")":
            return self.close_paren(), i + 1
        if c in ";&|":
            op = c + nxt if nxt in ";&|>" and nxt else c
            self.flag({"&": "background `&`", "&>": "redirection `&>`"}.get(op, f"compound command `{op}`"))
            self.end_segment()
            return "u", i + len(op)
        if c in "<>":
            return "u", self.redirection(i)
        self.flag_literal(c, nxt)
        self.add(c)
        return "u", i + 1

    def backslash(self, i: int, c: str, nxt: str) -> int:
        """An unquoted backslash at `i`; returns the next index."""
        if nxt == "\n":
            self.flag("backslash-newline")
            return i + 2
        if nxt:
            self.add(nxt, quoted=True)
            return i + 2
        self.flag("backslash at the end")
        self.add(c)
        return i + 1

    def close_paren(self) -> str:
        """An unquoted `)`: closes the innermost `(` frame (the state it resumes), or is unbalanced."""
        if len(self.frames) > 1 and self.top.closer == ")":
            return self.close_frame()
        self.flag("unbalanced `)`")
        self.end_segment()
        return "u"

    def flag_literal(self, c: str, nxt: str) -> None:
        """Flag an unquoted character taken literally that the shell would still read something into."""
        if c == "#" and self.top.word is None:
            self.flag("comment `#`")
        elif c == "!":
            self.flag("`!` (history expansion or negation)")
        elif c in "{}":
            self.flag("braces `{ }`")
        elif c in "*?[":
            self.flag("glob `*?[`")
        elif c == "~" and self.top.word is None and nxt not in ("/", " ", "\t", ""):
            self.flag("`~user` expansion")

    def finish(self, state: str) -> ParsedCommand:
        """The end of the text: flag what was left open, close it, and the command as parsed."""
        if state != "u":
            self.flag("unterminated quote")
        if len(self.frames) > 1:
            self.flag("unclosed `(`, `$(` or backtick")
        while len(self.frames) > 1:
            self.close_frame()
        self.end_segment()
        if len(self.segments) > MAX_MATCHED:
            self.flag(f"more than {MAX_MATCHED} simple commands")
        if "/dev/tcp/" in self.text or "/dev/udp/" in self.text:
            self.flag("/dev/tcp or /dev/udp")
        return ParsedCommand(self.text, tuple(self.segments), tuple(self.unclear), self.steps)

    def dollar(self, i: int, state: str) -> tuple[str, int]:
        """`$` at `i` (unquoted or in double quotes): every expansion is unclear; `$(` opens a
        frame whose commands are segments of their own. Returns (state, next index)."""
        text = self.text
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if nxt == "(":
            reason = "arithmetic `$((`" if text.startswith("((", i + 1) else "command substitution `$(`"
            self.open_frame(")", state, SUBSTITUTION, reason)
            return "u", i + 2
        if nxt == "{":
            end = text.find("}", i + 2)
            end = len(text) if end < 0 else end + 1
            self.flag("variable indirection `${!`" if text.startswith("!", i + 2) else "parameter expansion `${`")
            self.add(text[i:end])
            self.steps += end - i - 1
            return state, end
        if state == "u" and nxt in ("'", '"'):
            self.flag("ANSI-C quoting `$'`" if nxt == "'" else "locale quoting `$\"`")
            self.add("", quoted=True)
            return ("s" if nxt == "'" else "d"), i + 2
        if nxt and (is_name_start(nxt) or nxt.isdigit() or nxt in "@*#?$!-"):
            self.flag("variable expansion `$`")
        self.add("$")
        return state, i + 1

    def backtick(self, i: int, state: str) -> tuple[str, int]:
        frame = self.top
        if len(self.frames) > 1 and frame.closer == "`":
            return self.close_frame(), i + 1
        self.open_frame("`", state, BACKTICKS, "backticks")
        return "u", i + 1

    def redirection(self, i: int) -> int:
        """`<`, `>` and friends at `i` (unquoted). Plain ones (`> f`, `>> f`, `< f`, `2> f`,
        `2>&1`) are kept with their target; the rest are unclear."""
        text, frame = self.text, self.top
        c = text[i]
        nxt = text[i + 1] if i + 1 < len(text) else ""
        fd = ""
        if frame.word is not None and not frame.word_quoted and "".join(frame.word).isdigit():
            fd, frame.word = "".join(frame.word), None
        else:
            self.end_word()
        if nxt == "(":
            self.open_frame(")", "u", PROCESS_SUBSTITUTION, f"process substitution `{c}(`")
            return i + 2
        if c == "<" and nxt == "<":
            self.flag("here-string `<<<`" if text.startswith("<", i + 2) else "here-document `<<`")
            frame.pending_redirect = fd + ("<<<" if text.startswith("<", i + 2) else "<<")
            return i + len(frame.pending_redirect) - len(fd)
        op = c
        if (c, nxt) in ((">", ">"), (">", "|"), ("<", ">")):
            op += nxt
            if op != ">>":
                self.flag(f"redirection `{op}`")
        elif nxt == "&":
            j = i + 2
            while j < len(text) and (text[j].isdigit() or text[j] == "-"):
                j += 1
            if j > i + 2:  # `2>&1`, `>&-`: a descriptor, not a file
                frame.redirects.append(fd + text[i:j])
                self.steps += j - i - 1
                return j
            op += "&"
            self.flag(f"redirection `{op}`")
        frame.pending_redirect = fd + op
        return i + len(op)

    def _judge(self, frame: _Frame) -> None:
        """What makes one segment's words unclear, beyond what the scan saw."""
        if any("/dev/tcp/" in w or "/dev/udp/" in w for w in (*frame.words, *frame.redirects)):
            self.flag("/dev/tcp or /dev/udp")
        for problem in command_problems(frame.words, program_quoted=frame.program_quoted):
            self.flag(problem)


def _suspicious(c: str) -> bool:
    return bool(c) and ((c < " " and c not in "\t\n") or (c >= "\x7f" and _invisible(c)))


def _invisible(c: str) -> bool:
    """DEL, C1 controls, bidi and zero-width format characters, unusual spaces (NBSP ...), private
    use and unassigned code points: what makes the text a human reads differ from what runs."""
    return c == "\x7f" or unicodedata.category(c) in ("Cc", "Cf", "Co", "Cn", "Cs", "Zs", "Zl", "Zp")


def parse_command(text: str) -> ParsedCommand:
    """Read `text` once. Callers cap its size first (the gate: `tools.max_command_bytes`)."""
    return _Scanner(text).run()
