"""The whole confinement policy (docs/security.md): which file may run, with which interpreter
options, arguments and environment. Pure policy: it reads the file system, never spawns.

A producer picks a script inside cmd_dir, its arguments, environment and stdin; nothing here
may let it pick code of its own. Every refusal is a `ConfinementError` naming the cause.
"""

from __future__ import annotations

import fnmatch
import functools
import os
import re
import shutil
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from task_job.errors import ConfinementError

NAME_MAX = 255
PATH_MAX = 4096
HEAD_BYTES = 256  # enough of a file for its shebang line (the kernel reads 256 too)

# -- environment ---------------------------------------------------------------------------

# Names a loader, shell, interpreter or common tool reads as code, as options that load code,
# or as a path to code or configuration. Matched case-insensitively as glob patterns, by
# family: a variable nobody listed by name is still caught by its family. Deny wins over allow.
CODE_ENV_DENY: tuple[str, ...] = (
    # the dynamic loader and libc
    "LD_*", "GCONV_PATH", "GETCONF_DIR", "HOSTALIASES", "LOCALDOMAIN", "RES_OPTIONS",
    "RESOLV_*", "MALLOC_*", "GLIBC_*", "NLSPATH", "LOCPATH", "TZDIR", "NIS_PATH",
    # shells
    "BASH_*", "BASH", "BASHOPTS", "SHELLOPTS", "ENV", "IFS", "CDPATH", "GLOBIGNORE", "FPATH",
    "PS1", "PS2", "PS3", "PS4", "PROMPT_*", "PROMPT_COMMAND", "ZDOTDIR", "KSH_*", "HISTFILE",
    "HISTCONTROL", "INPUTRC", "MAIL", "MAILPATH", "MAILCHECK", "EXECIGNORE", "POSIXLY_CORRECT",
    # interpreters
    "PYTHON*", "PERL*", "PERL5*", "RUBY*", "GEM_*", "BUNDLE_*", "NODE_*", "NPM_*", "YARN_*",
    "JAVA*", "_JAVA*", "JDK_*", "CLASSPATH", "TCL*", "TK_*", "LUA_*", "PHP*", "R_*", "JULIA_*",
    "GUILE_*", "ERL_*", "DOTNET_*", "CORECLR_*", "COMPlus_*", "GOFLAGS", "GOROOT", "GOPATH",
    "GOENV", "GOTOOLCHAIN", "GOBIN", "GOPROXY", "CGO_*", "RUST*", "CARGO*",
    "AWKPATH", "AWKLIBPATH", "EMACS*", "VIM*", "EXINIT", "MYVIMRC", "GVIMINIT",
    # tools that run commands or load plugins named by a variable
    "GIT_*", "SSH_*", "*_ASKPASS", "*_RSH", "RSYNC_*", "TAR_OPTIONS", "MAKE*", "MFLAGS",
    "LESS*", "PAGER", "MANPAGER", "MANOPT", "EDITOR", "VISUAL", "BROWSER", "SUDO_*",
    "OPENSSL_*", "SSL_*", "GNUTLS_*", "KRB5*", "GTK_*", "GDK_*", "GIO_*", "QT_*", "DBUS_*",
    "PKG_CONFIG*", "LIBRARY_PATH", "CPATH", "C_INCLUDE_PATH", "CPLUS_INCLUDE_PATH", "GNUPGHOME",
    "SYSTEMD_*", "TERMINFO*", "TERMCAP", "LD_LIBRARY_PATH", "PROMPT", "CURL_HOME", "WGETRC",
    "GETOPT_COMPATIBLE", "GCONV_*", "DYLD_*",
)
# Locations the operator chose for the executor: a task may not move them (a HOME elsewhere
# feeds ~/.gitconfig, ~/.profile, …), but the executor's own values are passed on.
PLACE_ENV_DENY: tuple[str, ...] = ("PATH", "HOME", "SHELL", "XDG_*", "TMPDIR", "USER", "LOGNAME")
# Values checked as sudo's env_check does: a locale or terminal name may not be a path or a
# format, a TZ may not point at a file outside the zoneinfo tree.
_CHECKED_VALUES = re.compile(r"(?i)(LANG|LANGUAGE|LC_[A-Z_]*|TERM|COLORTERM)\Z")
# The executor's own variables that must never reach a task: its config and credentials.
SECRET_ENV: tuple[str, ...] = (
    "TASK_JOB_*", "*PASSWORD*", "*PASSWD*", "*SECRET*", "*TOKEN*", "*CREDENTIAL*", "*_KEY",
    "*_KEY_ID", "*APIKEY*", "*API_KEY*", "*PRIVATE*", "REDISCLI_AUTH", "*_AUTH", "SSH_AUTH_SOCK",
    "KRB5CCNAME", "*COOKIE*", "*SESSION*",
)
_URL_WITH_PASSWORD = re.compile(r"://[^/@\s]*:[^/@\s]*@")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
DEFAULT_ENV_ALLOW: tuple[str, ...] = ("*",)
VERDICTS_MAX = 4096  # names remembered as admitted: at most 4096 x 128 characters
VERDICT_NAME_MAX = 128


class Names:
    """A set of glob patterns over variable names, matched without a regular expression for
    the shapes the lists use (NAME, PREFIX*, *SUFFIX, *PART*): a set lookup and C-level
    startswith/endswith calls, about a microsecond per name however long the lists grow."""

    __slots__ = ("exact", "prefixes", "suffixes", "parts", "other", "fold", "everything")

    def __init__(self, patterns: Iterable[str], *, ignore_case: bool) -> None:
        self.fold = ignore_case
        exact: set[str] = set()
        prefixes: list[str] = []
        suffixes: list[str] = []
        parts: list[str] = []
        other: list[str] = []
        self.everything = False
        for pattern in patterns:
            p = pattern.upper() if ignore_case else pattern
            core = p.strip("*")
            if any(c in core for c in "*?[]"):
                other.append(pattern)
            elif p == "*":
                self.everything = True
            elif p.startswith("*") and p.endswith("*"):
                parts.append(core)
            elif p.endswith("*"):
                prefixes.append(core)
            elif p.startswith("*"):
                suffixes.append(core)
            else:
                exact.add(p)
        self.exact = frozenset(exact)
        self.prefixes = tuple(prefixes)
        self.suffixes = tuple(suffixes)
        self.parts = tuple(parts)
        body = "|".join(fnmatch.translate(p) for p in other)
        self.other = re.compile(body, re.IGNORECASE if ignore_case else 0) if body else None

    def match(self, name: str) -> bool:
        if self.everything:
            return True
        key = name.upper() if self.fold else name
        return (key in self.exact or key.startswith(self.prefixes) or key.endswith(self.suffixes)
                or any(part in key for part in self.parts)
                or (self.other is not None and self.other.match(name) is not None))


def _tz_is_safe(value: str) -> bool:
    """sudo's tz_is_safe: a zone name, or a path inside the zoneinfo tree, never '..'."""
    path = value[1:] if value.startswith(":") else value
    if path.startswith("/") and not path.startswith(("/usr/share/zoneinfo/", "/usr/lib/zoneinfo/")):
        return False
    return ".." not in path.split("/") and path.isprintable() and len(path) < PATH_MAX


@dataclass(frozen=True, slots=True)
class EnvPolicy:
    """sudo's env_reset model: a task variable must be admitted by the operator's allow-list
    (env_keep) and not caught by the deny families (env_delete), and its value must pass the
    checks (env_check). The executor's own environment is filtered once (`inherited`)."""

    allow: Names
    deny: Names
    place: Names
    secret: Names
    # Names admitted before that need no value check (refused ones and checked ones are not
    # kept). Bounded: cleared when full, since producers choose the names.
    _verdicts: dict[str, None] = field(default_factory=dict)

    @classmethod
    def build(cls, allow: Sequence[str] = DEFAULT_ENV_ALLOW, deny: Sequence[str] = ()) -> EnvPolicy:
        return cls(allow=Names(allow, ignore_case=False),
                   deny=Names((*CODE_ENV_DENY, *deny), ignore_case=True),
                   place=Names(PLACE_ENV_DENY, ignore_case=True),
                   secret=Names(SECRET_ENV, ignore_case=True))

    def refusal(self, name: str, value: str) -> str | None:
        """Why a task may not set this variable, or None when it may."""
        why = self._name_refusal(name)
        if why is not None or name.upper() == "TZ" or _CHECKED_VALUES.match(name):
            return why or self._value_refusal(name, value)
        if len(name) <= VERDICT_NAME_MAX:
            if len(self._verdicts) >= VERDICTS_MAX:
                self._verdicts.clear()
            self._verdicts[name] = None
        if "\x00" in value:
            return f"env variable {name} holds a NUL character"
        return None

    def _name_refusal(self, name: str) -> str | None:
        if not _ENV_NAME.match(name):
            return f"env variable {name[:64]!r} is not a well-formed name"
        shown = name if len(name) <= 64 else name[:64] + "…"
        if self.deny.match(name) or self.place.match(name):
            return f"env variable {shown} is refused (loaders, shells or interpreters read it as code or a path to code)"
        if not self.allow.match(name):
            return f"env variable {shown} is not allowed by task_env_allow"
        return None

    def _value_refusal(self, name: str, value: str) -> str | None:
        if "\x00" in value:
            return f"env variable {name} holds a NUL character"
        if name.upper() == "TZ":
            if not _tz_is_safe(value):
                return f"env variable {name} names a file outside the zoneinfo tree"
        elif _CHECKED_VALUES.match(name) and ("/" in value or "%" in value):
            return f"env variable {name} may not hold '/' or '%'"
        return None

    def check(self, requested: Mapping[str, str]) -> None:
        """Raise ConfinementError naming the first variable a task may not set."""
        admitted = self._verdicts
        for name, value in requested.items():
            if name in admitted and "\x00" not in value:
                continue  # a name seen before, admitted without a value check
            why = self.refusal(name, value)
            if why is not None:
                raise ConfinementError(why)

    def inherited(self, environ: Mapping[str, str]) -> dict[str, str]:
        """The executor's environment as tasks get it: without task-job's own settings, without
        credentials (by name, or a URL carrying a password) and without the code families. The
        locations (PATH, HOME, …) are kept: the operator set them."""
        return {
            k: v for k, v in environ.items()
            if _ENV_NAME.match(k) and not self.secret.match(k) and not self.deny.match(k)
            and not _URL_WITH_PASSWORD.search(v)
        }


# -- interpreters and their options --------------------------------------------------------

# Per family, the options known to be inert: none runs inline code, reads the program from
# anywhere but the script, loads a module or file named by the option, or writes a file.
# Anything not listed is refused.
@dataclass(frozen=True, slots=True)
class _Options:
    flags: frozenset[str]  # single-letter flags, combinable (-eux)
    valued: Mapping[str, frozenset[str] | None]  # option -> allowed values (None: any)
    long: frozenset[str]  # whole-word options


_FAMILIES: dict[str, _Options] = {
    # sh/bash/dash: -k (assignments anywhere), -i (reads ~/.bashrc), -s/-c (code from stdin or
    # argv), -l/--login (profiles), --rcfile/--init-file, -O (shopt), --debugger are refused.
    "sh": _Options(
        flags=frozenset("aefhmnuvxBCEHPT"),
        valued={"-o": frozenset({"errexit", "nounset", "pipefail", "xtrace", "verbose", "noglob",
                                 "noclobber", "allexport", "errtrace", "functrace", "posix",
                                 "noexec", "notify", "nolog"}),
                "+o": None},
        long=frozenset({"--norc", "--noprofile", "--posix", "--restricted", "--verbose",
                        "--noediting"}),
    ),
    # python: -c/-m/-i/- run other code; -W with a category imports its module; most -X
    # options are harmless but pycache_prefix writes elsewhere and others may load code.
    "python": _Options(
        flags=frozenset("bBdEIOPqsSuvx"),
        valued={"-W": frozenset({"ignore", "default", "error", "always", "module", "once"}),
                "-X": frozenset({"utf8", "utf8=0", "utf8=1", "faulthandler", "importtime",
                                 "dev", "warn_default_encoding", "no_debug_ranges",
                                 "tracemalloc"})},
        long=frozenset(),
    ),
    # perl: -n/-p/-i wrap the script in while (<>), whose two-argument open runs commands
    # named by arguments; -s sets variables from arguments; -M/-m/-I/-d/-x/-S/-e/-E/-F/-U
    # load or find other code.
    "perl": _Options(flags=frozenset("lTtwWX"), valued={}, long=frozenset()),
}


def family_of(path: str) -> str:
    """The family of an interpreter, by its file name: sh, python, perl or other."""
    base = os.path.basename(path)
    if base in ("sh", "bash", "dash", "zsh", "ksh", "ash", "mksh"):
        return "sh"
    if re.match(r"python[0-9.]*\Z", base):
        return "python"
    if re.match(r"perl[0-9.]*\Z", base):
        return "perl"
    return "other"


def _check_options(argv: Sequence[str], family: str, name: str) -> int:
    """Index of the script in argv (argv[0] is the interpreter); raises on any option not
    known to be inert."""
    opts = _FAMILIES.get(family, _Options(frozenset(), {}, frozenset()))
    i = 1
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return i + 1
        if arg in opts.valued:
            allowed = opts.valued[arg]
            value = argv[i + 1] if i + 1 < len(argv) else None
            if value is None or (allowed is not None and value not in allowed):
                raise ConfinementError(
                    f"interpreter option {arg} {value!r} of {name} is refused (not a known inert value)")
            i += 2
            continue
        if arg in opts.long:
            i += 1
            continue
        if len(arg) > 1 and (arg[0] == "-" or (arg[0] == "+" and family == "sh")):
            if arg.startswith("--") or not set(arg[1:]) <= opts.flags:
                raise ConfinementError(
                    f"interpreter option {arg!r} of {name} is refused (it may run or load other code)")
            i += 1
            continue
        return i
    return i


# -- perl's two-argument open --------------------------------------------------------------

def _opens_a_command(arg: str) -> bool:
    """True when perl's two-argument open (`while (<>)` reads @ARGV with it) would take the
    argument as a command or a mode rather than a file name. open strips white space first."""
    word = arg.strip()
    return word.startswith(("|", "<", ">", "+<", "+>")) or word.endswith("|")


def check_perl_args(script: str, args: Sequence[str]) -> None:
    for arg in args:
        if _opens_a_command(arg):
            raise ConfinementError(
                f"argument {arg[:64]!r} to the perl script {os.path.basename(script)} is refused: "
                "perl's <> would open it as a command or a mode (see perl_args_unchecked)")


# -- paths ---------------------------------------------------------------------------------

def inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _check_length(word: str, what: str) -> None:
    if len(word) > PATH_MAX or any(len(part) > NAME_MAX for part in word.split("/")):
        raise ConfinementError(f"{what} {word[:64]!r}… is too long for a path")


def _workdir(root: str, cwd: str | None) -> str:
    if not cwd:
        return root
    _check_length(cwd, "cwd")
    path = os.path.realpath(os.path.join(root, cwd))
    if not inside(path, root):
        raise ConfinementError(f"cwd {cwd!r} resolves to {path}, outside cmd_dir {root}")
    if not os.path.isdir(path):
        raise ConfinementError(f"cwd {cwd!r} is not a directory inside cmd_dir")
    return path


@dataclass(frozen=True, slots=True)
class FileFacts:
    """What was seen of a file through the descriptor that was checked."""

    path: str
    executable: bool
    shebang: str | None  # the interpreter word of a '#!' line
    elf: bool


_PROC_FD = os.path.isdir("/proc/self/fd")


def inspect(word: str, workdir: str, root: str, what: str) -> FileFacts:
    """Open the file word names inside cmd_dir and look at it through that one descriptor.

    Where /proc is mounted, the kernel's name for what was opened is the resolution that is
    checked: one lookup, and no path swapped between a check and the open can slip through
    (docs/security.md says what window remains). Paths that leave cmd_dir by their very
    spelling are refused before anything is opened."""
    _check_length(word, what)
    joined = os.path.join(workdir, word)
    fast = _PROC_FD and inside(os.path.normpath(joined), root)
    path = joined if fast else os.path.realpath(joined)
    if not fast and not inside(path, root):
        raise ConfinementError(f"{what} {word!r} resolves to {path}, outside cmd_dir {root}")
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY | (0 if fast else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise ConfinementError(f"{what} {word!r} is not a file inside cmd_dir ({exc.strerror})") from exc
    try:
        if fast:
            path = os.readlink(f"/proc/self/fd/{fd}")
            if not inside(path, root):
                raise ConfinementError(f"{what} {word!r} resolves to {path}, outside cmd_dir {root}")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfinementError(f"{what} {word!r} is not a file inside cmd_dir")
        head = os.read(fd, HEAD_BYTES)
    finally:
        os.close(fd)
    shebang = None
    if head.startswith(b"#!"):
        line = head[2:].split(b"\n", 1)[0].decode("utf-8", "replace").split()
        if line and os.path.basename(line[0]) == "env":  # #!/usr/bin/env [-S] [V=x] perl
            line = [w for w in line[1:] if not w.startswith("-") and "=" not in w]
        shebang = line[0] if line else None
    executable = bool(st.st_mode & 0o111) and os.access(path, os.X_OK)
    return FileFacts(path, executable, shebang, head.startswith(b"\x7fELF"))


# -- the policy ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _interpreters(names: tuple[str, ...], path_env: str | None) -> dict[str, str]:
    """Real path of each configured interpreter -> its family. Looked up once per executor:
    if an interpreter is swapped later, its new path is simply not an interpreter (refused)."""
    found: dict[str, str] = {}
    for name in names:
        where = shutil.which(name, path=path_env)
        if where:
            found[os.path.realpath(where)] = family_of(name)
    return found


@functools.lru_cache(maxsize=256)
def _bare_interpreter(word: str, interpreters: tuple[str, ...], path_env: str | None
                      ) -> tuple[str, str] | None:
    """(real path, family) when PATH finds a bare word to be a configured interpreter.
    Looked up once per word (words are at most NAME_MAX long): what PATH held at the first
    use stands until the executor restarts."""
    located = shutil.which(word, path=path_env)
    if not located:
        return None
    interp = os.path.realpath(located)
    family = _interpreters(interpreters, path_env).get(interp)
    return (interp, family) if family else None


class _RootCache:
    """realpath(cmd_dir), looked up again whenever the directory it names changes identity (a
    symlinked cmd_dir switched to a new release): a stat instead of a walk per task. A stale
    entry could only refuse a task (files opened under the new path are not inside the old
    one), never admit one."""

    __slots__ = ("key", "real")

    def __init__(self) -> None:
        self.key: tuple[int, int] | None = None
        self.real = ""

    def resolve(self, cmd_dir: str) -> str:
        try:
            st = os.stat(cmd_dir)
        except OSError:
            return os.path.realpath(cmd_dir)
        key = (st.st_dev, st.st_ino)
        if key != self.key:
            self.real, self.key = os.path.realpath(cmd_dir), key
        return self.real


@functools.lru_cache(maxsize=8)
def _script_interpreter(word: str, path_env: str | None) -> tuple[str, str] | None:
    located = shutil.which(word, path=path_env) if "/" not in word else word
    if not located or not os.access(located, os.X_OK):
        return None
    return os.path.realpath(located), family_of(word)


@dataclass(frozen=True, slots=True)
class Policy:
    """Confinement of one executor, built once from its config (see `confine`)."""

    cmd_dir: str
    interpreters: tuple[str, ...] = ("sh", "bash", "python3", "perl")
    mode: str = "strict"
    path_env: str | None = None
    script_interpreter: str = "bash"
    perl_args_unchecked: frozenset[str] = frozenset()  # real paths of exempt scripts
    _root: _RootCache = field(default_factory=lambda: _RootCache())

    def workdir(self, cwd: str | None = None) -> str:
        """A task's working directory: cmd_dir, or `cwd` checked to be inside it."""
        return _workdir(self._root.resolve(self.cmd_dir), cwd)

    def confine(self, argv: Sequence[str], cwd: str | None = None) -> tuple[list[str], str]:
        """Check argv against docs/security.md; return (argv to exec, working directory).
        argv[0] comes back as the interpreter's or the command's real path."""
        root = self._root.resolve(self.cmd_dir)
        workdir = _workdir(root, cwd)
        word = argv[0]
        if self.mode == "cwd":
            if "/" in word:
                return [os.path.join(workdir, word), *argv[1:]], workdir
            found = shutil.which(word, path=self.path_env) or os.path.join(workdir, word)
            return [found, *argv[1:]], workdir

        _check_length(word, "command")
        as_interp = self._as_interpreter(word)
        if as_interp is not None and not inside(as_interp[0], root):
            interp, family = as_interp
            i = _check_options(argv, family, os.path.basename(word))
            if i >= len(argv) or argv[i] == "-":
                raise ConfinementError(
                    f"{os.path.basename(word)} needs a script file inside cmd_dir (inline code is refused)")
            facts = inspect(argv[i], workdir, root, "script")
            self._check_args(family, facts.path, argv[i + 1:])
            return [interp, *argv[1:i], facts.path, *argv[i + 1:]], workdir

        facts = inspect(word, workdir, root, "command")
        args = argv[1:]
        if facts.executable and (facts.shebang is not None or facts.elf):
            if facts.shebang is not None:
                self._check_args(family_of(facts.shebang), facts.path, args)
            return [facts.path, *args], workdir
        # As the original ran every command (`bash <cmd_dir>/<cmdline> <args>`): a script
        # without the executable bit or a shebang runs through script_interpreter.
        if facts.elf or not self.script_interpreter:
            if not facts.executable:
                raise ConfinementError(f"command {word!r} is not executable")
            raise ConfinementError(f"command {word!r} has no '#!' line and script_interpreter is off")
        fallback = _script_interpreter(self.script_interpreter, self.path_env)
        if fallback is None:
            raise ConfinementError(
                f"script_interpreter {self.script_interpreter!r} is not found on PATH")
        self._check_args(fallback[1], facts.path, args)
        return [fallback[0], facts.path, *args], workdir

    def target(self, argv: Sequence[str], cwd: str | None = None) -> str:
        """The file inside cmd_dir that argv would run (the script an interpreter is given,
        or the command itself), as a path relative to cmd_dir's real path: what an API
        token's `allow` globs are matched against. Raises ConfinementError as confine()."""
        if self.mode != "strict":
            raise ConfinementError("confine is off (\"cwd\"): no command can be matched to a "
                                   "token's allow list")
        root = self._root.resolve(self.cmd_dir)
        resolved, _ = self.confine(argv, cwd)
        for word in resolved:
            if os.path.isabs(word) and inside(word, root):
                return os.path.relpath(word, root)
        raise ConfinementError("no file inside cmd_dir is run")  # pragma: no cover

    def _as_interpreter(self, word: str) -> tuple[str, str] | None:
        if "/" not in word:
            return _bare_interpreter(word, self.interpreters, self.path_env)
        if os.path.isabs(word):
            interp = os.path.realpath(word)
            family = _interpreters(self.interpreters, self.path_env).get(interp)
            return (interp, family) if family else None
        return None

    def _check_args(self, family: str, script: str, args: Sequence[str]) -> None:
        if family == "perl" and script not in self.perl_args_unchecked:
            check_perl_args(script, args)


def confine(
    argv: Sequence[str], *, cmd_dir: str, cwd: str | None = None,
    interpreters: Sequence[str] = (), mode: str = "strict", path_env: str | None = None,
    script_interpreter: str = "bash",
) -> tuple[list[str], str]:
    """One-off `Policy(...).confine(argv, cwd)`."""
    return Policy(cmd_dir, tuple(interpreters), mode, path_env, script_interpreter).confine(argv, cwd)
