"""Name resolution for the static policy: what a name or expression in one parsed file stands for.

Imports and simple assignments are tracked per scope, so `import time as t; t.perf_counter = f`,
`setattr(time, "perf" + "_counter", f)`, `getattr(__import__("torch"), "Tensor")`, `sys.modules["time"]` and
`torch.nn.functional.__dict__["gelu"]` all resolve to qualified names, and a name bound only to a constant
resolves to it. A rule can then match what code reaches, however it is spelled.
"""
import ast
import builtins

SCOPES = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)
BUILTIN_NAMES = frozenset(dir(builtins))


class Source:
    """One parsed file: scopes and the bindings in them, and name and constant resolution over those (where paths
    point is policy_paths.Paths, over the same bindings)."""

    def __init__(self, tree: ast.Module, package: str):
        self.package = package  # dotted package of the file, for relative imports
        self.nodes = list(ast.walk(tree))  # breadth-first, as every pass visits them
        self.parent = {child: node for node in self.nodes for child in ast.iter_child_nodes(node)}
        self.bindings: dict[ast.AST, dict[str, list[tuple[str, object]]]] = {}  # scope -> name -> [(kind, payload)]
        self.attribute_values: dict[str, list[ast.expr]] = {}  # "self.run_dir" -> values assigned, file-wide
        self._busy: set[tuple[str, int]] = set()  # bound values being resolved: guards cycles
        self._memo: dict[tuple[str, int], object] = {}  # bound value -> its resolution: names bound many times
        self._chains: dict[int, list[ast.AST]] = {}
        for node in self.nodes:
            self._bind(node)

    # scopes and bindings: kinds are "import" (payload: qualified name), "value" (an expression whose value the
    # name takes), "item" (an iterable whose items it takes) and "unknown" (parameters, defs, except names)

    def scope_chain(self, node: ast.AST):
        """Enclosing scopes, innermost first; class bodies are visible only to code directly inside them."""
        if id(node) not in self._chains:
            chain, scope = [], self.parent.get(node)
            while scope is not None:
                if isinstance(scope, SCOPES) and not (isinstance(scope, ast.ClassDef) and chain):
                    chain.append(scope)
                scope = self.parent.get(scope)
            self._chains[id(node)] = chain
        return self._chains[id(node)]

    def _add(self, scope, name: str, kind: str, payload=None) -> None:
        self.bindings.setdefault(scope, {}).setdefault(name, []).append((kind, payload))

    def _bind_target(self, target: ast.expr, kind: str, value) -> None:
        if isinstance(target, ast.Name):
            self._add(self.scope_chain(target)[0], target.id, kind, value)
        elif isinstance(target, (ast.Tuple, ast.List)):
            pairs = kind == "value" and isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts)
            for i, element in enumerate(target.elts):
                self._bind_target(element, kind if pairs else "unknown", value.elts[i] if pairs else None)
        elif isinstance(target, ast.Starred):
            self._bind_target(target.value, "unknown", None)
        elif isinstance(target, ast.Attribute) and kind == "value":
            self.attribute_values.setdefault(ast.unparse(target), []).append(value)

    def _bind(self, node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                bound = alias.asname or alias.name.split(".")[0]
                self._add(self.scope_chain(node)[0], bound, "import", alias.name if alias.asname else bound)
        elif isinstance(node, ast.ImportFrom):
            module = self.from_module(node)
            for alias in node.names:
                if alias.name != "*":
                    self._add(self.scope_chain(node)[0], alias.asname or alias.name, "import", f"{module}.{alias.name}")
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                self._bind_target(target, "value", node.value)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and node.value is not None:
            self._bind_target(node.target, "value", node.value)
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            self._bind_target(node.target, "item", node.iter)
        elif isinstance(node, ast.withitem) and node.optional_vars is not None:
            self._bind_target(node.optional_vars, "value", node.context_expr)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            self._add(self.scope_chain(node)[0], node.name, "unknown")
        elif isinstance(node, ast.arg):
            self._add(self.scope_chain(node)[0], node.arg, "unknown")
        elif isinstance(node, ast.ExceptHandler) and node.name:
            self._add(self.scope_chain(node)[0], node.name, "unknown")

    def from_module(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        parts = self.package.split(".") if self.package else []
        base = parts[: len(parts) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def lookup(self, name: str, node: ast.AST):
        for scope in self.scope_chain(node):
            found = self.bindings.get(scope, {}).get(name)
            if found:
                return found
        return None

    def resolved(self, what: str, payload, resolve, fallback):
        """resolve(payload), computed once per (what, payload); `fallback` inside a cycle (`x = x / "a"`). Path
        resolution shares the memo and the cycle guard."""
        key = (what, id(payload))
        if key not in self._memo:
            if key in self._busy:
                return fallback
            self._busy.add(key)
            self._memo[key] = resolve(payload)
            self._busy.discard(key)
        return self._memo[key]

    # names

    def qualname(self, node: ast.AST) -> str | None:
        """The dotted name an expression stands for when it is a module or a thing in one, else None."""
        if isinstance(node, ast.Name):
            if node.id == "__builtins__":
                return "builtins"
            bindings = self.lookup(node.id, node)
            if bindings is None:
                return f"builtins.{node.id}" if node.id in BUILTIN_NAMES else None
            # a name also bound to other things in the same scope still counts (`F = None` must not hide an import)
            names = {payload if kind == "import" else self.resolved("qualname", payload, self.qualname, None)
                     for kind, payload in bindings if kind in ("import", "value")} - {None}
            return names.pop() if len(names) == 1 else None
        if isinstance(node, ast.Attribute):
            base = self.qualname(node.value)
            return f"{base}.{node.attr}" if base else None
        if isinstance(node, ast.Call):
            callee, args = self.qualname(node.func), node.args
            if callee == "builtins.getattr" and len(args) >= 2:
                base, name = self.qualname(args[0]), self.const_str(args[1])
                return f"{base}.{name}" if base and name else None
            if callee in ("builtins.__import__", "importlib.import_module") and args:
                return self.const_str(args[0])
            if callee == "builtins.vars" and args:
                base = self.qualname(args[0])
                return f"{base}.__dict__" if base else None
            return None
        if isinstance(node, ast.Subscript):
            base, key = self.qualname(node.value), self.const_str(node.slice)
            if base == "sys.modules" and key:
                return key
            if base and base.endswith(".__dict__") and key:
                return f"{base.removesuffix('.__dict__')}.{key}"
        return None

    def const_str(self, node: ast.AST) -> str | None:
        """A string the expression always has: a literal, a concatenation of them, or a name bound only to one."""
        if isinstance(node, ast.Constant):
            return node.value if isinstance(node.value, str) else None
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            left, right = self.const_str(node.left), self.const_str(node.right)
            return left + right if left is not None and right is not None else None
        if isinstance(node, ast.JoinedStr) and all(isinstance(v, ast.Constant) for v in node.values):
            return "".join(v.value for v in node.values)
        if isinstance(node, ast.Name):
            return self._bound_constant(node, "str", self.const_str)
        return None

    def const_int(self, node: ast.AST) -> int | None:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            value = self.const_int(node.operand)
            return -value if value is not None else None
        if isinstance(node, ast.Name):
            return self._bound_constant(node, "int", self.const_int)
        return None

    def _bound_constant(self, name: ast.Name, what: str, resolve):
        """The constant `resolve` finds in every value the name is bound to, when they all agree; else None."""
        bindings = self.lookup(name.id, name) or [("unknown", None)]
        values = {self.resolved(what, payload, resolve, None) if kind == "value" else None
                  for kind, payload in bindings}
        return values.pop() if len(values) == 1 else None

    # environment

    def env_read(self, node: ast.AST):
        """(key expression, default expression or None) when `node` reads an environment variable, else None."""
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load) \
                and self.qualname(node.value) == "os.environ":
            return node.slice, None
        if isinstance(node, ast.Call) and node.args and self.qualname(node.func) in (
                "os.getenv", "os.environ.get", "os.environ.setdefault", "os.environ.pop"):
            return node.args[0], node.args[1] if len(node.args) > 1 else None
        return None
