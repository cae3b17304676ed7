"""The static policy's checker: one walk over a parsed file that applies every rule and collects its findings.

The rules on names (processes, threads, network, dynamic code, a kernel's reference), on patches of timers and
libraries, on a kernel's fallback to torch's op, on constant seeds and on strings naming validation data are
here; the file and environment rules are policy_access's. A constant string given to exec/eval/compile is
checked as code, by a checker of its own.
"""
import ast
from pathlib import Path

from agent.guard.policy_access import AccessChecks
from agent.guard.policy_names import Source
from agent.guard.policy_paths import Paths
from agent.guard.policy_rules import (ALLOWED_RATCHET_ENV, CONFIG_KNOBS, DYNAMIC_CODE, NETWORK, OWN_PACKAGES,
                                      PROTECTED_MODULES, RATCHET_NAME, REFERENCE_OPS, SEEDERS, SPAWN_PROCESS,
                                      SPAWN_THREAD, TIMERS, VALIDATION_DATA, Finding, display, finding, matches,
                                      show)


class Checker:
    """Runs every rule over one parsed file and collects (finding, last line) pairs, one per rule and line."""

    def __init__(self, path: str, tree: ast.Module):
        self.path = path
        package = ".".join(Path(path).parent.parts)
        self.src = Source(tree, package)
        self.paths = Paths(self.src)
        self.access = AccessChecks(self.src, self.paths, self.hit)
        self.in_kernels = path.startswith("kernels/") and path != "kernels/reference.py"
        self.is_dispatcher = path == "kernels/__init__.py"  # imports the references by design: it picks one
        self.hits: dict[tuple[str, int], tuple[Finding, int]] = {}
        self.docstrings = {id(n.value) for n in self.src.nodes if isinstance(n, ast.Expr)}
        self.constant_seeds: list[tuple[ast.Call, str, int]] = []

    def hit(self, rule: str, node: ast.AST, message: str) -> None:
        line = getattr(node, "lineno", 1)
        end = getattr(node, "end_lineno", None) or line
        self.hits.setdefault((rule, line), (finding(rule, self.path, line, message), end))

    def run(self) -> list[tuple[Finding, int]]:
        for node in self.src.nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                self.check_import(node)
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign, ast.Delete)):
                self.check_assignment(node)
            elif isinstance(node, ast.Call):
                self.check_call(node)
            elif isinstance(node, (ast.Try, ast.TryStar)) and self.in_kernels:
                self.check_fallback(node)
            elif isinstance(node, ast.Subscript):
                self.access.check_env_read(node)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in self.docstrings:
                self.check_constant(node)
            if isinstance(node, (ast.Name, ast.Attribute, ast.Subscript, ast.Call)) and isinstance(
                    getattr(node, "ctx", ast.Load()), ast.Load):  # a Call has no ctx: getattr(os, "system") is a use
                qualname = self.src.qualname(node)
                if qualname:
                    self.check_name(node, qualname, "uses")
        self.check_seeds()
        return list(self.hits.values())

    # names: imports and uses

    def check_import(self, node) -> None:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            module = self.src.from_module(node)
            names = [module] + [f"{module}.{alias.name}" for alias in node.names if alias.name != "*"]
        for name in names:
            self.check_name(node, name, "imports")

    def check_name(self, node, qualname: str, how: str) -> None:
        shown = display(qualname)
        if matches(qualname, SPAWN_PROCESS):
            self.hit("spawn-process", node, f"{how} {shown}: candidate code may not start, detach or signal processes")
        if matches(qualname, SPAWN_THREAD):
            self.hit("spawn-thread", node, f"{how} {shown}: a prefetch thread is fine (the process group is timed as "
                                           f"a whole), but worth a look")
        if matches(qualname, NETWORK):
            self.hit("network", node, f"{how} {shown}: runs have no network, and fetched weights or answers are not "
                                      f"training")
        if matches(qualname, DYNAMIC_CODE):
            self.hit("dynamic-code", node, f"{how} {shown}: code the policy cannot read (exec, frames, tracing, "
                                           f"hooks) needs a human look")
        if self.in_kernels and not self.is_dispatcher and matches(qualname, ("kernels.reference",)):
            self.hit("reference-fallback", node, f"{how} {shown}: a kernel may not call its reference, which the "
                                                 f"kernel tests compare against")

    # writes to modules and library objects

    def check_assignment(self, node) -> None:
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        value = None if isinstance(node, ast.Delete) else node.value
        if isinstance(node, ast.AnnAssign) and value is None:
            return  # a bare annotation assigns nothing
        verb = "deletes" if isinstance(node, ast.Delete) else "assigns"
        for target in _flatten(targets):
            if isinstance(target, ast.Attribute):
                base = self.src.qualname(target.value)
                if base:
                    self.patch(node, f"{base}.{target.attr}", verb, value)
            elif isinstance(target, ast.Subscript):
                base, key = self.src.qualname(target.value), self.src.const_str(target.slice) or "<dynamic>"
                if base == "sys.modules":
                    self.patch(node, key, f"{verb} sys.modules entry", value, own_allowed=False)
                elif base == "os.environ":
                    self.access.check_env_write(node, key, value)
                elif base == "builtins" or (base and base.endswith(".__dict__")):
                    self.patch(node, f"{base.removesuffix('.__dict__')}.{key}", verb, value)

    def patch(self, node, target: str, verb: str, value=None, own_allowed: bool = True) -> None:
        if matches(target, TIMERS):
            self.hit("patch-timer", node, f"{verb} {target}: timers are the harness's")
        elif matches(target, CONFIG_KNOBS):
            if value is not None and self.paths.place(value) == "outside":
                self.hit("write-outside", node, f"points {target} at {show(value)}: only RATCHET_RUN_DIR may be "
                                                f"written")
        elif not (own_allowed and matches(target, OWN_PACKAGES) and not matches(target, PROTECTED_MODULES)):
            self.hit("patch-library", node, f"{verb} {target}: the evaluator and the tests import this code, so "
                                            f"library functions must stay the library's")

    # calls

    def check_call(self, node: ast.Call) -> None:
        func, args = node.func, node.args
        callee = self.src.qualname(func)
        method = func.attr if isinstance(func, ast.Attribute) else None
        receiver = self.src.qualname(func.value) if method else None
        if callee in ("builtins.setattr", "builtins.delattr", "builtins.object.__setattr__",
                      "builtins.type.__setattr__") and len(args) >= 2:
            base = self.src.qualname(args[0])
            if base:
                name = self.src.const_str(args[1]) or "<dynamic>"
                self.patch(node, f"{base}.{name}", f"{display(callee)}()s", args[2] if len(args) > 2 else None)
        elif method in ("__setattr__", "__delattr__") and receiver:
            self.patch(node, f"{receiver}.{self._key(args)}", f"{method}()s")
        elif method in ("update", "__setitem__", "setdefault", "pop", "__delitem__", "clear") and receiver and (
                receiver == "sys.modules" or receiver == "builtins" or receiver.endswith(".__dict__")):
            if receiver == "sys.modules":
                self.patch(node, self._key(args), "changes sys.modules entry", own_allowed=False)
            else:
                self.patch(node, f"{receiver.removesuffix('.__dict__')}.{self._key(args)}", f"{method}()s")
        elif callee and callee.endswith("mock.patch") and args and self.src.const_str(args[0]):
            self.patch(node, self.src.const_str(args[0]), "mock-patches")
        elif callee and callee.endswith("mock.patch.object") and args and self.src.qualname(args[0]):
            self.patch(node, f"{self.src.qualname(args[0])}.{self._key(args[1:])}", "mock-patches")
        elif callee and matches(callee, ("torch.library",)) and any(
                _is_aten(self.src.const_str(a)) for a in args + [k.value for k in node.keywords]):
            self.hit("patch-library", node, f"{display(callee)} on aten: overriding torch's own ops changes them "
                                            f"for the evaluator too")
        self.access.check_file_call(node, callee, method)
        self.access.check_env_call(node, callee)
        self.check_dynamic_call(node, callee)
        if (callee in SEEDERS or (callee is None and method == "manual_seed")) and args:
            value = self.src.const_int(args[0])
            if value is not None:
                self.constant_seeds.append((node, display(callee) if callee else ast.unparse(func), value))

    def _key(self, args) -> str:
        return (self.src.const_str(args[0]) if args else None) or "<dynamic>"

    def check_dynamic_call(self, node: ast.Call, callee: str | None) -> None:
        args = node.args
        if callee == "importlib.import_module" and args and self.src.const_str(args[0]) is None:
            self.hit("dynamic-code", node, "importlib.import_module of a computed name: the policy cannot see what "
                                           "it imports")
        elif callee == "builtins.getattr" and len(args) >= 2 and self.src.const_str(args[1]) is None \
                and _is_module_like(self.src.qualname(args[0])):
            self.hit("dynamic-code", node, f"getattr on {self.src.qualname(args[0])} with a computed name: the policy "
                                           f"cannot see what it reaches")
        elif callee in ("builtins.exec", "builtins.eval", "builtins.compile", "builtins.__import__") and args:
            self.check_code_string(node, display(callee), self.src.const_str(args[0]))
        elif callee == "importlib.import_module" and args:
            self.check_name(node, self.src.const_str(args[0]), "imports")

    def check_code_string(self, node: ast.Call, what: str, code: str | None) -> None:
        """A constant string given to exec/eval/compile is checked as code (and one given to __import__ as a module
        name); its findings point at the call. Computed strings are flagged by the name check alone."""
        if code is None:
            return
        if what == "__import__":
            self.check_name(node, code, "imports")
            return
        try:
            inner = ast.parse(code)
        except SyntaxError:
            return
        for inner_finding, _ in Checker(self.path, inner).run():
            self.hit(inner_finding.rule, node, f"in {what}() string: {inner_finding.message}")

    # kernels: no fallback to torch's op when the kernel fails

    def check_fallback(self, node) -> None:
        for handler in node.handlers:
            for call in (n for statement in handler.body for n in ast.walk(statement) if isinstance(n, ast.Call)):
                callee = self.src.qualname(call.func)
                name = callee.rsplit(".", 1)[-1] if callee else getattr(call.func, "attr", None)
                if (callee and matches(callee, ("torch.nn", "kernels.reference"))) or (
                        name in REFERENCE_OPS and (callee is None or callee.startswith("torch."))):
                    self.hit("reference-fallback", call, f"except handler calls {show(call.func, 40)}: a kernel that "
                                                         f"fails must raise, not hand back the reference op")

    # strings anywhere in the code (docstrings aside)

    def check_constant(self, node: ast.Constant) -> None:
        text = node.value
        if VALIDATION_DATA.search(text):
            self.hit("read-outside", node, f"mentions validation data ({text[:40]!r}): the training run never sees it")
        if RATCHET_NAME.match(text) and text not in ALLOWED_RATCHET_ENV:
            self.access.check_env_name(node, text)

    def check_seeds(self) -> None:
        reads_seed = any(isinstance(n, ast.Constant) and n.value == "RATCHET_SEED" for n in self.src.nodes)
        if reads_seed:
            return
        for node, what, value in self.constant_seeds:
            self.hit("seed-override", node, f"{what}({value}) with a constant while the file does not read "
                                            f"RATCHET_SEED: a hard-coded seed can be a lucky one")


def _flatten(targets):
    for target in targets:
        if isinstance(target, (ast.Tuple, ast.List)):
            yield from _flatten(target.elts)
        elif isinstance(target, ast.Starred):
            yield from _flatten([target.value])
        else:
            yield target


def _is_aten(text: str | None) -> bool:
    return text is not None and (text in ("aten", "prims") or text.startswith(("aten::", "aten.", "prims::")))


def _is_module_like(qualname: str | None) -> bool:
    """A resolved name outside the candidate's own packages: getattr with a computed name on it hides the target."""
    return qualname is not None and not matches(qualname, OWN_PACKAGES)
