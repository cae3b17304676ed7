"""Where a path expression points, for the static policy's file rules: traced back through assignments and
path-building calls to string constants and environment reads.

A path is sorted by what it may be built from: something outside the run's reach (absolute, '..', /tmp, home),
validation data, the run's own directories (RATCHET_RUN_DIR, RATCHET_TRAIN_DATA), a fixed relative path, or
something unknown. Unknown paths are left to the sandbox: the policy only rejects what it can show.
"""
import ast
import re

from agent.guard.policy_names import Source
from agent.guard.policy_rules import OPENERS, TEMPFILES, VALIDATION_DATA

ENV_PLACES = {"RATCHET_RUN_DIR": "run_dir", "RATCHET_TRAIN_DATA": "train_data"}  # the directories a run may use
OUTSIDE_ENV = frozenset({"HOME", "USERPROFILE", "TMPDIR", "TMP", "TEMP", "XDG_CACHE_HOME", "XDG_DATA_HOME",
                         "XDG_RUNTIME_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "HF_HOME", "TORCH_HOME"})
PARENT_DIR = re.compile(r"(^|[/\\])\.\.([/\\]|$)")
HOME_VAR = re.compile(r"\$\{?HOME\b|%USERPROFILE%")
# calls whose result is a path built from their positional arguments (and methods, from their receiver too)
PATH_BUILDERS = frozenset({"os.path.join", "os.path.abspath", "os.path.realpath", "os.path.normpath",
                           "os.path.expanduser", "os.path.expandvars", "os.fspath", "builtins.str", "builtins.sorted",
                           "builtins.list", "pathlib.Path", "pathlib.PurePath", "pathlib.PosixPath"})
PATH_BUILDER_METHODS = frozenset({"joinpath", "with_suffix", "with_name", "with_stem", "expanduser", "resolve",
                                  "absolute", "format", "open", "read", "read_text", "read_bytes", "__truediv__"})
OUTSIDE_CALLS = ("pathlib.Path.home", "tempfile.gettempdir", "tempfile.gettempdirb") + TEMPFILES
SANCTIONED = frozenset({"run_dir", "train_data"})  # the tags of the directories a run may use


class Paths:
    """Path resolution over one file's Source: origin() as a set of tags, place() as one verdict."""

    def __init__(self, src: Source):
        self.src = src

    def origin(self, node: ast.AST, leading: bool = True) -> set[str]:
        """Tags of the places `node` may point at: "outside" (absolute, '..', /tmp, home), "val" (validation data),
        "run_dir" / "train_data" (built from the run's directories), "const" (a fixed relative path), "unknown".
        `leading` is False for a string that is appended to another (f"{run_dir}/final.pt" is not absolute)."""
        if isinstance(node, ast.Constant):
            if isinstance(node.value, (str, bytes)):
                text = node.value if isinstance(node.value, str) else node.value.decode("latin-1")
                return {_string_place(text, leading)}
            return set()
        if isinstance(node, ast.JoinedStr):
            return set().union(*(self.origin(v.value if isinstance(v, ast.FormattedValue) else v, leading and i == 0)
                                 for i, v in enumerate(node.values)))
        if isinstance(node, ast.BinOp):
            if isinstance(node.op, (ast.Add, ast.Mod)):  # string concatenation and formatting
                return self.origin(node.left, leading) | self.origin(node.right, False)
            if isinstance(node.op, ast.Div):  # pathlib: an absolute right operand replaces the left
                return self.origin(node.left, leading) | self.origin(node.right, True)
            return set()
        if isinstance(node, ast.Name):
            tags = set()
            for kind, payload in self.src.lookup(node.id, node) or [("unknown", None)]:
                if kind in ("value", "item"):
                    tags |= self.src.resolved(f"origin{leading}", payload, lambda p: self.origin(p, leading), set())
                else:
                    tags.add("unknown")
            return tags or {"unknown"}
        if isinstance(node, ast.Attribute):
            values = self.src.attribute_values.get(ast.unparse(node))
            if values:
                return set().union(*(self.src.resolved(f"origin{leading}", v, lambda p: self.origin(p, leading), set())
                                     for v in values))
            if node.attr in ("parent", "parents"):  # run_dir.parent is no longer the run directory
                tags = self.origin(node.value, leading)
                return (tags - SANCTIONED) | ({"unknown"} if tags & SANCTIONED else set())
            return {"unknown"}
        if isinstance(node, ast.Subscript):
            env = self.src.env_read(node)
            return self._env_origin(*env) if env else self.origin(node.value, leading)
        if isinstance(node, ast.Call):
            return self._call_origin(node, leading)
        if isinstance(node, ast.IfExp):
            return self.origin(node.body, leading) | self.origin(node.orelse, leading)
        if isinstance(node, (ast.BoolOp, ast.Tuple, ast.List)):
            elements = node.values if isinstance(node, ast.BoolOp) else node.elts
            return set().union(*(self.origin(e, leading) for e in elements))
        return {"unknown"}

    def _env_origin(self, key: ast.AST, default) -> set[str]:
        name = self.src.const_str(key)
        tags = {ENV_PLACES.get(name, "outside" if name in OUTSIDE_ENV else "unknown")}
        return tags | (self.origin(default) if default is not None else set())

    def _call_origin(self, node: ast.Call, leading: bool) -> set[str]:
        env = self.src.env_read(node)
        if env:
            return self._env_origin(*env)
        callee = self.src.qualname(node.func)
        if callee in OUTSIDE_CALLS:
            directory = next((k.value for k in node.keywords if k.arg == "dir"), None)
            return self.origin(directory) if directory is not None else {"outside"}
        if callee in OPENERS:
            return self.origin(node.args[0]) if node.args else {"unknown"}
        if callee in PATH_BUILDERS:
            return set().union(*(self.origin(a) for a in node.args)) or {"unknown"}
        if callee is None and isinstance(node.func, ast.Attribute) and node.func.attr in PATH_BUILDER_METHODS:
            tags = self.origin(node.func.value, leading)
            if node.func.attr != "open":
                tags = tags.union(*(self.origin(a, node.func.attr != "format") for a in node.args))
            return tags
        return {"unknown"}

    def place(self, node: ast.AST) -> str:
        """Where a path points, all tags considered: outside | val | run | fixed | unknown."""
        tags = self.origin(node)
        if "outside" in tags:
            return "outside"
        if "val" in tags:
            return "val"
        if tags & SANCTIONED:
            return "run"
        return "fixed" if tags == {"const"} else "unknown"


def _string_place(text: str, leading: bool) -> str:
    if VALIDATION_DATA.search(text):
        return "val"
    if PARENT_DIR.search(text) or HOME_VAR.search(text) or (leading and text.startswith(("/", "~"))):
        return "outside"
    return "const"

