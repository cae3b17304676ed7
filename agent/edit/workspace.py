"""Git side of Ratchet: the research branch, one worktree per arm, commits, rejected refs.

The user's checkout, index and working tree are never touched: every edit is applied and committed in
a detached worktree under runs/<tag>/worktrees/, and the branch only moves by a compare-and-swap
`update-ref` once the judge has accepted.
"""
import os
import re
import shutil
from pathlib import Path

import git

# used only when neither the repo nor the environment has an identity (fresh CI machines)
FALLBACK_IDENTITY = {"GIT_AUTHOR_NAME": "Ratchet", "GIT_AUTHOR_EMAIL": "ratchet@localhost",
                     "GIT_COMMITTER_NAME": "Ratchet", "GIT_COMMITTER_EMAIL": "ratchet@localhost"}
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class WorkspaceError(RuntimeError):
    pass


def repo_root(start: Path) -> Path:
    try:
        return Path(git.Repo(start, search_parent_directories=True).working_tree_dir)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise WorkspaceError(f"{start} is not inside a git repository") from None


def has_identity(repo: git.Repo) -> bool:
    if os.environ.get("GIT_AUTHOR_EMAIL") and os.environ.get("GIT_COMMITTER_EMAIL"):
        return True
    try:
        repo.git.config("user.email")
        return True
    except git.GitCommandError:
        return False


class Workspace:
    def __init__(self, root: Path, tag: str):
        if not TAG_RE.match(tag):
            raise WorkspaceError(f"bad tag {tag!r}: use letters, digits, '.', '_' and '-'")
        self.root = Path(root)
        self.repo = git.Repo(self.root)
        self.tag = tag
        self.branch = f"ratchet/{tag}"
        self.worktrees = self.root / "runs" / tag / "worktrees"

    # --- the research branch
    def branch_exists(self) -> bool:
        return f"refs/heads/{self.branch}" in {r.path for r in self.repo.references}

    def ensure_branch(self) -> str:
        """Create ratchet/<tag> from the current HEAD if missing; return its head commit."""
        if not self.branch_exists():
            if not self.repo.head.is_valid():
                raise WorkspaceError("the repository has no commits: commit the target repo first")
            self.repo.git.branch(self.branch, "HEAD")
        return self.head()

    def head(self) -> str:
        return self.repo.git.rev_parse(f"refs/heads/{self.branch}")

    def advance(self, new: str, expected_parent: str) -> None:
        """Move the branch to `new` only if it still points at `expected_parent` (compare-and-swap)."""
        self.repo.git.update_ref(f"refs/heads/{self.branch}", new, expected_parent)

    def keep_rejected(self, exp_id: str, commit: str) -> str:
        ref = f"refs/ratchet/{self.tag}/rejected/{exp_id}"
        self.repo.git.update_ref(ref, commit)
        return ref

    def resolve(self, rev: str) -> str:
        try:
            return self.repo.git.rev_parse("--verify", f"{rev}^{{commit}}")
        except git.GitCommandError:
            raise WorkspaceError(f"unknown revision {rev!r}") from None

    # --- worktrees
    def add_worktree(self, name: str, rev: str) -> Path:
        path = self.worktrees / name
        self.remove_worktree(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.repo.git.worktree("add", "--detach", "--force", str(path), rev)
        return path

    def remove_worktree(self, path: Path) -> None:
        if path.exists():
            try:
                self.repo.git.worktree("remove", "--force", "--force", str(path))
            except git.GitCommandError:
                shutil.rmtree(path, ignore_errors=True)
        self.repo.git.worktree("prune")

    def remove_all_worktrees(self) -> None:
        """Also run on resume: a crash can leave worktrees behind."""
        if self.worktrees.exists():
            for path in sorted(self.worktrees.iterdir()):
                self.remove_worktree(path)
        self.repo.git.worktree("prune")

    # --- commits, made inside a worktree (detached HEAD): nothing moves until advance()/keep_rejected()
    def commit(self, worktree: Path, message: str) -> str:
        wt = git.Repo(worktree)
        wt.git.add("-A")
        env = {} if has_identity(self.repo) else FALLBACK_IDENTITY
        with wt.git.custom_environment(**env):
            wt.git.commit("--allow-empty", "--no-verify", "-q", "-m", message)
        return wt.git.rev_parse("HEAD")

    def amend_message(self, worktree: Path, message: str) -> str:
        wt = git.Repo(worktree)
        env = {} if has_identity(self.repo) else FALLBACK_IDENTITY
        with wt.git.custom_environment(**env):
            wt.git.commit("--amend", "--allow-empty", "--no-verify", "-q", "-m", message)
        return wt.git.rev_parse("HEAD")

    def resolve_in(self, worktree: Path, rev: str) -> str:
        return git.Repo(worktree).git.rev_parse(rev)

    def cherry_pick(self, worktree: Path, rev: str) -> str:
        """Replay a commit (message included) onto the worktree's HEAD; a conflict is a clear error."""
        wt = git.Repo(worktree)
        env = {} if has_identity(self.repo) else FALLBACK_IDENTITY
        try:
            with wt.git.custom_environment(**env):
                wt.git.cherry_pick("--allow-empty", rev)
        except git.GitCommandError as e:
            wt.git.cherry_pick("--abort")
            raise WorkspaceError(f"cannot replay {rev[:10]} onto {wt.git.rev_parse('--short', 'HEAD')}: "
                                 f"{e.stderr.strip().splitlines()[-1] if e.stderr.strip() else 'conflict'}") from None
        return wt.git.rev_parse("HEAD")

    def diff(self, rev: str) -> str:
        """The patch a commit introduces, as `git diff` writes it."""
        return self.repo.git.diff(f"{rev}^", rev)

    def message(self, rev: str) -> str:
        return self.repo.git.log("-1", "--format=%B", rev)

    def parent(self, rev: str) -> str:
        return self.repo.git.rev_parse(f"{rev}^")

    def commits_since(self, base: str, rev: str) -> list[str]:
        out = self.repo.git.rev_list("--reverse", f"{base}..{rev}")
        return out.split() if out else []


def trailers(message: str) -> dict[str, str]:
    """Ratchet-* trailers of a commit message."""
    return {m.group(1): m.group(2).strip() for m in re.finditer(r"^(Ratchet-[\w-]+):\s*(.*)$", message, re.M)}
