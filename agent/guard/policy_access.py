"""The static policy's access rules: which files candidate code reads, loads and writes (read-outside,
load-foreign, write-outside) and which environment variables it reads or points elsewhere (ratchet-env).

A run may write only RATCHET_RUN_DIR and read its own tree and RATCHET_TRAIN_DATA; validation data is the
evaluator's. Each file-touching call is judged by where its path argument points (policy_paths).
"""
import ast

from agent.guard.policy_names import Source
from agent.guard.policy_paths import Paths
from agent.guard.policy_rules import (ALLOWED_RATCHET_ENV, OPENERS, PATH_CALLS, PATH_METHODS, TARGET_METHODS,
                                      TEMPFILES, show)


class AccessChecks:
    """The access rules for one file; findings go to `hit(rule, node, message)`, the checker's collector."""

    def __init__(self, src: Source, paths: Paths, hit):
        self.src, self.paths, self.hit = src, paths, hit

    def check_file_call(self, node: ast.Call, callee: str | None, method: str | None) -> None:
        what = show(node.func, 40)
        if callee in OPENERS or (callee and callee.endswith(".open") and callee not in PATH_CALLS):
            mode_index, default = OPENERS.get(callee, (1, "r"))
            path = _argument(node, 0, "file") or _argument(node, 0, "filename")
            self.judge_path(node, what, self.open_kind(_argument(node, mode_index, "mode"), default), path)
        elif callee in PATH_CALLS:
            for kind, index, keyword in PATH_CALLS[callee]:
                self.judge_path(node, what, kind, _argument(node, index, keyword))
        elif callee in TEMPFILES:
            directory = _argument(node, -1, "dir")
            if directory is None or self.paths.place(directory) in ("outside", "fixed"):
                self.hit("write-outside", node, f"{what} makes files in the shared temp dir: only RATCHET_RUN_DIR "
                                                f"may be written")
        elif callee is None and method is not None:
            what = f"{method}()"
            if method in PATH_METHODS:
                self.judge_path(node, what, PATH_METHODS[method], node.func.value)
            elif method == "open":
                self.judge_path(node, what, self.open_kind(_argument(node, 0, "mode"), "r"), node.func.value)
            elif method in TARGET_METHODS and len(node.args) == 1 and not node.keywords:
                self.judge_path(node, what, "write", node.args[0])

    def open_kind(self, mode, default: str) -> str:
        """"write" when the open mode ('w', 'a', 'x', '+') writes, else "read"; a computed mode counts as reading."""
        text = default if mode is None else self.src.const_str(mode) or "r"
        return "write" if set(text) & set("wax+") else "read"

    def judge_path(self, node, what: str, kind: str, path) -> None:
        if path is None:
            return
        place, shown = self.paths.place(path), show(path)
        if place == "val":
            self.hit("read-outside" if kind != "write" else "write-outside", node,
                     f"{what} touches {shown}: validation data is the evaluator's, never the training run's")
        elif kind == "read" and place == "outside":
            self.hit("read-outside", node, f"{what} reads {shown}: outside what the run may read (absolute, "
                                           f"'..', /tmp or home)")
        elif kind == "load" and place in ("outside", "fixed"):
            self.hit("load-foreign", node, f"{what} loads {shown}: weights may only come from this run's "
                                           f"RATCHET_RUN_DIR, not from a cache or a file in the repo")
        elif kind == "write" and place in ("outside", "fixed"):
            self.hit("write-outside", node, f"{what} writes {shown}: only RATCHET_RUN_DIR may be written")

    def check_env_call(self, node: ast.Call, callee: str | None) -> None:
        env = self.src.env_read(node)
        if env:
            self.check_env_name(node, self.src.const_str(env[0]))
        if callee in ("os.environ.setdefault", "os.putenv") and len(node.args) >= 2:
            self.check_env_write(node, self.src.const_str(node.args[0]) or "<dynamic>", node.args[1])

    def check_env_read(self, node: ast.Subscript) -> None:
        env = self.src.env_read(node)
        if env:
            self.check_env_name(node, self.src.const_str(env[0]))

    def check_env_name(self, node, name: str | None) -> None:
        if name and name.startswith("RATCHET_") and name not in ALLOWED_RATCHET_ENV:
            self.hit("ratchet-env", node, f"reads {name}: a run may read only RATCHET_RUN_DIR, RATCHET_SEED and "
                                          f"RATCHET_TRAIN_DATA")

    def check_env_write(self, node, key: str, value) -> None:
        if value is not None and self.paths.place(value) == "outside":
            self.hit("write-outside", node, f"points ${key} at {show(value)}: only RATCHET_RUN_DIR may be written")


def _argument(call: ast.Call, index: int, keyword: str | None):
    """The argument at `index` (-1: keyword only) or passed as `keyword`, else None."""
    if 0 <= index < len(call.args) and not any(isinstance(a, ast.Starred) for a in call.args[: index + 1]):
        return call.args[index]
    return next((k.value for k in call.keywords if keyword and k.arg == keyword), None)

