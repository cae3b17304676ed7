"""Edit: the search/replace edit format (parse, apply) and the git worktrees and commits it lands in."""
