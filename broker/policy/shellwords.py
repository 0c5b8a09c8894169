"""The words of a simple command the gate's reader judges: wrappers, shells, interpreters given
code, and options that run a command. Pure tables and two functions, used by broker/policy/shell.py."""

from __future__ import annotations

# Words that run the command after them (or change how later ones run): the gate cannot see
# what is run, so a command starting with one of them is unclear. The matcher still strips the
# common ones (`sudo rm -rf /` is matched as `rm -rf /`) so a deny rule keeps its say.
RUNNERS = frozenset({
    "sh", "bash", "zsh", "dash", "ksh", "mksh", "fish", "csh", "tcsh", "busybox",
    "eval", "exec", "env", "command", "builtin", "source", ".", "coproc", "time", "nohup", "sudo", "doas", "su",
    "runuser", "pkexec", "xargs", "parallel", "nice", "ionice", "timeout", "stdbuf", "setsid", "chroot", "watch",
    "script", "flock", "unbuffer", "strace", "ltrace", "nsenter", "unshare", "chrt", "taskset", "firejail",
    "gdb", "valgrind", "catchsegv", "expect", "tclsh", "wish", "chronic", "faketime", "proxychains", "torsocks",
    "alias", "unalias", "function", "declare", "typeset", "export", "set", "shopt", "trap", "enable", "hash",
    "readonly", "local", "let", "fc", "history", "bind", "complete", "caller", "mapfile", "readarray",
    "if", "then", "elif", "else", "fi", "while", "until", "for", "do", "done", "case", "esac", "select",
    "[[", "]]", "{", "}", "!",
})
# Wrappers `strip_wrappers` looks through for matching, with their options that take a value.
WRAPPERS: dict[str, frozenset[str]] = {
    "sudo": frozenset({"-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-U", "-T"}),
    "doas": frozenset({"-u", "-C"}),
    "env": frozenset({"-u", "-C", "-S"}),
    "nice": frozenset({"-n"}),
    "timeout": frozenset({"-s", "-k", "--signal", "--kill-after"}),
    "command": frozenset(), "exec": frozenset({"-a"}), "nohup": frozenset(), "time": frozenset({"-f", "-o"}),
    "builtin": frozenset(), "stdbuf": frozenset({"-i", "-o", "-e"}), "setsid": frozenset(), "xargs": frozenset(
        {"-a", "-d", "-E", "-I", "-L", "-n", "-P", "-s"}),
}
# Interpreters and the options that hand them code on the command line.
_INLINE_CODE: dict[str, frozenset[str]] = {
    "python": frozenset("c"), "pypy": frozenset("c"), "perl": frozenset("eE"), "ruby": frozenset("e"),
    "node": frozenset("ep"), "nodejs": frozenset("ep"), "deno": frozenset("e"), "bun": frozenset("e"),
    "php": frozenset("r"), "lua": frozenset("e"), "osascript": frozenset("e"), "pwsh": frozenset("cC"),
    "powershell": frozenset("cC"), "awk": frozenset(), "gawk": frozenset(), "mawk": frozenset(),
    "vim": frozenset("cS"), "vi": frozenset("cS"), "nvim": frozenset("cS"), "ex": frozenset("cS"),
    "view": frozenset("cS"),
}
# Options of ordinary programs that run a command they are given (tar, zip, rsync, less ...).
_RUNS_A_COMMAND = ("--to-command", "--use-compress-program", "--checkpoint-action", "--info-script",
                   "--new-volume-script", "--rsh-command", "--unzip-command", "-TT", "--ssh")
_LONG_INLINE = frozenset({"--eval", "--print", "--command", "--exec", "--cmd"})
_EDITORS = frozenset({"vim", "vi", "nvim", "ex", "view"})  # `vim +'!sh'` runs an Ex command
# `git -c core.pager='sh -c ...'` and friends run whatever they are given.
_GIT_RUNS = ("-c", "--config-env", "--upload-pack", "--receive-pack", "--exec")


def is_name_start(c: str) -> bool:
    return c.isalpha() or c == "_"


def is_assignment(word: str) -> bool:
    name, eq, _ = word.partition("=")
    return bool(eq) and bool(name) and is_name_start(name[0]) and all(ch.isalnum() or ch == "_" for ch in name)


def command_problems(words: list[str], *, program_quoted: bool) -> list[str]:
    """Why one simple command's words are not plainly simple (empty: they are)."""
    problems: list[str] = []
    k = 0
    while k < len(words) and is_assignment(words[k]):
        k += 1
    if k:
        problems.append("variable assignment before the command")
    if k == len(words):
        return problems
    if program_quoted and k == 0:
        problems.append("quoted or escaped command name")
    program, args = words[k].rsplit("/", 1)[-1], words[k + 1:]
    if not program.isascii():
        problems.append("non-ASCII command name")
    if not program or program in RUNNERS:
        return [*problems, f"`{program[:32]}` runs another command or changes what runs"]
    if any(w.startswith(_RUNS_A_COMMAND) for w in args):
        problems.append("an option that runs a command")
    base = program.rstrip("0123456789.")
    if base in _INLINE_CODE:
        letters = _INLINE_CODE[base]
        if not letters or any(  # awk: the program text itself is code that can run commands
                w in _LONG_INLINE or (base in _EDITORS and w.startswith("+"))
                or (w.startswith("-") and not w.startswith("--") and letters & set(w[1:])) for w in args):
            problems.append(f"inline code given to `{program[:32]}`")
    elif program == "git" and (
            any(w in _GIT_RUNS or w.startswith(tuple(f"{o}=" for o in _GIT_RUNS if o.startswith("--"))) for w in args)
            or (args[:1] == ["clone"] and "-u" in args)):  # `git clone -u` is --upload-pack
        problems.append("git option that runs a command")
    return problems


def strip_wrappers(words: list[str]) -> list[str]:
    """Drop leading `VAR=value`s and wrappers with their options: `sudo -u root env X=1 git push` -> `git push`.
    For matching only: a command that needed this is already unclear."""
    i = 0
    while i < len(words):
        word = words[i]
        name = word.rsplit("/", 1)[-1]
        if is_assignment(word):
            i += 1
        elif name in WRAPPERS:
            takes_value = WRAPPERS[name]
            i += 1
            while i < len(words) and words[i].startswith("-") and words[i] != "--":
                i += 2 if words[i] in takes_value else 1
            if i < len(words) and words[i] == "--":
                i += 1
            if name == "timeout" and i < len(words) and words[i][:1].isdigit():
                i += 1  # the duration
        else:
            break
    return words[i:]
